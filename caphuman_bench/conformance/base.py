"""What every known-answer check reports: one row per compared output, with its tolerance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from caphuman_bench.errors import BenchError


@dataclass
class ConformanceRow:
    case: str
    output: str
    max_abs: float
    max_rel: float  # max_abs / max |reference|
    tolerance: float
    relative: bool = False  # the tolerance bounds max_rel rather than max_abs

    @property
    def passed(self) -> bool:
        return (self.max_rel if self.relative else self.max_abs) <= self.tolerance


@dataclass
class ConformanceReport:
    reference_dir: Path
    variant: str
    rows: list[ConformanceRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    def failures(self) -> list[ConformanceRow]:
        return [row for row in self.rows if not row.passed]


def compare(case: str, output: str, port: torch.Tensor, reference: torch.Tensor, tolerance: float,
            relative: bool = False) -> ConformanceRow:
    """Max |port - reference| (and that over max |reference|); shapes must agree."""
    if tuple(port.shape) != tuple(reference.shape):
        raise BenchError(f"case {case!r}: {output} has shape {list(port.shape)}, reference {list(reference.shape)}")
    diff = (port.detach().double().cpu() - reference.double().cpu()).abs().max().item() if port.numel() else 0.0
    scale = reference.double().abs().max().item() if reference.numel() else 0.0
    return ConformanceRow(case, output, diff, diff / scale if scale > 0 else diff, tolerance, relative)


def required(reference_dir: Path, name: str) -> Path:
    path = Path(reference_dir) / name
    if not path.exists():
        raise BenchError(f"{path}: missing (a conformance reference directory needs {name})")
    return path
