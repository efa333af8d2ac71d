"""Known-answer checks: does a port compute what its authors' code computes? One module per method.

Each module of this package registers a check with `@register_conformance(name, vectors=FOLDER)`: a
function `(reference_dir, device) -> ConformanceReport` that reads vectors made by running the authors'
own code on tiny random weights (`tests/data/FOLDER/`; its README names the commit and the generator
script) and compares the port's outputs with them. `caphuman-bench conformance NAME` runs one check, the
test suite runs all. The registry follows lm-evaluation-harness's decorator registries.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from caphuman_bench.conformance.base import ConformanceReport, ConformanceRow
from caphuman_bench.errors import BenchError

__all__ = ["ConformanceReport", "ConformanceRow", "register_conformance", "conformance_checks",
           "run_conformance", "conformance_command"]

# The source checkout's vectors (a wheel carries none: pass --reference there).
VECTORS_ROOT = Path(__file__).resolve().parents[2] / "tests" / "data"


@dataclass(frozen=True)
class ConformanceCheck:
    name: str
    vectors: str  # folder name under tests/data
    run: Callable[..., ConformanceReport]  # (reference_dir, device="cpu", only=None)

    def default_reference(self) -> Path:
        return VECTORS_ROOT / self.vectors


_CHECKS: dict[str, ConformanceCheck] = {}


def register_conformance(name: str, vectors: str):
    def wrap(run):
        if name in _CHECKS:
            raise ValueError(f"conformance check {name!r} is registered twice")
        _CHECKS[name] = ConformanceCheck(name, vectors, run)
        return run

    return wrap


def conformance_checks() -> dict[str, ConformanceCheck]:
    """Every registered check, by name (importing this package's modules registers them)."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(_CHECKS.items()))


def _check(name: str) -> ConformanceCheck:
    checks = conformance_checks()
    if name not in checks:
        raise BenchError(f"no conformance vectors are defined for {name!r} (known: {', '.join(checks)})")
    return checks[name]


def run_conformance(name: str, reference: Path | None = None, device: str = "cpu",
                    only: list[str] | None = None) -> ConformanceReport:
    check = _check(name)
    reference = Path(reference) if reference is not None else check.default_reference()
    if not reference.is_dir():
        raise BenchError(f"{reference}: no conformance vectors there (pass --reference FOLDER)")
    return check.run(reference, device=device, only=only)


def conformance_command(name: str, reference: Path | None = None, device: str = "cpu") -> int:
    """Print the report as a table; exit code 0 when every output is within tolerance, else 1."""
    from rich.console import Console
    from rich.table import Table

    report = run_conformance(name, reference, device)
    table = Table(title=f"{name} conformance: {report.variant} ({report.reference_dir})")
    for column in ("case", "output", "max abs", "max rel", "tolerance", "result"):
        table.add_column(column, justify="right" if column.startswith(("max", "tol")) else "left")
    for row in report.rows:
        verdict = "[green]pass[/green]" if row.passed else "[red]FAIL[/red]"
        bound = f"{row.tolerance:g}" + (" rel" if row.relative else "")
        table.add_row(row.case, row.output, f"{row.max_abs:.3g}", f"{row.max_rel:.3g}", bound, verdict)
    console = Console(width=max(Console().width, 110))  # full case names even when piped
    console.print(table)
    failed = report.failures()
    console.print(f"{len(report.rows) - len(failed)} passed, {len(failed)} failed")
    return 0 if report.passed else 1
