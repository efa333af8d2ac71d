"""`score`, `report`, `compare`: the commands that read and score what runs wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from caphuman_bench.cli.common import (
    HEAD_RECONSTRUCTOR_HELP,
    PROTOCOL_HELP,
    Device,
    RunsDir,
    app,
    console,
    out,
    parse_pairs,
    print_results,
    print_rows,
    print_scores,
    progress_bar,
    score_options,
)
from caphuman_bench.errors import BenchError


@app.command()
def score(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (finished or partial).")],
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated metric names (default: all with weights present).")] = None,
    device: Device = "auto",
    no_face: Annotated[str, typer.Option("--no-face", help="zero (default) or skip.")] = "zero",
    clip_model: Annotated[Optional[str], typer.Option("--clip-model", help="ViT-L-14 (default) or ViT-B-32.")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help=PROTOCOL_HELP)] = "fastcomposer",
    weights_path: Annotated[Optional[list[str]], typer.Option("--weights", help="Explicit weights file: ID=PATH.")] = None,
    head_reconstructor: Annotated[Optional[list[str]], typer.Option("--head-reconstructor", help=HEAD_RECONSTRUCTOR_HELP)] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="i/n (default: RANK/WORLD_SIZE).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rescore pairs already in scores.parquet.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per metric batch.")] = 8,
    diversity_groups: Annotated[Optional[str], typer.Option("--diversity-groups", help="face_diversity compares an image with the other samples of its identity-prompt-condition (default) or identity-prompt.")] = None,
):
    """Score the finished images of a run and write scores.parquet and results.json. Exit 1 if an image could not be scored.

    Example: caphuman-bench score runs/caphuman-demo-0123456789 --metrics face_detection,id_sim_dlib
    Example: caphuman-bench score RUN --metrics head_control --head-reconstructor deca --head-reconstructor emoca_v2
    """
    from caphuman_bench.quiet import run_log
    from caphuman_bench.rundir import RunDir
    from caphuman_bench.runner import pick_device
    from caphuman_bench.stages.plan import parse_shard
    from caphuman_bench.stages.report import write_run_results
    from caphuman_bench.stages.score import metrics_to_run
    from caphuman_bench.stages.score import score as score_stage

    run_ = RunDir(run_dir).require()
    names = metrics.split(",") if metrics else None
    options = score_options(no_face, clip_model, weights_path, protocol, head_reconstructor)
    if diversity_groups:
        from caphuman_bench.metrics.face_diversity import DIVERSITY_GROUPS

        if diversity_groups not in DIVERSITY_GROUPS:
            raise BenchError(f"--diversity-groups {diversity_groups!r}: expected one of {', '.join(DIVERSITY_GROUPS)}")
        options["diversity_groups"] = diversity_groups
    metrics_to_run(names, options)  # a named metric that cannot run stops here, before any image is read
    with run_log(run_.log_file):
        with progress_bar() as progress:
            summary = score_stage(run_, metrics=names, device=pick_device(device), options=options, shard=parse_shard(shard),
                                  force=force, batch_size=batch_size, progress=progress)
        print_scores(summary, run_.path)
        results = write_run_results(run_)
    print_results([results])
    if summary.errors:
        raise typer.Exit(1)


@app.command()
def report(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Run directories, or folders of runs (default: --runs-dir).")] = None,
    runs_dir: RunsDir = Path("runs"),
    out_dir: Annotated[Path, typer.Option("--out", help="Where leaderboard.{md,csv,json} (and report.html) go.")] = Path("reports"),
    html_report: Annotated[bool, typer.Option("--html", help="Also write a self-contained report.html with plots and samples.")] = False,
    grid_tasks: Annotated[int, typer.Option("--grid-tasks", help="Tasks shown across methods in report.html's sample grid.")] = 6,
    latex: Annotated[bool, typer.Option("--latex", help="Also write leaderboard.tex: a booktabs table (mean ± CI) for a paper.")] = False,
):
    """Aggregate runs into a leaderboard (Markdown, CSV, JSON); the run directories are only read.

    Example: caphuman-bench report runs/ --out reports/smoke --html
    """
    from caphuman_bench.report.cache import AggregateCache
    from caphuman_bench.stages.report import (
        aggregate_runs,
        find_runs,
        write_html,
        write_latex,
        write_leaderboard,
    )

    found = find_runs(runs or [runs_dir])
    if not found:
        raise BenchError(f"no run directories under {', '.join(map(str, runs or [runs_dir]))}")
    cache = AggregateCache(out_dir / ".cache")  # per-run aggregates under the hash of their inputs
    results = aggregate_runs(found, cache)
    unscored = [str(r.path) for r, res in zip(found, results) if not res["metrics"]]
    if unscored:
        console.print(f"[yellow]no scores yet[/] in {escape(', '.join(unscored))}: `caphuman-bench score RUN` scores them",
                      soft_wrap=True)
    wide = write_leaderboard(results, out_dir)
    if html_report:
        console.print(f"wrote {write_html(results, found, out_dir, grid_tasks=grid_tasks, cache=cache)}")
    if latex:
        console.print(f"wrote {write_latex(results, out_dir, found)}")
    from caphuman_bench.stages.report import to_markdown

    out.print(to_markdown(wide), markup=False, highlight=False, soft_wrap=True)
    console.print(f"leaderboard of {len(found)} run(s) → {out_dir}/leaderboard.{{md,csv,json}}, breakdowns.csv, recognisers.csv",
                  soft_wrap=True)


@app.command()
def compare(
    old: Annotated[Path, typer.Argument(help="Baseline leaderboard.json or results.json (with --paired: run directory A).")],
    new: Annotated[Path, typer.Argument(help="Candidate leaderboard.json or results.json (with --paired: run directory B).")],
    tolerance: Annotated[float, typer.Option("--tolerance", min=0.0, help="Largest change for the worse allowed (absolute, metric units).")] = 0.01,
    metric_tolerance: Annotated[Optional[list[str]], typer.Option("--metric-tolerance", help="Per-metric tolerance: NAME=VALUE.")] = None,
    paired: Annotated[bool, typer.Option("--paired", help="Compare two runs image by image: paired bootstrap interval and Wilcoxon p of A − B.")] = False,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="With --paired: comma-separated values to compare (default: all both runs scored).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (rows, verdict, warnings).")] = False,
):
    """Leaderboard gate for CI: exit 1 when a metric got worse beyond tolerance; --paired compares two runs per image.

    With --paired, two run directories planned on the same tasks are compared per image (no gate).

    Example: caphuman-bench compare reports/leaderboard.json runs/new/leaderboard.json --tolerance 0.02
    Example: caphuman-bench compare --paired runs/caphuman-full-… runs/ip_adapter_controlnet-full-…
    """
    from caphuman_bench.report.numbers import fmt, rounded

    if paired:
        from caphuman_bench.report.stats import paired_sentence
        from caphuman_bench.rundir import RunDir
        from caphuman_bench.stages.report import compare_paired

        run_a, run_b = RunDir(old), RunDir(new)
        results = compare_paired(run_a, run_b, metrics.split(",") if metrics else None)
        if not results:
            raise BenchError(f"{old} and {new}: no value is scored in both runs; `caphuman-bench score RUN` scores a run")
        name_a, name_b = run_a.info()["label"], run_b.info()["label"]
        if name_a == name_b:
            name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
        significant = [r.metric for r in results if r.to_dict().get("significant")]
        verdict = (f"A = {name_a}, B = {name_b}: {len(significant)} of {len(results)} values differ significantly"
                   + (f" ({', '.join(significant)})" if significant else ""))
        if as_json:
            out.print_json(json.dumps({"a": name_a, "b": name_b, "rows": [rounded(r.to_dict()) for r in results],
                                       "verdict": verdict}, default=str))
            return
        rows = []
        for r in results:
            d = r.to_dict()
            ci = d.get("ci95") or [None, None]
            rows.append([d["metric"], str(d["n"]), fmt(d["mean_a"]), fmt(d["mean_b"]), fmt(d["difference"]),
                         f"[{fmt(ci[0])}, {fmt(ci[1])}]", fmt(d["p_wilcoxon"]), "yes" if d["significant"] else "no"])
        print_rows(["metric", "n", "mean A", "mean B", "A − B", "95 % CI", "p (Wilcoxon)", "significant"], rows)
        for result in results:
            out.print(paired_sentence(result, name_a, name_b), markup=False, highlight=False, soft_wrap=True)
        out.print(verdict, markup=False, highlight=False, soft_wrap=True)
        return
    from caphuman_bench.stages.report import compare as compare_boards

    tolerances = {}
    for name, value in parse_pairs(metric_tolerance, "--metric-tolerance").items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise BenchError(f"--metric-tolerance {name}={value!r}: expected a finite number >= 0")
        tolerances[name] = float(value)
    if not math.isfinite(tolerance):
        raise BenchError(f"--tolerance {tolerance}: expected a finite number >= 0")
    table, regressed, warnings = compare_boards(old, new, tolerance, tolerances)
    rows = rounded(table.to_dict("records"))
    worse = [f"{r['metric']} of {r['method']}" for r in rows if r["verdict"].startswith("REGRESSION")]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("same", "improved", "new")}
    verdict = (f"REGRESSION: {len(worse)} of {len(rows)} values worse beyond tolerance: {', '.join(worse)}" if regressed else
               f"OK: {len(rows)} values, none worse beyond tolerance ({counts['same']} same, {counts['improved']} improved, "
               f"{counts['new']} new)")
    if as_json:
        out.print_json(json.dumps({"rows": rows, "regressed": regressed, "verdict": verdict, "warnings": warnings}, default=str))
    else:
        for warning in warnings:
            console.print(f"[yellow]warning[/]: {escape(warning)}", soft_wrap=True)
        colour = {"improved": "green", "same": "", "new": "cyan"}
        print_rows(["metric", "method", "split", "old", "new", "new − old", "tolerance", "verdict"],
                   [[r["metric"], r["method"], r["split"], fmt(r["old"]), fmt(r["new"]), fmt(r["delta"]), fmt(r["tolerance"]),
                     f"[{colour.get(r['verdict']) or 'red'}]{r['verdict']}[/]" if colour.get(r["verdict"], "red") else r["verdict"]]
                    for r in rows], ids=3)
        (console if regressed else out).print(f"[red]{verdict}[/]" if regressed else verdict, soft_wrap=True)
    if regressed:
        raise typer.Exit(1)
