"""Per-image scores joined with the tasks and the spec, and the benchmark's splits as breakdowns.

One row per planned task: identity, prompt, prompt category, head condition, its yaw and |yaw| bin,
and one column per reported value (NaN = not scored). A breakdown summarises each value per group;
weighted by n, the groups' means sum back to the overall mean (every image is in exactly one group).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from caphuman_bench.benchmark import Benchmark, spec_files_hash
from caphuman_bench.report.stats import summarise
from caphuman_bench.rundir import RunDir

YAW_BINS = (0.0, 10.0, 30.0, 60.0, 180.01)
YAW_LABELS = ("|yaw| < 10°", "|yaw| 10–30°", "|yaw| 30–60°", "|yaw| ≥ 60°")
AXES = {"condition": "condition_id", "abs_yaw": "yaw_bin", "category": "category", "identity": "identity_id"}
AXIS_TITLES = {"condition": "head condition", "abs_yaw": "|yaw| bin", "category": "prompt category",
               "identity": "identity"}


_SPECS: dict[tuple, Benchmark] = {}  # parsed once per process for the runs that name the same spec


def run_spec(run: RunDir) -> Benchmark:
    """The benchmark spec a run was planned with: a spec edited or broken since is refused, never read
    as it is now (an edited category or yaw would move the same scores to other groups). Parsed once per
    process for the runs that share it, keyed by the hash of its files' bytes, so an edit is always seen."""
    planned = run.info()["benchmark"]
    try:
        key = (planned["spec_root"], planned.get("identities_dir"), spec_files_hash(Path(planned["spec_root"])))
    except OSError:  # moved or unreadable: load_planned says so
        return Benchmark.load_planned(planned, run.run_json)
    if key[2] != planned["spec_hash"] or key not in _SPECS:
        _SPECS[key] = Benchmark.load_planned(planned, run.run_json)  # refuses a changed spec
    return _SPECS[key]


def yaw_bin(yaw: float, edges: tuple[float, ...] = YAW_BINS, labels: tuple[str, ...] = YAW_LABELS) -> str | None:
    """The label of |yaw|'s bin (bin i is [edges[i], edges[i + 1]), the last open-ended); None for no yaw."""
    if yaw is None or np.isnan(yaw):
        return None
    index = int(np.searchsorted(edges, abs(float(yaw)), side="right")) - 1
    return labels[min(max(index, 0), len(labels) - 1)]


def per_image(run: RunDir, scores: pd.DataFrame, value_names: list[str], bench: Benchmark | None) -> pd.DataFrame:
    """One row per planned task with its split keys and every value in `value_names` (NaN when unscored).

    `scores.parquet` holds one row per image per metric family; a value lives in its family's row only.
    """
    tasks = pd.DataFrame([t.to_dict() for t in run.tasks()],
                         columns=["task_id", "identity_id", "prompt_id", "condition_id", "sample", "seed"])
    present = [v for v in value_names if v in scores.columns]
    if len(scores) and present:
        values = scores.groupby("task_id")[present].first()  # first non-null per column
    else:
        values = pd.DataFrame(columns=present, index=pd.Index([], name="task_id"))
    table = tasks.merge(values.reset_index(), on="task_id", how="left")
    for name in value_names:
        if name not in table:
            table[name] = np.nan
    prompts = bench.prompts if bench else {}
    conditions = bench.conditions if bench else {}
    table["category"] = [prompts[p].category if p in prompts else "unknown" for p in table["prompt_id"]]
    table["yaw"] = [conditions[c].yaw if c in conditions else np.nan for c in table["condition_id"]]
    table["yaw_bin"] = [yaw_bin(y) or "unknown" for y in table["yaw"]]
    return table


def group_order(table: pd.DataFrame, axis: str, bench: Benchmark | None) -> list[str]:
    """Groups in the reader's order: the spec's order of conditions and categories, bins by |yaw|."""
    column = AXES[axis]
    present = list(dict.fromkeys(table[column]))
    if axis == "condition" and bench:
        order = list(bench.conditions)
    elif axis == "category" and bench:
        order = list(dict.fromkeys(p.category for p in bench.prompts.values()))
    elif axis == "abs_yaw":
        order = list(YAW_LABELS)
    else:
        order = sorted(present)
    return [g for g in order if g in present] + sorted(g for g in present if g not in order)


def breakdown(table: pd.DataFrame, axis: str, value_names: list[str], bench: Benchmark | None = None) -> pd.DataFrame:
    """Long table: group, metric, mean, std, n, ci95_low, ci95_high (unrounded; groups in reader's order)."""
    column = AXES[axis]
    rows = []
    for group in group_order(table, axis, bench):
        part = table[table[column] == group]
        for name in value_names:
            s = summarise(part[name].to_numpy(dtype=np.float64))
            if s["n"] == 0:
                continue
            low, high = s["ci95"] or (None, None)
            rows.append({"axis": axis, "group": group, "metric": name, "mean": s["mean"], "std": s["std"],
                         "n": s["n"], "ci95_low": low, "ci95_high": high})
    return pd.DataFrame(rows, columns=["axis", "group", "metric", "mean", "std", "n", "ci95_low", "ci95_high"])


def breakdowns_json(table: pd.DataFrame, value_names: list[str], bench: Benchmark | None) -> dict:
    """{axis: {group: {metric: {mean, std, n, ci95}}}} for results.json."""
    out: dict = {}
    for axis in AXES:
        frame = breakdown(table, axis, value_names, bench)
        groups: dict = {}
        for row in frame.itertuples(index=False):
            ci = None if row.ci95_low is None or pd.isna(row.ci95_low) else [row.ci95_low, row.ci95_high]
            groups.setdefault(row.group, {})[row.metric] = {
                "mean": row.mean, "std": None if pd.isna(row.std) else row.std, "n": int(row.n), "ci95": ci}
        out[axis] = groups
    return out

