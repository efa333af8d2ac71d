"""`caphuman-bench`: a thin Typer layer over the stages (plan → generate → score → report)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from caphuman_bench.errors import BenchError

app = typer.Typer(help="HumanIPHC: the benchmark of identity-preserving, head-controllable portrait generation "
                  "(CapHuman, CVPR 2024).", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
weights_app = typer.Typer(help="Weights files: what is present, where it comes from, its licence.", no_args_is_help=True)
data_app = typer.Typer(help="The benchmark data: prepare CelebA identities, inspect the spec.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
app.add_typer(data_app, name="data")
console = Console(stderr=True)
out = Console()

RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Root of all run directories.")]
Spec = Annotated[Optional[Path], typer.Option("--spec", help="Benchmark spec folder (default: the shipped benchmark_data/humaniphc).")]
IdentitiesDir = Annotated[Optional[Path], typer.Option("--identities-dir", help="Folder of <identity>.jpg reference photos.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (GPU of this rank when present).")]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def _parse_pairs(values: list[str] | None, what: str) -> dict:
    pairs = {}
    for value in values or []:
        key, sep, raw = value.partition("=")
        if not sep or not key:
            raise BenchError(f"{what} {value!r}: expected KEY=VALUE")
        pairs[key.strip()] = yaml.safe_load(raw)
    return pairs


PROTOCOL_HELP = ("fastcomposer (default: the paper's evaluation — largest face, max(cos, 0), CLIP text with the class "
                 "word, tensor preprocessing) or caphuman-bench (most confident face, signed cosine, 'a person').")


def _weights_paths(values: list[str] | None) -> dict[str, str]:
    """`--weights ID=PATH` pairs; an id the manifest does not know is refused, never ignored."""
    from caphuman_bench import weights

    paths = {}
    for key, value in _parse_pairs(values, "--weights").items():
        if key not in weights.manifest():
            raise BenchError(f"--weights {key}=…: unknown weights id {key!r}; `caphuman-bench weights status` lists them")
        paths[key] = str(value)
    return paths


def _score_options(no_face: str, clip_model: Optional[str], weight_paths: list[str] | None, protocol: str = "fastcomposer") -> dict:
    from caphuman_bench.metrics._clip import CLIP_CHECKPOINTS

    if no_face not in ("zero", "skip"):
        raise BenchError(f"--no-face {no_face!r}: expected zero or skip")
    if protocol not in ("fastcomposer", "caphuman-bench"):
        raise BenchError(f"--protocol {protocol!r}: expected fastcomposer or caphuman-bench")
    options = {"no_face": no_face, "protocol": protocol, "weights_paths": _weights_paths(weight_paths)}
    if clip_model:
        if clip_model not in CLIP_CHECKPOINTS:
            raise BenchError(f"--clip-model {clip_model!r}: expected one of {', '.join(CLIP_CHECKPOINTS)}")
        options["clip_model"] = clip_model
    return options


def _print_scores(summary, run_dir: Path) -> None:
    for name, reason in summary.skipped.items():
        console.print(f"[yellow]skipped metric {name}[/]: {escape(reason)}", soft_wrap=True)
    for name, count in summary.errors.items():
        console.print(f"[red]metric {name}: {count} image(s) could not be scored[/] (status error; reasons in "
                      f"{escape(str(run_dir / 'scores.parquet'))}); the next `caphuman-bench score` retries them", soft_wrap=True)


def _preflight(card, bench, split: str, preset: Optional[str], overrides: dict, weights_paths: dict) -> None:
    """Everything a run needs that the user can fix, checked before `plan_run` writes the run folder:
    the card's parameters and the command line's overrides, the weights files, every reference photo."""
    from caphuman_bench.registry import get_method
    from caphuman_bench.stages.generate import method_weights

    params = get_method(card.adapter).validated_params(card, preset, overrides)
    method_weights(card, params, weights_paths)
    for identity_id in bench.split(split).identities:
        bench.reference_image(identity_id)


def _report_failures(failed: int, status_files: list[Path]) -> None:
    """The last line of a run with failed tasks; the caller exits 1."""
    console.print(f"[red]{failed} task(s) failed[/]; reasons in {escape(', '.join(map(str, status_files)))}", soft_wrap=True)


def _execute(card, bench, split, runs_dir, preset, overrides, seed, device, shard, force, generate_only, metrics,
             options, batch_size):
    """Pre-flight, plan, generate, score, aggregate. Returns (planned run, generate summary, results or None,
    images that could not be scored)."""
    from caphuman_bench.runner import pick_device, plan_run
    from caphuman_bench.stages.generate import generate
    from caphuman_bench.stages.report import write_run_results
    from caphuman_bench.stages.score import check_reference_faces, score

    device = pick_device(device)
    _preflight(card, bench, split, preset, overrides, options["weights_paths"])  # before any file is written
    if not generate_only:
        check_reference_faces(bench, bench.split(split).identities, metrics, options)
    planned = plan_run(card, bench, split, runs_dir, preset=preset, overrides=overrides, seed=seed)
    console.print(f"run [bold]{planned.label}[/] on split {split} → {planned.run.path} (device {device}, shard {shard.index}/{shard.count})")
    with _progress() as progress:
        gen = generate(planned.run, bench, card, planned.params, device=device, shard=shard, force=force,
                       weights_paths=options["weights_paths"], progress=progress)
    console.print(f"generated {gen.generated}, kept {gen.kept} finished, failed {gen.failed} of {gen.planned} tasks in this shard"
                  + (f", {gen.elsewhere} left to another process generating this run" if gen.elsewhere else ""), soft_wrap=True)
    for failure in gen.failures[:5]:
        console.print(f"[red]failed[/] {escape(failure)}", soft_wrap=True)
    if generate_only:
        return planned, gen, None, 0
    with _progress() as progress:
        summary = score(planned.run, metrics=metrics, device=device, options=options, shard=shard, force=force,
                        batch_size=batch_size, progress=progress)
    _print_scores(summary, planned.run.path)
    results = write_run_results(planned.run)
    return planned, gen, results, sum(summary.errors.values())


@app.command()
def run(
    method: Annotated[str, typer.Option("--method", "-m", help="Method card name (see `caphuman-bench methods`).")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="A preset of the card, e.g. smoke (tiny model, demo split, CPU).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="full, identity, prompt, pose or demo (default: demo for --preset smoke, else full).")] = None,
    runs_dir: RunsDir = Path("runs"),
    spec: Spec = None,
    identities_dir: IdentitiesDir = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="i/n: this process does every n-th task from i (default: RANK/WORLD_SIZE).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Regenerate and rescore finished tasks.")] = False,
    device: Device = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Base seed; each image's seed is derived from it and its task.")] = 0,
    tau: Annotated[Optional[int], typer.Option("--tau", help="CapHuman's ID-dropout start τ (DDPM timestep; 0 = off).")] = None,
    no_global: Annotated[bool, typer.Option("--no-global", help="Drop the global (FaceNet) identity token.")] = False,
    no_local: Annotated[bool, typer.Option("--no-local", help="Drop the local (CLIP-vision) identity tokens.")] = False,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Override a card parameter: KEY=VALUE (YAML value).")] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated metric names (default: every registered metric whose weights are present).")] = None,
    no_face: Annotated[str, typer.Option("--no-face", help="No face in a generated image: zero (scores 0, FastComposer's rule) or skip.")] = "zero",
    clip_model: Annotated[Optional[str], typer.Option("--clip-model", help="ViT-L-14 (default) or ViT-B-32.")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help=PROTOCOL_HELP)] = "fastcomposer",
    weights_path: Annotated[Optional[list[str]], typer.Option("--weights", help="Explicit weights file: ID=PATH.")] = None,
    score_batch_size: Annotated[int, typer.Option("--score-batch-size", min=1, help="Images per metric batch when scoring.")] = 8,
    no_score: Annotated[bool, typer.Option("--no-score", help="Generate only.")] = False,
):
    """Generate the images of a method on a split, then score them (resumable). Exit 1 if a task failed.

    Example: caphuman-bench run --method caphuman --preset smoke
    """
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.cards import get_card
    from caphuman_bench.runner import default_split
    from caphuman_bench.stages.plan import parse_shard

    card = get_card(method)
    bench = Benchmark.load(spec, identities_dir)
    overrides = _parse_pairs(param, "--param")
    if tau is not None:
        overrides["tau"] = tau
    if no_global:
        overrides["use_global"] = False
    if no_local:
        overrides["use_local"] = False
    options = _score_options(no_face, clip_model, weights_path, protocol)
    planned, gen, results, score_errors = _execute(card, bench, split or default_split(preset), runs_dir, preset, overrides, seed,
                                     device, parse_shard(shard), force, no_score, metrics.split(",") if metrics else None,
                                     options, score_batch_size)
    if results is not None:
        _print_results([results])
    if gen.failed:
        _report_failures(gen.failed, [planned.run.status_file])
        raise typer.Exit(1)
    if score_errors:
        raise typer.Exit(1)


def _print_results(results: list[dict]) -> None:
    from caphuman_bench.stages.report import leaderboard, leaderboard_wide, to_markdown

    out.print(to_markdown(leaderboard_wide(leaderboard(results))), markup=False, highlight=False, soft_wrap=True)


@app.command()
def score(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (finished or partial).")],
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated metric names (default: all with weights present).")] = None,
    device: Device = "auto",
    no_face: Annotated[str, typer.Option("--no-face", help="zero (default) or skip.")] = "zero",
    clip_model: Annotated[Optional[str], typer.Option("--clip-model", help="ViT-L-14 (default) or ViT-B-32.")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help=PROTOCOL_HELP)] = "fastcomposer",
    weights_path: Annotated[Optional[list[str]], typer.Option("--weights", help="Explicit weights file: ID=PATH.")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="i/n (default: RANK/WORLD_SIZE).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rescore pairs already in scores.parquet.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per metric batch.")] = 8,
):
    """Score the finished images of a run and write scores.parquet and results.json. Exit 1 if an image could not be scored.

    Example: caphuman-bench score runs/caphuman-demo-0123456789 --metrics face_detection,id_sim_dlib
    """
    from caphuman_bench.rundir import RunDir
    from caphuman_bench.runner import pick_device
    from caphuman_bench.stages.plan import parse_shard
    from caphuman_bench.stages.report import write_run_results
    from caphuman_bench.stages.score import score as score_stage

    run_ = RunDir(run_dir).require()
    with _progress() as progress:
        summary = score_stage(run_, metrics=metrics.split(",") if metrics else None, device=pick_device(device),
                              options=_score_options(no_face, clip_model, weights_path, protocol), shard=parse_shard(shard),
                              force=force, batch_size=batch_size, progress=progress)
    _print_scores(summary, run_.path)
    results = write_run_results(run_)
    _print_results([results])
    if summary.errors:
        raise typer.Exit(1)


@app.command()
def report(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Run directories, or folders of runs (default: --runs-dir).")] = None,
    runs_dir: RunsDir = Path("runs"),
    out_dir: Annotated[Path, typer.Option("--out", help="Where leaderboard.{md,csv,json} (and report.html) go.")] = Path("reports"),
    html_report: Annotated[bool, typer.Option("--html", help="Also write a self-contained report.html with plots and samples.")] = False,
    grid_tasks: Annotated[int, typer.Option("--grid-tasks", help="Tasks shown across methods in report.html's sample grid.")] = 6,
):
    """Aggregate runs into a leaderboard (Markdown, CSV, JSON); the run directories are only read.

    Example: caphuman-bench report runs/ --out reports/smoke --html
    """
    from caphuman_bench.stages.report import aggregate_run, find_runs, write_html, write_leaderboard

    found = find_runs(runs or [runs_dir])
    if not found:
        raise BenchError(f"no run directories under {', '.join(map(str, runs or [runs_dir]))}")
    results = [aggregate_run(r) for r in found]
    unscored = [str(r.path) for r, res in zip(found, results) if not res["metrics"]]
    if unscored:
        console.print(f"[yellow]no scores yet[/] in {escape(', '.join(unscored))}: `caphuman-bench score RUN` scores them",
                      soft_wrap=True)
    wide = write_leaderboard(results, out_dir)
    if html_report:
        console.print(f"wrote {write_html(results, found, out_dir, grid_tasks=grid_tasks)}")
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
):
    """Leaderboard gate for CI: exit 1 when a metric got worse beyond tolerance. With --paired, two run
    directories planned on the same tasks are compared per image (no gate).

    Example: caphuman-bench compare reports/leaderboard.json runs/new/leaderboard.json --tolerance 0.02
    Example: caphuman-bench compare --paired runs/caphuman-full-… runs/ip_adapter_controlnet-full-…
    """
    if paired:
        from caphuman_bench.report.stats import paired_sentence
        from caphuman_bench.rundir import RunDir
        from caphuman_bench.stages.report import compare_paired, paired_table

        run_a, run_b = RunDir(old), RunDir(new)
        results = compare_paired(run_a, run_b, metrics.split(",") if metrics else None)
        if not results:
            raise BenchError(f"{old} and {new}: no value is scored in both runs; `caphuman-bench score RUN` scores a run")
        name_a, name_b = run_a.info()["label"], run_b.info()["label"]
        if name_a == name_b:
            name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
        out.print(paired_table(results).to_string(index=False), markup=False, highlight=False, soft_wrap=True)
        for result in results:
            out.print(paired_sentence(result, name_a, name_b), markup=False, highlight=False, soft_wrap=True)
        return
    from caphuman_bench.stages.report import compare as compare_boards

    tolerances = {}
    for name, value in _parse_pairs(metric_tolerance, "--metric-tolerance").items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise BenchError(f"--metric-tolerance {name}={value!r}: expected a finite number >= 0")
        tolerances[name] = float(value)
    if not math.isfinite(tolerance):
        raise BenchError(f"--tolerance {tolerance}: expected a finite number >= 0")
    table, regressed = compare_boards(old, new, tolerance, tolerances)
    out.print(table.to_string(index=False) if len(table) else "(nothing to compare)", markup=False, highlight=False, soft_wrap=True)
    if regressed:
        console.print("[red]regression beyond tolerance[/]")
        raise typer.Exit(1)


@app.command()
def ablate(
    method: Annotated[str, typer.Option("--method", "-m", help="Method card name (see `caphuman-bench methods`).")] = "caphuman",
    tau: Annotated[Optional[list[int]], typer.Option("--tau", help="τ values to sweep (repeat).")] = None,
    features: Annotated[Optional[list[str]], typer.Option("--features", help="Identity features: global+local, global, local (repeat).")] = None,
    backbone: Annotated[Optional[list[str]], typer.Option("--backbone", help="Base models to sweep: caphuman, realistic_vision, or the path of any SD-1.5-family model, single file or diffusers folder (repeat).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="A preset of the card, e.g. smoke (tiny model, demo split, CPU).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="full, identity, prompt, pose or demo (default: demo for --preset smoke, else full).")] = None,
    runs_dir: RunsDir = Path("runs"),
    spec: Spec = None,
    identities_dir: IdentitiesDir = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the ablation leaderboard, ablation.html and its figures go.")] = Path("reports/ablations"),
    device: Device = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Base seed; each image's seed is derived from it and its task.")] = 0,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Override a card parameter in every variant: KEY=VALUE (YAML value).")] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated metric names (default: every registered metric whose weights are present).")] = None,
    no_face: Annotated[str, typer.Option("--no-face", help="No face in a generated image: zero (scores 0) or skip.")] = "zero",
    clip_model: Annotated[Optional[str], typer.Option("--clip-model", help="ViT-L-14 (default) or ViT-B-32.")] = None,
    weights_path: Annotated[Optional[list[str]], typer.Option("--weights", help="Explicit weights file: ID=PATH.")] = None,
):
    """Sweep τ, the global/local identity features and the base model; one resumable run per variant, one leaderboard.

    Each variant is labelled by its own overrides, e.g. caphuman[tau=0] (smoke). Exit 1 if a task failed.

    Example: caphuman-bench ablate --method caphuman --preset smoke --tau 0 --tau 500 --features global --features local
    """
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.cards import get_card
    from caphuman_bench.runner import default_split
    from caphuman_bench.stages.plan import Shard
    from caphuman_bench.stages.report import leaderboard, leaderboard_wide, to_markdown, write_ablation, write_leaderboard

    switches = {"global+local": {}, "global": {"use_local": False}, "local": {"use_global": False}}
    unknown = [f for f in features or [] if f not in switches]
    if unknown:
        raise BenchError(f"--features {unknown[0]!r}: expected one of {', '.join(switches)}")
    card = get_card(method)
    bench = Benchmark.load(spec, identities_dir)
    common = _parse_pairs(param, "--param")
    options = _score_options(no_face, clip_model, weights_path)
    variants = [{**common, **({"backbone": b} if b is not None else {}), **({"tau": t} if t is not None else {}), **switches[f]}
                for b in (backbone or [None]) for t in (tau or [None]) for f in (features or ["global+local"])]
    split = split or default_split(preset)
    for overrides in variants:  # every variant's parameters checked before the first run starts
        _preflight(card, bench, split, preset, overrides, options["weights_paths"])
    results, failed, status_files, unscored, variant_runs = [], 0, [], 0, []
    for overrides in variants:
        planned, gen, res, score_errors = _execute(card, bench, split, runs_dir, preset, overrides, seed, device, Shard(0, 1), False,
                                     False, metrics.split(",") if metrics else None, options, 8)
        # Variants with the same parameters share a run (tau=0 is the default): label by the variant, not run.json.
        results.append({**res, "method": planned.label})
        variant_runs.append(planned.run)
        unscored += score_errors
        if gen.failed:
            failed += gen.failed
            status_files.append(planned.run.status_file)
    write_leaderboard(results, out_dir)
    out.print(to_markdown(leaderboard_wide(leaderboard(results))), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {write_ablation(results, out_dir, variant_runs)}")
    if failed:
        _report_failures(failed, status_files)
    if failed or unscored:
        raise typer.Exit(1)


@app.command()
def finetune(
    method: Annotated[str, typer.Option("--method", "-m", help="A fine-tuned method's card: textual_inversion, dreambooth, lora (or a *_controlnet_head variant).")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="A preset of the card, e.g. smoke (tiny model, a few steps).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Whose identities to train (default: demo for --preset smoke, else full).")] = None,
    runs_dir: RunsDir = Path("runs"),
    spec: Spec = None,
    identities_dir: IdentitiesDir = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="i/n: this process trains every n-th identity from i (default: RANK/WORLD_SIZE).")] = None,
    device: Device = "auto",
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Override a card parameter: KEY=VALUE (YAML value).")] = None,
    weights_path: Annotated[Optional[list[str]], typer.Option("--weights", help="Explicit weights file: ID=PATH.")] = None,
):
    """Fine-tune a method on each identity's reference photo, into <runs-dir>/finetune/ (resumable). Exit 1 if one failed.

    Example: caphuman-bench finetune --method lora --preset smoke && caphuman-bench run --method lora --preset smoke
    """
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.cards import get_card
    from caphuman_bench.runner import default_split, pick_device
    from caphuman_bench.stages.finetune import fine_tuned_adapter, finetune as finetune_stage
    from caphuman_bench.stages.plan import parse_shard

    card = get_card(method)
    params = fine_tuned_adapter(card).validated_params(card, preset, _parse_pairs(param, "--param"))
    bench = Benchmark.load(spec, identities_dir)
    with _progress() as progress:
        summary = finetune_stage(card, bench, split or default_split(preset), runs_dir, params, device=pick_device(device),
                                 shard=parse_shard(shard), weights_paths={k: str(v) for k, v in _parse_pairs(weights_path, "--weights").items()},
                                 progress=progress)
    for identity_id, reason in summary.retrained.items():
        console.print(f"[yellow]retrained[/] {identity_id}: {escape(reason)}", soft_wrap=True)
    console.print(f"finetune {card.name} → {summary.root}: trained {len(summary.trained)}, kept {len(summary.kept)}, "
                  f"failed {len(summary.failures)}", soft_wrap=True)
    for identity_id, reason in summary.failures.items():
        console.print(f"[red]failed[/] {identity_id}: {escape(reason)}", soft_wrap=True)
    if summary.failures:
        raise typer.Exit(1)


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """List the method cards: the task inputs each uses, how the head condition reaches it, and whether its
    weights are present.

    Example: caphuman-bench methods
    """
    from caphuman_bench import weights
    from caphuman_bench.cards import all_cards
    from caphuman_bench.registry import get_method

    rows = []
    for name, card in all_cards().items():
        get_method(card.adapter)
        rows.append({"method": name, "adapter": card.adapter, "inputs": list(card.inputs), "head_input": card.head_input,
                     "weights": {w: weights.locate(w) is not None for w in card.weights},
                     "smoke": "smoke" in card.presets, "description": card.description})
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("method", "inputs", "head input", "weights", "description")
    for row in rows:
        missing = [w for w, present in row["weights"].items() if not present]
        state = ("none needed" if not row["weights"] else "[green]present[/]" if not missing else
                 f"[yellow]missing {len(missing)} of {len(row['weights'])}[/]: {', '.join(missing)}")
        table.add_row(row["method"], ", ".join(row["inputs"]), row["head_input"], state, row["description"])
    out.print(table)
    out.print("weights: `caphuman-bench weights status` says where each file comes from; every method also has a "
              "`smoke` preset that needs none", soft_wrap=True)


@app.command()
def metrics():
    """List the registered metrics, their reported values and weights.

    Example: caphuman-bench metrics
    """
    from caphuman_bench import weights
    from caphuman_bench.registry import all_metrics

    table = Table("metric", "values (↑ higher / ↓ lower is better)", "weights")
    for name, cls in all_metrics().items():
        values = ", ".join(f"{k} {'↑' if v else '↓'}" for k, v in cls.info.higher_is_better.items())
        ws = ", ".join(f"{w} ({'present' if weights.locate(w) else 'missing'})" for w in cls.info.weights) or "none"
        table.add_row(name, values, ws)
    out.print(table)


@weights_app.command("status")
def weights_status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Every file the methods and metrics need: present or missing, source, licence. Offline.

    Example: caphuman-bench weights status
    """
    from caphuman_bench import weights

    rows = weights.status_rows()
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("id", "file", "status", "used by", "licence / source")
    for r in rows:
        table.add_row(r["id"], r["file"], "[green]present[/]" if r["present"] else "[red]missing[/]", r["used_by"],
                      f"{r['licence']}\n{r['source']}")
    out.print(table)
    out.print(f"search order: explicit --weights ID=PATH, ${weights.WEIGHTS_ENV}/<file>, Hugging Face cache, installed package")


@weights_app.command("fetch")
def weights_fetch(weights_id: Annotated[str, typer.Argument(help="A manifest id hosted on the Hugging Face hub.")]):
    """Download one Hugging Face-hosted file into the HF cache (needs network and, for gated repos, a token).

    Example: caphuman-bench weights fetch caphuman_ckpt
    """
    from caphuman_bench import weights

    out.print(str(weights.fetch(weights_id)))


@data_app.command("prepare")
def data_prepare(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the prepared benchmark (spec + identities/).")],
    celeba_root: Annotated[Optional[Path], typer.Option("--celeba-root", help="CelebA root with list_eval_partition.txt, identity_CelebA.txt and img_align_celeba/.")] = None,
    identities_dir: IdentitiesDir = None,
    spec: Spec = None,
    count: Annotated[int, typer.Option("--count", min=1, help="Identities to select from CelebA's test partition.")] = 100,
):
    """Verify and prepare the benchmark's identities from CelebA (sha256-checked) or a folder of <identity>.jpg.

    Example: caphuman-bench data prepare --celeba-root ~/data/celeba --out data/humaniphc
    """
    from caphuman_bench.data_prepare import prepare

    report_ = prepare(out_dir, celeba_root=celeba_root, identities_dir=identities_dir, spec_root=spec, count=count)
    out.print(report_.summary(), soft_wrap=True)
    if report_.missing:
        raise typer.Exit(1)


@data_app.command("show")
def data_show(spec: Spec = None, identities_dir: IdentitiesDir = None):
    """Print the spec's version, splits and their sizes.

    Example: caphuman-bench data show
    """
    from caphuman_bench.benchmark import Benchmark

    bench = Benchmark.load(spec, identities_dir)
    table = Table("split", "identities", "prompts", "conditions", "samples", "images")
    for s in bench.splits.values():
        table.add_row(s.name, str(len(s.identities)), str(len(s.prompts)), str(len(s.conditions)), str(s.samples),
                      str(len(s.identities) * len(s.prompts) * len(s.conditions) * s.samples))
    out.print(f"{bench.root} version {bench.version} (spec hash {bench.spec_hash[:12]})")
    out.print(table)


@app.command()
def conformance(
    method: Annotated[str, typer.Argument(help="The port to check (caphuman-bench conformance --list names them).")] = "",
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Folder of known-answer vectors (default: the checkout's tests/data/<vectors>).")] = None,
    list_checks: Annotated[bool, typer.Option("--list", help="List the ports that have known-answer vectors.")] = False,
    device: Device = "cpu",
):
    """Check a port against known-answer vectors made from its authors' code; exit 1 beyond tolerance.

    Example: caphuman-bench conformance caphuman --reference tests/data/caphuman_tiny
    """
    from caphuman_bench.conformance import conformance_checks, conformance_command

    if list_checks or not method:
        for check in conformance_checks().values():
            out.print(f"{check.name}  (vectors: tests/data/{check.vectors})", soft_wrap=True)
        raise typer.Exit(0 if list_checks else 2)
    raise typer.Exit(conformance_command(method, reference, device=device))


@app.command()
def render(
    condition: Annotated[list[str], typer.Option("--condition", "-c", help="Head condition id(s) of the spec (repeat).")],
    identity: Annotated[Optional[str], typer.Option("--identity", help="Identity id whose DECA code is rendered (default: FLAME's neutral head).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for normal.png, albedo.png, rendered.png and grid.png.")] = Path("renders"),
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Use the synthetic FLAME-format head (no FLAME files needed).")] = False,
    mode: Annotated[str, typer.Option("--mode", help="Coefficient mixing: position,pose | expression | lighting | all.")] = "position,pose",
    size: Annotated[int, typer.Option("--size", min=16)] = 512,
    spec: Spec = None,
    identities_dir: IdentitiesDir = None,
    device: Device = "auto",
    weights_path: Annotated[Optional[list[str]], typer.Option("--weights", help="Explicit weights file: ID=PATH.")] = None,
):
    """Render a head condition as CapHuman sees it: surface normals, albedo, Lambertian shading, and a grid.

    Example: caphuman-bench render --synthetic --condition yaw-r45 --out renders/
    """
    from caphuman_bench.render.cli import render_command
    from caphuman_bench.runner import pick_device

    written = render_command(condition, out_dir, identity=identity, synthetic=synthetic, mode=mode, size=size,
                             device=pick_device(device), spec_root=spec, identities_dir=identities_dir,
                             weight_paths=_weights_paths(weights_path))
    for name, path in written.items():
        out.print(f"{name}: {path}")


def _usage_errors() -> tuple[type, ...]:
    """Click's exception types: the pinned typer raises those of its bundled copy of click."""
    import click

    try:
        from typer._click.exceptions import ClickException as BundledClickException
    except ImportError:  # a typer that uses click itself
        return (click.ClickException,)
    return (click.ClickException, BundledClickException)


def main() -> None:
    """Entry point: user errors and environment faults become one line on stderr and exit code 2;
    no user error or fault prints a traceback."""
    from caphuman_bench.atomic import environment_fault
    from caphuman_bench.launch import check_environment

    def fail(message: str, code: int = 2) -> None:
        console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # one line, never wrapped
        sys.exit(code)

    try:
        check_environment()  # before torchmetrics' import reads LOCAL_RANK
        code = app(standalone_mode=False)  # click returns the exit code of typer.Exit here
    except BenchError as exc:
        fail(str(exc))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        fail("interrupted; rerun the same command to resume", 130)
    except OSError as exc:  # a fault no stage turned into a BenchError: still one line with the path
        fail(str(environment_fault(exc, exc.filename or "a file")))
    except _usage_errors() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
            sys.exit(exc.exit_code)
        fail(" ".join(exc.format_message().split()), exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
