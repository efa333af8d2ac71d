"""Name → class registries for methods and metrics (lm-evaluation-harness style).

The CLI resolves every name through here, never through if/else chains. Adapters and metrics
register themselves with a decorator when their module is imported; `load_plugins()` imports every
module of `caphuman_bench.methods` and `caphuman_bench.metrics`, so a newcomer adds one file, and those
of other packages and folders (`caphuman_bench.plugins`).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from caphuman_bench.errors import BenchError
from caphuman_bench.plugins import outside_modules

METHODS: dict[str, type] = {}
METRICS: dict[str, type] = {}


@dataclass(frozen=True)
class MetricInfo:
    """What the registry knows about a metric before building it."""

    name: str
    higher_is_better: dict[str, bool]
    weights: tuple[str, ...]
    description: str


def register_method(name: str):
    """Class decorator: make an adapter reachable as `--method`-style adapter `name` in cards."""

    def wrap(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise BenchError(f"method adapter {name!r} registered twice ({METHODS[name].__module__}, {cls.__module__})")
        cls.adapter_name = name
        METHODS[name] = cls
        return cls

    return wrap


def register_metric(name: str, *, higher_is_better: bool | dict[str, bool], weights: tuple[str, ...] = ()):
    """Class decorator for a metric family.

    `higher_is_better` is one bool for a single-valued metric, or a mapping value-name → bool when
    the family reports several numbers (e.g. RMSE per DECA group). `weights` are manifest ids
    (see `weights_manifest.yaml`) that must resolve for the metric to run.
    """

    def wrap(cls):
        hib = higher_is_better if isinstance(higher_is_better, dict) else {name: higher_is_better}
        if name in METRICS and METRICS[name] is not cls:
            raise BenchError(f"metric {name!r} registered twice ({METRICS[name].__module__}, {cls.__module__})")
        cls.metric_name = name
        cls.info = MetricInfo(name, dict(hib), tuple(weights), (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")
        METRICS[name] = cls
        return cls

    return wrap


_loaded = False


def load_plugins() -> None:
    """Import every adapter and metric module once so that their decorators run: this package's own,
    then those of other packages (entry points) and of --include folders (`caphuman_bench.plugins`)."""
    global _loaded
    if not _loaded:
        for package_name in ("caphuman_bench.methods", "caphuman_bench.metrics"):
            package = importlib.import_module(package_name)
            for module in pkgutil.iter_modules(package.__path__):
                if not module.name.startswith("_") and module.name != "base":
                    importlib.import_module(f"{package_name}.{module.name}")
        _loaded = True
    outside_modules()


def get_method(name: str) -> type:
    load_plugins()
    try:
        return METHODS[name]
    except KeyError:
        raise BenchError(f"unknown method adapter {name!r}; registered: {', '.join(sorted(METHODS))}") from None


def get_metric(name: str) -> type:
    load_plugins()
    try:
        return METRICS[name]
    except KeyError:
        raise BenchError(f"unknown metric {name!r}; registered: {', '.join(sorted(METRICS))}") from None


def all_metrics() -> dict[str, type]:
    load_plugins()
    return dict(sorted(METRICS.items()))


DEFAULT_RECONSTRUCTOR = "deca"  # the paper's: head conditions and head_control's plain columns unless another is named


def split_variant(name: str) -> tuple[str, str | None]:
    """'head_control[emoca_v2]' → ('head_control', 'emoca_v2'); a name without brackets → (name, None).

    A metric scored by several models at once keeps one family per model: the default model's under
    the plain names (the paper's columns), every other's as `family[model]` with values `value[model]`,
    so their rows and columns coexist in scores.parquet, results.json and the leaderboard."""
    if name.endswith("]") and "[" in name:
        base, _, variant = name[:-1].partition("[")
        if base and variant:
            return base, variant
    return name, None


def variant_name(name: str, variant: str | None) -> str:
    """`name[variant]`, or `name` for the default model (variant None)."""
    return f"{name}[{variant}]" if variant else name


def family_class(family: str) -> type | None:
    """The registered class a stored family name (plain or `family[model]`) was scored by; None if unknown."""
    return all_metrics().get(split_variant(family)[0])


def family_values(family: str) -> dict[str, bool]:
    """Value name → higher_is_better of a stored family name, variant suffix included; {} if unknown."""
    cls = family_class(family)
    if cls is None:
        return {}
    variant = split_variant(family)[1]
    return {variant_name(value, variant): higher for value, higher in cls.info.higher_is_better.items()}


def metric_direction(value_name: str) -> bool | None:
    """higher_is_better of a reported value name (a model's `value[model]` too), across all metric families."""
    base = split_variant(value_name)[0]
    for cls in all_metrics().values():
        info: Any = cls.info
        if base in info.higher_is_better:
            return info.higher_is_better[base]
    return None
