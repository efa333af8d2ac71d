"""A task: one image to generate, (identity, prompt, head condition, sample) with its own seed.

On the ground floor because every stage and the run directory read and write tasks; the plan stage
makes them (`stages/plan.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Task:
    task_id: str
    identity_id: str
    prompt_id: str
    condition_id: str
    sample: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)
