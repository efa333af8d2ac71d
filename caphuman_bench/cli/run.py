"""`run`, `ablate`, `finetune`: the commands that generate (pre-flight, plan, generate, score, aggregate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from caphuman_bench.cli.common import (
    HEAD_RECONSTRUCTOR_HELP,
    PROTOCOL_HELP,
    Device,
    IdentitiesDir,
    SPLITS,
    RunsDir,
    Spec,
    app,
    console,
    parse_pairs,
    print_results,
    print_scores,
    progress_bar,
    reconstructor_names,
    report_failures,
    score_options,
)
from caphuman_bench.errors import BenchError


def preflight(card, bench, split: str, preset: Optional[str], overrides: dict, options: dict,
              metrics: list[str] | None, scoring: bool = True) -> None:
    """Everything a run needs that the user can fix, checked before `plan_run` writes the run folder:
    the card's parameters and the command line's overrides, the method's weights files (opened, not only
    found), the metrics named (registered, their weights present and readable), every reference photo."""
    from caphuman_bench import weights
    from caphuman_bench.registry import get_method
    from caphuman_bench.stages.generate import method_weights
    from caphuman_bench.stages.score import metrics_to_run

    params = get_method(card.adapter).validated_params(card, preset, overrides)
    _, resolved = method_weights(card, params, options["weights_paths"])
    if scoring:
        ready = metrics_to_run(metrics, options)
        resolved = {**resolved, **{wid: path for _, found, _ in ready.values() for wid, path in found.items()}}
    for weights_id, path in resolved.items():
        weights.verify_file(path, f"weights file {weights_id}")
    for identity_id in bench.split(split).identities:
        bench.reference_image(identity_id)


def execute(card, bench, split, runs_dir, preset, overrides, seed, device, shard, force, generate_only, metrics,
             options, batch_size):
    """Pre-flight, plan, generate, score, aggregate. Returns (planned run, generate summary, results or None,
    images that could not be scored)."""
    from caphuman_bench.quiet import run_log
    from caphuman_bench.runner import pick_device, plan_run
    from caphuman_bench.stages.generate import generate
    from caphuman_bench.stages.report import write_run_results
    from caphuman_bench.stages.score import check_reference_faces, score

    device = pick_device(device)
    preflight(card, bench, split, preset, overrides, options, metrics, scoring=not generate_only)  # before any file is written
    if not generate_only:
        check_reference_faces(bench, bench.split(split).identities, metrics, options)
    planned = plan_run(card, bench, split, runs_dir, preset=preset, overrides=overrides, seed=seed)
    console.print(f"run [bold]{planned.label}[/] on split {split} → {planned.run.path} (device {device}, shard {shard.index}/{shard.count})")
    with run_log(planned.run.log_file):
        with progress_bar() as progress:
            gen = generate(planned.run, bench, card, planned.params, device=device, shard=shard, force=force,
                           weights_paths=options["weights_paths"], progress=progress)
        console.print(f"generated {gen.generated}, kept {gen.kept} finished, failed {gen.failed} of {gen.planned} tasks in this shard"
                      + (f", {gen.elsewhere} left to another process generating this run" if gen.elsewhere else ""), soft_wrap=True)
        for failure in gen.failures[:5]:
            console.print(f"[red]failed[/] {escape(failure)}", soft_wrap=True)
        if generate_only:
            return planned, gen, None, 0
        with progress_bar() as progress:
            summary = score(planned.run, metrics=metrics, device=device, options=options, shard=shard, force=force,
                            batch_size=batch_size, progress=progress)
        print_scores(summary, planned.run.path)
        results = write_run_results(planned.run)
    return planned, gen, results, sum(summary.errors.values())


def finish(planned, gen, results, score_errors: int) -> None:
    """The end of a generating command: its leaderboard row, then exit 1 if a task failed or an image
    could not be scored."""
    if results is not None:
        print_results([results])
    if gen.failed:
        report_failures(gen.failed, [planned.run.status_file])
        raise typer.Exit(1)
    if score_errors:
        raise typer.Exit(1)


@app.command()
def run(
    method: Annotated[str, typer.Option("--method", "-m", help="Method card name (see `caphuman-bench methods`).")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="A preset of the card, e.g. smoke (tiny model, demo split, CPU).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help=f"{SPLITS}. Default: demo for --preset smoke, else full.")] = None,
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
    head_reconstructor: Annotated[Optional[list[str]], typer.Option("--head-reconstructor", help=HEAD_RECONSTRUCTOR_HELP)] = None,
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
    overrides = parse_pairs(param, "--param")
    if tau is not None:
        overrides["tau"] = tau
    if no_global:
        overrides["use_global"] = False
    if no_local:
        overrides["use_local"] = False
    options = score_options(no_face, clip_model, weights_path, protocol, head_reconstructor)
    planned, gen, results, score_errors = execute(card, bench, split or default_split(preset), runs_dir, preset, overrides, seed,
                                     device, parse_shard(shard), force, no_score, metrics.split(",") if metrics else None,
                                     options, score_batch_size)
    finish(planned, gen, results, score_errors)


@app.command()
def ablate(
    method: Annotated[str, typer.Option("--method", "-m", help="Method card name (see `caphuman-bench methods`).")] = "caphuman",
    tau: Annotated[Optional[list[int]], typer.Option("--tau", help="τ values to sweep (repeat).")] = None,
    features: Annotated[Optional[list[str]], typer.Option("--features", help="Identity features: global+local, global, local (repeat).")] = None,
    backbone: Annotated[Optional[list[str]], typer.Option("--backbone", help="Base models to sweep: caphuman, realistic_vision, or the path of any SD-1.5-family model, single file or diffusers folder (repeat).")] = None,
    reconstructor: Annotated[Optional[list[str]], typer.Option("--reconstructor", help="FLAME reconstructors to sweep as the head condition's source (parameter 'reconstructor', repeat); every variant is scored by each of them (head_control, head_control[NAME]).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="A preset of the card, e.g. smoke (tiny model, demo split, CPU).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help=f"{SPLITS}. Default: demo for --preset smoke, else full.")] = None,
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
    head_reconstructor: Annotated[Optional[list[str]], typer.Option("--head-reconstructor", help=HEAD_RECONSTRUCTOR_HELP + " Added to the --reconstructor list.")] = None,
):
    """Sweep τ, the global/local identity features, the base model and the reconstructor; one resumable run per variant, one leaderboard.

    Each variant is labelled by its own overrides, e.g. caphuman[tau=0] (smoke). Exit 1 if a task failed.

    Example: caphuman-bench ablate --method caphuman --preset smoke --tau 0 --tau 500 --features global --features local
    Example: caphuman-bench ablate --method caphuman --reconstructor deca --reconstructor emoca_v2 --split pose-extreme
    """
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.cards import get_card
    from caphuman_bench.runner import default_split, run_label
    from caphuman_bench.stages.plan import Shard
    from caphuman_bench.stages.report import write_ablation, write_leaderboard

    switches = {"global+local": {}, "global": {"use_local": False}, "local": {"use_global": False}}
    unknown = [f for f in features or [] if f not in switches]
    if unknown:
        raise BenchError(f"--features {unknown[0]!r}: expected one of {', '.join(switches)}")
    card = get_card(method)
    bench = Benchmark.load(spec, identities_dir)
    common = parse_pairs(param, "--param")
    sources = reconstructor_names(reconstructor, "--reconstructor")
    options = score_options(no_face, clip_model, weights_path, head_reconstructors=sources + list(head_reconstructor or []))
    variants = [{**common, **({"backbone": b} if b is not None else {}), **({"reconstructor": r} if r is not None else {}),
                 **({"tau": t} if t is not None else {}), **switches[f]}
                for b in (backbone or [None]) for r in (sources or [None]) for t in (tau or [None])
                for f in (features or ["global+local"])]
    split = split or default_split(preset)
    for overrides in variants:  # every variant's parameters checked before the first run starts
        preflight(card, bench, split, preset, overrides, options, metrics.split(",") if metrics else None)
    results, failed, status_files, unscored, variant_runs = [], 0, [], 0, []
    for number, overrides in enumerate(variants, 1):
        console.print(f"variant {number} of {len(variants)}: [bold]{escape(run_label(card, preset, overrides))}[/]", soft_wrap=True)
        planned, gen, res, score_errors = execute(card, bench, split, runs_dir, preset, overrides, seed, device, Shard(0, 1), False,
                                     False, metrics.split(",") if metrics else None, options, 8)
        # Variants with the same parameters share a run (tau=0 is the default): label by the variant, not run.json.
        results.append({**res, "method": planned.label})
        variant_runs.append(planned.run)
        unscored += score_errors
        if gen.failed:
            failed += gen.failed
            status_files.append(planned.run.status_file)
    write_leaderboard(results, out_dir)
    print_results(results)
    console.print(f"wrote {write_ablation(results, out_dir, variant_runs)}")
    if failed:
        report_failures(failed, status_files)
    if failed or unscored:
        raise typer.Exit(1)


@app.command()
def finetune(
    method: Annotated[str, typer.Option("--method", "-m", help="A fine-tuned method's card: textual_inversion, dreambooth, lora (or a *_controlnet_head variant).")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="A preset of the card, e.g. smoke (tiny model, a few steps).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help=f"Whose identities to train: {SPLITS}. Default: demo for --preset smoke, else full.")] = None,
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
    from caphuman_bench.stages.finetune import fine_tuned_adapter
    from caphuman_bench.stages.finetune import finetune as finetune_stage
    from caphuman_bench.stages.plan import parse_shard

    card = get_card(method)
    params = fine_tuned_adapter(card).validated_params(card, preset, parse_pairs(param, "--param"))
    bench = Benchmark.load(spec, identities_dir)
    with progress_bar() as progress:
        summary = finetune_stage(card, bench, split or default_split(preset), runs_dir, params, device=pick_device(device),
                                 shard=parse_shard(shard), weights_paths={k: str(v) for k, v in parse_pairs(weights_path, "--weights").items()},
                                 progress=progress)
    for identity_id, reason in summary.retrained.items():
        console.print(f"[yellow]retrained[/] {identity_id}: {escape(reason)}", soft_wrap=True)
    console.print(f"finetune {card.name} → {summary.root}: trained {len(summary.trained)}, kept {len(summary.kept)}, "
                  f"failed {len(summary.failures)}", soft_wrap=True)
    for identity_id, reason in summary.failures.items():
        console.print(f"[red]failed[/] {identity_id}: {escape(reason)}", soft_wrap=True)
    if summary.failures:
        raise typer.Exit(1)
