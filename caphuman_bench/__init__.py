"""caphuman-bench: the HumanIPHC benchmark for identity-preserving, head-controllable portraits."""

__version__ = "0.1.0"
