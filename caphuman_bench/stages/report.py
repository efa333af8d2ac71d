"""Stage 4 — report: aggregates per run (`results.json`), leaderboards across runs, and `compare`.

Reads `scores.parquet`, `status.jsonl`, `run.json`, `scoring.json` of each run and the benchmark spec
it names; never the models. Every number in `results.json` travels with its convention and the run's
provenance, and is written to a fixed number of significant digits (`report/numbers.py`), so
aggregating the same scores again writes the same bytes. Statistics, breakdowns, figures and the HTML
pages live in `caphuman_bench/report/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from caphuman_bench.atomic import write_json_atomic, write_text_atomic
from caphuman_bench.errors import BenchError
from caphuman_bench.numerics import precision_label
from caphuman_bench.registry import all_metrics, family_class, family_values, metric_direction, split_variant, variant_name
from caphuman_bench.report.breakdowns import breakdowns_json, per_image, run_spec
from caphuman_bench.report.cache import AggregateCache, run_key
from caphuman_bench.report.numbers import fmt_interval, rounded
from caphuman_bench.report.pages import protocols
from caphuman_bench.report.stats import (
    PairedResult,
    paired_comparison,
    recogniser_agreement,
    recogniser_means,
    summarise,
)
from caphuman_bench.rundir import RunDir
from caphuman_bench.stages.score import read_scores

IDENTITY_FAMILIES = ("id_sim_facenet", "id_sim_arcface", "id_sim_dlib")
PAIRED_FIELDS = [f.name for f in dataclasses.fields(PairedResult)]


def value_order(present: Iterable[str] = ()) -> list[str]:
    """Reported values in the reader's order: the face-detection rate, then the identity metrics
    beside it (a similarity means little without the rate it was computed on), then the rest. The
    values of a family scored by another model among `present` (`rmse_pose[emoca_v2]`) follow their
    family's own, one model after another."""
    families = all_metrics()
    ranked = sorted(enumerate(families.items()), key=lambda t: (0 if t[1][0] == "face_detection" else
                                                                1 if t[1][0] in IDENTITY_FAMILIES else 2, t[0]))
    present = set(present)
    variants = sorted({variant for name in present if (variant := split_variant(name)[1])})
    order = []
    for _, (_, cls) in ranked:
        values = list(cls.info.higher_is_better)
        order += values
        for variant in variants:
            order += [named for value in values if (named := variant_name(value, variant)) in present]
    return order


def scored_values(scores: pd.DataFrame) -> tuple[list[str], dict[str, tuple[bool, str]]]:
    """Value names present in `scores` (reader's order) → (higher_is_better, family); a family scored by
    another model (`head_control[emoca_v2]`) brings its values under their own names (`rmse_pose[emoca_v2]`)."""
    found = {}
    for family in sorted(set(scores["metric"])) if len(scores) else []:
        for value_name, higher in family_values(family).items():
            if value_name in scores:
                found[value_name] = (higher, family)
    return [v for v in value_order(found) if v in found], found


def aggregate_run(run: RunDir) -> dict:
    """A run's results from its files, in memory: reading never writes into a run directory
    (`write_run_results` does, after `run` or `score`)."""
    run.require()
    info = run.info()
    scores = read_scores(run)
    conventions, statuses = {}, {}
    for family, rows in scores.groupby("metric", sort=True):
        cls = family_class(family)
        if cls is None:
            continue
        conventions[family] = cls.family_convention(family)
        statuses[family] = {str(k): int(v) for k, v in rows["status"].value_counts().sort_index().items()}
    names, found = scored_values(scores)
    bench = run_spec(run)
    table = per_image(run, scores, names, bench)
    metrics = {name: summarise(table[name].to_numpy(dtype=np.float64))
                     | {"higher_is_better": found[name][0], "family": found[name][1]} for name in names}
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
        "metrics": rounded(metrics),  # numbers only: parameters and provenance are written as they are
        "breakdowns": rounded(breakdowns_json(table, names, bench)),
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


def write_run_results(run: RunDir) -> dict:
    """Aggregate the run and write `<run>/results.json` and its own leaderboard (after `run` or
    `score`); returns the results. Under the lock that scores.parquet's merges take, so with several
    processes scoring one run the last to finish writes last and its results hold every row."""
    with run.lock("scores"):
        results = aggregate_run(run)
        write_json_atomic(run.results_file, results)
        write_leaderboard([results], run.path)
    return results


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


def precisions(res: dict) -> dict[str, str]:
    """Metric family → the arithmetic its rows were scored with (`numerics.precision_label`)."""
    return {family: precision_label(entry.get("numerics")) for family, entry in res.get("scored_with", {}).items()}


def leaderboard(results: list[dict]) -> pd.DataFrame:
    """Long table: one row per method × split × metric value."""
    rows = []
    for res, label in zip(results, board_labels(results)):
        precision = precisions(res)
        for name, m in res["metrics"].items():
            rows.append({"method": label, "split": res["split"], "benchmark_version": res["benchmark_version"],
                         "metric": name, "mean": m["mean"], "std": m["std"], "n": m["n"],
                         "ci95_low": (m["ci95"] or [None, None])[0], "ci95_high": (m["ci95"] or [None, None])[1],
                         "higher_is_better": m["higher_is_better"], "images_ok": res["images"]["ok"],
                         "head_input": res.get("head_input", "none"),
                         "protocol": protocols(res).get(m.get("family", ""), ""),
                         "precision": precision.get(m.get("family", ""), precision_label(None)),
                         "config_hash": res["provenance"].get("config_hash", "")[:12]})
    return pd.DataFrame(rows)


def leaderboard_wide(board: pd.DataFrame) -> pd.DataFrame:
    """One row per run: head input, images, then each value as 'mean [95 % interval]' (reader's order),
    with its n appended where fewer images than finished carry it (no face, not scored)."""
    if board.empty:
        return board
    order = {v: i for i, v in enumerate(value_order(board["metric"]))}
    metrics = sorted(set(board["metric"]), key=lambda m: (order.get(m, len(order)), m))
    rows = []
    for (method, split), part in board.groupby(["method", "split"], sort=False):
        row = {"method": method, "split": split, "head input": part["head_input"].iloc[0],
               "protocol": ", ".join(sorted({p for p in part["protocol"] if p})) or "–",
               "images": int(part["images_ok"].iloc[0])}
        cells = {r["metric"]: r for r in part.to_dict(orient="records")}
        for metric in metrics:
            r = cells.get(metric)
            if r is None:
                row[metric] = "–"
                continue
            ci = None if _number(r["ci95_low"]) is None else [r["ci95_low"], r["ci95_high"]]
            partial = _number(r["mean"]) is not None and r["n"] < row["images"]
            row[metric] = fmt_interval(_number(r["mean"]), ci) + (f" (n={r['n']})" if partial else "")
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(wide: pd.DataFrame) -> str:
    if wide.empty:
        return "(no scored runs)\n"
    arrows = {c: "↑" if higher else "↓" for c in wide.columns if (higher := metric_direction(c)) is not None}
    header = [c if c not in arrows else f"{c} {arrows[c]}" for c in wide.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in wide.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in wide.columns) + " |")
    note = ("\nMean [95 % bootstrap interval over images]; (n=…) where fewer images than finished carry the value. "
            "face_detection is the rate the identity similarities were computed on.\n")
    return "\n".join(lines) + "\n" + note


def write_leaderboard(results: list[dict], out_dir: Path) -> pd.DataFrame:
    out_dir.mkdir(parents=True, exist_ok=True)
    board = leaderboard(results)
    wide = leaderboard_wide(board)
    write_text_atomic(out_dir / "leaderboard.md", to_markdown(wide))
    write_text_atomic(out_dir / "leaderboard.csv", board.to_csv(index=False))
    write_json_atomic(out_dir / "leaderboard.json", {"rows": board.to_dict(orient="records")})
    write_text_atomic(out_dir / "breakdowns.csv", breakdowns_table(results).to_csv(index=False))
    agreement = recogniser_agreement(recogniser_means(results, board_labels(results)))
    write_text_atomic(out_dir / "recognisers.csv", pd.DataFrame(rounded(agreement), columns=[
        "recogniser_a", "recogniser_b", "methods", "kendall_tau", "p_value"]).to_csv(index=False))
    return wide


def breakdowns_table(results: list[dict]) -> pd.DataFrame:
    """Every run's breakdowns as one long table: method, split, axis, group, metric, mean, std, n, interval."""
    rows = []
    for res, label in zip(results, board_labels(results)):
        for axis, groups in res.get("breakdowns", {}).items():
            for group, values in groups.items():
                for metric, m in values.items():
                    low, high = m.get("ci95") or (None, None)
                    rows.append({"method": label, "split": res["split"], "axis": axis, "group": group, "metric": metric,
                                 "mean": m["mean"], "std": m["std"], "n": m["n"], "ci95_low": low, "ci95_high": high})
    return pd.DataFrame(rows, columns=["method", "split", "axis", "group", "metric", "mean", "std", "n", "ci95_low",
                                       "ci95_high"])


def aggregate_runs(runs: list[RunDir], cache: AggregateCache | None = None) -> list[dict]:
    """Each run's results, read from `cache` where its inputs are unchanged (`report/cache.py`)."""
    cache = cache or AggregateCache(None)
    results = []
    for run in runs:
        key = run_key(run.require())
        res = cache.get("aggregates", key)
        if res is None:
            res = json.loads(json.dumps(aggregate_run(run)))  # as a cached copy reads: tuples are lists
            cache.put("aggregates", key, res)
        results.append(res)
    return results


def paired_pairs(results: list[dict], runs: list[RunDir], labels: list[str],
                 cache: AggregateCache | None = None) -> dict[tuple[int, int], list[PairedResult]]:
    """(i, j) → the paired comparisons (run i − run j, i < j) on the headline values, for every two
    runs planned on the same tasks. Each run's per-image table is read once; pairs are cached under
    both runs' keys."""
    from caphuman_bench.report.pages import HEADLINE

    cache = cache or AggregateCache(None)
    keys = [run_key(r) for r in runs]
    tables: dict[int, tuple] = {}
    pairs = {}
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            try:
                same_tasks(runs[i], runs[j])
            except BenchError:
                continue
            pair_key = hashlib.sha256(f"{keys[i]} {keys[j]} {','.join(HEADLINE)}".encode()).hexdigest()
            cached = cache.get("paired", pair_key)
            if cached is not None:
                compared = [PairedResult(**{f: r[f] for f in PAIRED_FIELDS}) for r in cached]
            else:
                for k in (i, j):
                    if k not in tables:
                        tables[k] = per_image_scores(runs[k])
                compared = [r for r in paired_from_tables(tables[i], tables[j]) if r.metric in HEADLINE]
                cache.put("paired", pair_key, [r.to_dict() for r in compared])
            if compared:
                pairs[(i, j)] = compared
    return pairs


def write_html(results: list[dict], runs: list[RunDir], out_dir: Path, grid_tasks: int = 6,
               cache: AggregateCache | None = None) -> Path:
    """report.html: leaderboard with intervals, figures, breakdowns, paired comparisons, samples, the paper."""
    from caphuman_bench.report.pages import report_page

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = board_labels(results)
    out = out_dir / "report.html"
    order = value_order(name for res in results for name in res["metrics"])
    write_text_atomic(out, report_page(results, runs, labels, order, paired_pairs(results, runs, labels, cache),
                                       grid_tasks=grid_tasks, cache=cache,
                                       reconstructors=reconstructor_matrices(results, runs, labels)))
    return out


def reconstructor_matrices(results: list[dict], runs: list[RunDir], labels: list[str]) -> list[dict]:
    """Per method, head control by condition × scoring reconstructor, overall and per |yaw| bin of the
    target (`report/reconstructors.py`); none unless more than one reconstructor made or scored it."""
    from caphuman_bench.report.reconstructors import matrices, scorers, shown, target_yaws

    if not runs or not shown(results):
        return []
    tables = []
    for res, run in zip(results, runs):
        table = None
        if scorers(res):
            table = per_image_scores(run)[0].reset_index()
            table["target_yaw"] = target_yaws(run, table, run_spec(run))
        tables.append(table)
    return matrices(results, labels, tables)


def write_latex(results: list[dict], out_dir: Path, runs: list[RunDir] | None = None) -> Path:
    """leaderboard.tex: the headline values as a booktabs table (mean ± half the 95 % interval); with the
    runs, and more than one reconstructor, the reconstructor matrices after it."""
    from caphuman_bench.report.latex import latex_table, reconstructor_tables
    from caphuman_bench.report.pages import HEADLINE

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "leaderboard.tex"
    labels = board_labels(results)
    text = latex_table(results, labels, [v for v in value_order() if v in HEADLINE])
    write_text_atomic(out, text + reconstructor_tables(reconstructor_matrices(results, runs or [], labels)))
    return out


def write_ablation(results: list[dict], out_dir: Path, runs: list[RunDir] | None = None) -> Path:
    """ablation.html with ablation_tau.{png,svg} and ablation_features_<metric>.{png,svg} beside it;
    with the variants' `runs`, each variant is also compared image by image with the first one."""
    from caphuman_bench.report.pages import HEADLINE, ablation_page, variant_names

    out_dir.mkdir(parents=True, exist_ok=True)
    identity = [v for v in value_order() if v.startswith("id_sim")]
    head = [v for v in ("rmse_pose", "pose_error_deg", "mp_pose_error_deg") if any(v in r["metrics"] for r in results)]
    labels = board_labels(results)
    names = variant_names(results)
    paired = []
    for run, name in zip((runs or [])[1:], names[1:]):
        if run.path != runs[0].path:  # variants with the same parameters share a run
            paired.append((name, names[0], [r for r in compare_paired(run, runs[0]) if r.metric in HEADLINE]))
    page, _ = ablation_page(results, labels, value_order(name for res in results for name in res["metrics"]), out_dir,
                            identity, head, paired, runs, reconstructors=reconstructor_matrices(results, runs or [], labels))
    out = out_dir / "ablation.html"
    write_text_atomic(out, page)
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


def compare(old_path: Path, new_path: Path, tolerance: float,
            per_metric: dict[str, float] | None = None) -> tuple[pd.DataFrame, bool, list[str]]:
    """Differences NEW − OLD per (method, split, metric). A regression is a change for the worse
    beyond the tolerance (absolute, in the metric's own units), or a number OLD has and NEW lacks
    (missing, or not a number): a gate must not pass because a metric stopped being computed.
    Also returns warnings for the values OLD and NEW scored under different arithmetic."""
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
    return pd.DataFrame(rows), regressed, precision_warnings(old, new)


def precision_warnings(old: dict, new: dict) -> list[str]:
    """One line per (method, split) and pair of arithmetics where the two boards' values were scored
    differently (device kind, dtype, TF32; `unrecorded` before scoring.json recorded it)."""
    differing: dict[tuple[str, str, str, str], list[str]] = {}
    for key in sorted(set(old) & set(new)):
        was, now = (row.get("precision") or precision_label(None) for row in (old[key], new[key]))
        if was != now:
            differing.setdefault((key[0], key[1], was, now), []).append(key[2])
    return [f"{method} ({split}): {', '.join(values)} scored under different precision: {was} in OLD, {now} in NEW; "
            "their differences include the arithmetic's" for (method, split, was, now), values in differing.items()]


def same_tasks(a: RunDir, b: RunDir) -> None:
    """Refuse a paired comparison of runs that were not planned on the same tasks of the same spec."""
    spec_a, spec_b = a.info()["benchmark"], b.info()["benchmark"]
    if spec_a.get("spec_hash") != spec_b.get("spec_hash"):
        raise BenchError(f"{a.path} and {b.path}: planned on different benchmark specs (field 'benchmark.spec_hash' "
                         f"{str(spec_a.get('spec_hash'))[:12]} != {str(spec_b.get('spec_hash'))[:12]}); "
                         "a paired comparison needs the same tasks")
    keys_a = {t.task_id: (t.identity_id, t.prompt_id, t.condition_id, t.sample) for t in a.tasks()}
    keys_b = {t.task_id: (t.identity_id, t.prompt_id, t.condition_id, t.sample) for t in b.tasks()}
    if keys_a != keys_b:
        only_a, only_b = sorted(set(keys_a) - set(keys_b)), sorted(set(keys_b) - set(keys_a))
        example = (only_a or only_b or [""])[0]
        raise BenchError(f"{a.tasks_file} and {b.tasks_file}: the runs' tasks differ ({len(only_a)} only in the first, "
                         f"{len(only_b)} only in the second, e.g. {example!r}); a paired comparison needs the same tasks "
                         "(same split, identities and samples)")


def per_image_scores(run: RunDir) -> tuple[pd.DataFrame, dict[str, tuple[bool, str]]]:
    """The run's per-image table (one row per task) and its values' (higher_is_better, family)."""
    scores = read_scores(run)
    names, found = scored_values(scores)
    return per_image(run, scores, names, run_spec(run)).set_index("task_id"), found


def compare_paired(a: RunDir, b: RunDir, metrics: list[str] | None = None) -> list[PairedResult]:
    """A − B per image on every value both runs scored (or `metrics`), paired over the same tasks."""
    a.require(), b.require()
    same_tasks(a, b)
    return paired_from_tables(per_image_scores(a), per_image_scores(b), metrics)


def paired_from_tables(a: tuple[pd.DataFrame, dict], b: tuple[pd.DataFrame, dict],
                       metrics: list[str] | None = None) -> list[PairedResult]:
    """A − B per image from two runs' `per_image_scores` (runs already checked to share their tasks)."""
    (table_a, found_a), (table_b, found_b) = a, b
    names = [v for v in value_order(found_a) if v in found_a and v in found_b]
    if metrics:
        unknown = [m for m in metrics if m not in names]
        if unknown:
            raise BenchError(f"--metrics {unknown[0]!r}: not scored in both runs (both have: {', '.join(names) or 'none'})")
        names = [v for v in names if v in metrics]
    table_b = table_b.loc[table_a.index]
    return [paired_comparison(table_a[v].to_numpy(dtype=np.float64), table_b[v].to_numpy(dtype=np.float64), v,
                              found_a[v][0]) for v in names]


def paired_table(results: list[PairedResult]) -> pd.DataFrame:
    """The paired comparison as rows, numbers rounded as they are written."""
    return pd.DataFrame([rounded(r.to_dict()) for r in results],
                        columns=["metric", "higher_is_better", "n", "mean_a", "mean_b", "difference", "ci95",
                                 "p_wilcoxon", "p_sign", "significant"])
