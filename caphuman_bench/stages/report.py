"""Stage 4 — report: aggregates per run (`results.json`), leaderboards across runs, and `compare`.

Reads `scores.parquet`, `status.jsonl`, `run.json` and `skipped_metrics.json` of each run; never the
models. Every number in `results.json` travels with its convention and the run's provenance.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from caphuman_bench.atomic import write_json_atomic, write_text_atomic
from caphuman_bench.errors import BenchError
from caphuman_bench.registry import all_metrics
from caphuman_bench.rundir import RunDir
from caphuman_bench.stages.score import read_scores

BOOTSTRAP_RESAMPLES = 1000


def bootstrap_ci95(values: np.ndarray, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap 95% interval of the mean (fixed seed: the same scores give the same interval)."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def aggregate_run(run: RunDir) -> dict:
    """A run's results from its files, in memory: reading never writes into a run directory
    (`write_run_results` does, after `run` or `score`)."""
    run.require()
    info = run.info()
    families = all_metrics()
    scores = read_scores(run)
    metrics, conventions, statuses = {}, {}, {}
    for family, rows in scores.groupby("metric", sort=True):
        cls = families.get(family)
        if cls is None:
            continue
        conventions[family] = dict(getattr(cls, "convention", {}) or {})
        statuses[family] = {str(k): int(v) for k, v in rows["status"].value_counts().sort_index().items()}
        for value_name, higher in cls.info.higher_is_better.items():
            if value_name not in rows:
                continue
            values = rows[value_name].astype(float).to_numpy()
            values = values[~np.isnan(values)]
            metrics[value_name] = {
                "mean": float(values.mean()) if len(values) else None,
                "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                "n": int(len(values)),
                "ci95": bootstrap_ci95(values),
                "higher_is_better": higher,
                "family": family,
            }
    status = run.latest_status()
    tasks = run.tasks()
    finished = run.finished_ids()
    scoring = run.scoring()
    results = {
        "method": info["label"],
        "method_card": info["method"]["name"],
        "head_input": info["method"].get("head_input", "none"),
        "benchmark": info["benchmark"]["name"],
        "benchmark_version": info["benchmark"]["version"],
        "split": info["benchmark"]["split"],
        "metrics": metrics,
        "conventions": conventions,
        "item_status": statuses,
        "scored_with": {family: entry for family, entry in scoring.get("metrics", {}).items() if family in conventions},
        "skipped_metrics": scoring.get("skipped_metrics", {}),
        "images": {"planned": len(tasks), "ok": len(finished),
                   "failed": sum(1 for r in status.values() if r["status"] == "failed"),
                   "missing": len(tasks) - len(finished)},
        "provenance": {k: info[k] for k in ("config_hash", "card_hash", "params", "head_inputs", "environment", "created") if k in info}
                      | {"spec_hash": info["benchmark"]["spec_hash"]},
    }
    return results


def write_run_results(run: RunDir, results: dict) -> None:
    """`<run>/results.json` and the run's own leaderboard (by the stages that write the run)."""
    write_json_atomic(run.results_file, results)
    write_leaderboard([results], run.path)


def find_runs(paths: list[Path]) -> list[RunDir]:
    """Run directories among `paths`: each path is a run, or a folder of runs."""
    runs = []
    for path in paths:
        if RunDir(path).exists():
            runs.append(RunDir(path))
        elif Path(path).is_dir():
            runs += [RunDir(p) for p in sorted(Path(path).iterdir()) if RunDir(p).exists()]
        else:
            raise BenchError(f"{path}: not a run directory or a folder of runs")
    return runs


def board_labels(results: list[dict]) -> list[str]:
    """Each run's leaderboard label; runs that share a label but not a configuration (another seed,
    spec or identities) get their config hash appended, so no row silently stands for two runs."""
    by_label: dict[tuple[str, str], set[str]] = {}
    for res in results:
        by_label.setdefault((res["method"], res["split"]), set()).add(res["provenance"].get("config_hash", ""))
    return [res["method"] + (f" #{res['provenance'].get('config_hash', '')[:8]}"
                             if len(by_label[(res["method"], res["split"])]) > 1 else "") for res in results]


def leaderboard(results: list[dict]) -> pd.DataFrame:
    """Long table: one row per method × split × metric value."""
    rows = []
    for res, label in zip(results, board_labels(results)):
        for name, m in res["metrics"].items():
            rows.append({"method": label, "split": res["split"], "benchmark_version": res["benchmark_version"],
                         "metric": name, "mean": m["mean"], "std": m["std"], "n": m["n"],
                         "ci95_low": (m["ci95"] or [None, None])[0], "ci95_high": (m["ci95"] or [None, None])[1],
                         "higher_is_better": m["higher_is_better"], "images_ok": res["images"]["ok"],
                         "head_input": res.get("head_input", "none"),
                         "config_hash": res["provenance"].get("config_hash", "")[:12]})
    return pd.DataFrame(rows)


def leaderboard_wide(board: pd.DataFrame) -> pd.DataFrame:
    if board.empty:
        return board
    wide = board.pivot_table(index=["method", "split"], columns="metric", values="mean", aggfunc="first")
    first = board.groupby(["method", "split"])[["images_ok", "head_input"]].first()
    wide.insert(0, "images", first["images_ok"])
    wide.insert(0, "head input", first["head_input"])
    return wide.reset_index()


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def to_markdown(wide: pd.DataFrame) -> str:
    if wide.empty:
        return "(no scored runs)\n"
    arrows = {}
    for cls in all_metrics().values():
        arrows.update({k: "↑" if v else "↓" for k, v in cls.info.higher_is_better.items()})
    header = [c if c not in arrows else f"{c} {arrows[c]}" for c in wide.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in wide.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in wide.columns) + " |")
    return "\n".join(lines) + "\n"


def write_leaderboard(results: list[dict], out_dir: Path) -> pd.DataFrame:
    out_dir.mkdir(parents=True, exist_ok=True)
    board = leaderboard(results)
    wide = leaderboard_wide(board)
    write_text_atomic(out_dir / "leaderboard.md", to_markdown(wide))
    write_text_atomic(out_dir / "leaderboard.csv", board.to_csv(index=False))
    write_json_atomic(out_dir / "leaderboard.json", {"rows": board.to_dict(orient="records")})
    return wide


def write_html(results: list[dict], runs: list[RunDir], out_dir: Path, thumbnails: int = 6) -> Path:
    """A single self-contained HTML page: leaderboard, one bar chart per metric, sample images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    board = leaderboard(results)
    wide = leaderboard_wide(board)
    parts = ["<!doctype html><meta charset='utf-8'><title>caphuman-bench report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{margin:2px}</style>",
             "<h1>caphuman-bench report</h1><h2>Leaderboard</h2>",
             wide.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="–")]
    for metric, rows in board.groupby("metric"):
        fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * len(rows)))
        labels = [f"{m} ({s})" for m, s in zip(rows["method"], rows["split"])]
        ax.barh(labels, rows["mean"].fillna(0), xerr=rows["std"].fillna(0), color="#4c72b0")
        ax.set_title(f"{metric} ({'higher' if rows['higher_is_better'].iloc[0] else 'lower'} is better)")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        parts.append(f"<img alt='{html.escape(metric)}' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>")
    parts.append("<h2>Samples</h2>")
    for run in runs:
        parts.append(f"<h3>{html.escape(run.info()['label'])}</h3>")
        for path in sorted(run.images_dir.glob("*.png"))[:thumbnails]:
            with Image.open(path) as img:
                img.thumbnail((160, 160))
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="JPEG", quality=85)
            parts.append(f"<img title='{html.escape(path.stem)}' src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>")
    out = out_dir / "report.html"
    write_text_atomic(out, "\n".join(parts))
    return out


def _rows_of(payload: dict | list, source: Path) -> dict[tuple[str, str, str], dict]:
    """(method, split, metric) → row, from a leaderboard.json or a results.json."""
    if isinstance(payload, dict) and "rows" in payload:
        rows = payload["rows"]
    elif isinstance(payload, dict) and "metrics" in payload:
        try:
            rows = leaderboard([payload]).to_dict(orient="records")
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
            raise BenchError(f"{source}: not a results.json of caphuman-bench ({type(exc).__name__}: {exc})") from None
    else:
        raise BenchError(f"{source}: neither a leaderboard.json (field 'rows') nor a results.json (field 'metrics')")
    if not isinstance(rows, list):
        raise BenchError(f"{source}: field 'rows' must be a list")
    keyed = {}
    for i, row in enumerate(rows):
        _check_row(row, f"{source}: rows[{i}]")
        key = (row["method"], row["split"], row["metric"])
        if key in keyed:
            raise BenchError(f"{source}: two rows for method {key[0]!r}, split {key[1]!r}, metric {key[2]!r}")
        keyed[key] = row
    return keyed


def _check_row(row, where: str) -> None:
    """A leaderboard row as `compare` reads it: names are strings, the mean a finite number or null."""
    if not isinstance(row, dict):
        raise BenchError(f"{where}: expected an object")
    for name in ("method", "split", "metric"):
        if not isinstance(row.get(name), str):
            raise BenchError(f"{where}: field {name!r} must be a string")
    mean = row.get("mean")
    if mean is not None and (isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean)):
        raise BenchError(f"{where}: field 'mean' {mean!r} must be a finite number or null")
    if not isinstance(row.get("higher_is_better"), bool):
        raise BenchError(f"{where}: field 'higher_is_better' must be true or false")


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def compare(old_path: Path, new_path: Path, tolerance: float, per_metric: dict[str, float] | None = None) -> tuple[pd.DataFrame, bool]:
    """Differences NEW − OLD per (method, split, metric). A regression is a change for the worse
    beyond the tolerance (absolute, in the metric's own units), or a number OLD has and NEW lacks
    (missing, or not a number): a gate must not pass because a metric stopped being computed."""
    per_metric = per_metric or {}
    loaded = []
    for path in (old_path, new_path):
        try:
            loaded.append(_rows_of(json.loads(Path(path).read_text()), Path(path)))
        except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
            raise BenchError(f"{path}: unreadable ({exc})") from None
    old, new = loaded
    if old and not set(old) & set(new):
        raise BenchError(f"{new_path}: no (method, split, metric) in common with {old_path}: nothing to compare")
    rows, regressed = [], False
    for key in sorted(set(old) | set(new)):
        o, n = old.get(key), new.get(key)
        tol = per_metric.get(key[2], tolerance)
        o_mean, n_mean = _number(o and o["mean"]), _number(n and n["mean"])
        delta = None
        if o is None:
            verdict = "new"
        elif o_mean is None:
            verdict = "same" if n_mean is None else "new"
        elif n_mean is None:
            verdict = "REGRESSION (missing)" if n is None else "REGRESSION (no value)"
        else:
            delta = n_mean - o_mean
            worse = -delta if o["higher_is_better"] else delta
            verdict = "REGRESSION" if worse > tol else ("improved" if worse < -tol else "same")
        regressed |= verdict.startswith("REGRESSION")
        rows.append({"method": key[0], "split": key[1], "metric": key[2], "old": o_mean, "new": n_mean,
                     "delta": delta, "tolerance": tol, "verdict": verdict})
    return pd.DataFrame(rows), regressed
