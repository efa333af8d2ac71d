"""The reconstructor matrix (issue 26): a method's head control with the head condition made by one FLAME
reconstructor (rows: run.json params `reconstructor`, default deca) and scored by another (columns: the
head_control families, `head_control` for DECA, `head_control[NAME]` for the others), overall and per
|yaw| bin of the target.

The target's yaw is read from the run's stored target (its global rotation, `targets/*.npz`), else the
head condition's (a method that stores none is steered to the condition itself). Bins are half-open,
[low, high); their edges sit between the benchmark's yaws (0, 20, 45, 60, 75, 90°), so a yaw read back
from an axis-angle vector (44.99999°) never changes bin: the paper's conditions fill the first three,
the `pose-extreme` split the last two, where reconstructors disagree most.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from caphuman_bench.benchmark import Benchmark, axis_angle_to_euler
from caphuman_bench.errors import BenchError
from caphuman_bench.registry import DEFAULT_RECONSTRUCTOR, split_variant, variant_name
from caphuman_bench.report import breakdowns
from caphuman_bench.report.stats import summarise
from caphuman_bench.report.titles import title
from caphuman_bench.rundir import RunDir

HEAD_FAMILY = "head_control"
MATRIX_VALUES = ("pose_error_deg", "rmse_exp")
YAW_EDGES = (0.0, 15.0, 30.0, 50.0, 70.0)
YAW_LABELS = ("0–15°", "15–30°", "30–50°", "50–70°", "≥ 70°")
ALL = "all"


def condition_reconstructor(res: dict) -> str:
    """The reconstructor that made a run's head condition (run.json params `reconstructor`, default deca)."""
    return str((res.get("provenance", {}).get("params") or {}).get("reconstructor") or DEFAULT_RECONSTRUCTOR)


def scorers(res: dict) -> list[str]:
    """The reconstructors that scored a run's head control (DECA first, then by name)."""
    found = {split_variant(m.get("family", ""))[1] or DEFAULT_RECONSTRUCTOR for m in res["metrics"].values()
             if split_variant(m.get("family", ""))[0] == HEAD_FAMILY}
    return sorted(found, key=lambda name: (name != DEFAULT_RECONSTRUCTOR, name))


def shown(results: list[dict]) -> bool:
    """The matrix is worth a section when more than one reconstructor made or scored head control."""
    scored = [res for res in results if scorers(res)]
    return len({condition_reconstructor(r) for r in scored} | {s for r in scored for s in scorers(r)}) > 1


def matrix_title(value: str, higher: bool | None = None) -> str:
    """A value's title without the reconstructor it names (each column has its own): 'Pose error (degrees) ↓'."""
    return re.sub(r"DECA,? ?", "", title(value, higher))


def yaw_bin(yaw: float) -> str | None:
    """The bin of a target's |yaw| in degrees (None for none): the breakdowns' rule on this section's edges."""
    return breakdowns.yaw_bin(yaw, YAW_EDGES, YAW_LABELS)


def target_yaws(run: RunDir, table: pd.DataFrame, bench: Benchmark | None) -> list[float]:
    """Per row of a per-image table, the yaw (degrees) of the target its image was scored against."""
    yaws: dict[tuple[str, str], float] = {}
    for identity_id, condition_id in zip(table["identity_id"], table["condition_id"]):
        key = (identity_id, condition_id)
        if key in yaws:
            continue
        try:
            target = run.read_target(identity_id, condition_id)
        except BenchError:  # a damaged target: the condition's yaw, as scoring falls back to nothing better
            target = None
        if target is not None and "pose" in target:
            yaws[key] = axis_angle_to_euler(np.asarray(target["pose"], dtype=np.float64).reshape(-1)[:3])[0]
        else:
            condition = bench.conditions.get(condition_id) if bench else None
            yaws[key] = float(condition.yaw) if condition else float("nan")
    return [yaws[key] for key in zip(table["identity_id"], table["condition_id"])]


def by_yaw(table: pd.DataFrame, value: str) -> dict[str, dict]:
    """`value` summarised (mean, std, n, 95 % interval) over all images, then per |yaw| bin of the target
    (column `target_yaw`, degrees); bins without a scored image are left out."""
    values = table[value].to_numpy(dtype=np.float64) if value in table else np.full(len(table), np.nan)
    out = {ALL: summarise(values)}
    bins = np.array([yaw_bin(y) for y in table["target_yaw"]], dtype=object)
    for label in YAW_LABELS:
        part = summarise(values[bins == label])
        if part["n"]:
            out[label] = part
    return out


def row_bins(cells: dict, condition: str, judges: list[str]) -> list[str]:
    """A condition's rows of a matrix: all images, then each |yaw| bin some scorer has images in."""
    return [ALL] + [b for b in YAW_LABELS if any(b in cells.get((condition, judge), {}) for judge in judges)]


def method_name(label: str) -> str:
    """A run label without its reconstructor override: the rows of one method's matrix share it."""
    name = re.sub(r"reconstructor=[^,\]]*,?", "", label).replace(",]", "]").replace("[]", "")
    return name.strip()


def matrices(results: list[dict], labels: list[str], tables: list[pd.DataFrame | None]) -> list[dict]:
    """Per method (its runs grouped by `method_name`) with more than one reconstructor, per value of
    `MATRIX_VALUES`: condition reconstructor × scoring reconstructor × (all, |yaw| bins) summaries.
    `tables[i]` is run i's per-image table with a `target_yaw` column (None: the run is left out)."""
    methods: dict[tuple[str, str], list[int]] = {}
    for i, (res, label) in enumerate(zip(results, labels)):
        if tables[i] is not None and scorers(res):
            methods.setdefault((method_name(label), res["split"]), []).append(i)
    out = []
    for (name, split), members in methods.items():
        conditions = sorted({condition_reconstructor(results[i]) for i in members},
                            key=lambda n: (n != DEFAULT_RECONSTRUCTOR, n))
        judges = sorted({s for i in members for s in scorers(results[i])}, key=lambda n: (n != DEFAULT_RECONSTRUCTOR, n))
        values = {}
        for value in MATRIX_VALUES:
            cells = {}
            for i in members:
                condition = condition_reconstructor(results[i])
                for judge in scorers(results[i]):
                    column = variant_name(value, None if judge == DEFAULT_RECONSTRUCTOR else judge)
                    if (condition, judge) not in cells and column in tables[i]:
                        cells[(condition, judge)] = by_yaw(tables[i], column)
            if any(c[ALL]["n"] for c in cells.values()):
                values[value] = cells
        if values and (len(conditions) > 1 or len(judges) > 1):  # one cell is the leaderboard's number again
            out.append({"method": name, "split": split, "conditions": conditions, "scorers": judges, "values": values})
    return out
