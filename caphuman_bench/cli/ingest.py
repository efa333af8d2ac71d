"""Bring your own images: `plan --export` hands out the tasks, `ingest` takes the images back as a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from caphuman_bench.cli.common import (
    PROTOCOL_HELP,
    Device,
    IdentitiesDir,
    SPLITS,
    RunsDir,
    Spec,
    app,
    console,
    score_options,
)
from caphuman_bench.errors import BenchError

HEAD_INPUTS = ("none", "normals", "landmarks", "3D render", "CapFace")


@app.command()
def plan(
    export: Annotated[Path, typer.Option("--export", help="Folder for tasks.jsonl, the reference photos and the head conditions.")],
    split: Annotated[str, typer.Option("--split", help=f"The split whose tasks are exported: {SPLITS}.")] = "full",
    spec: Spec = None,
    identities_dir: IdentitiesDir = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed, as `run --seed`.")] = 0,
    renders: Annotated[str, typer.Option("--renders", help="Head-condition renders on FLAME's mean head: flame (FLAME files), synthetic (the stand-in head, no files) or none.")] = "none",
    size: Annotated[int, typer.Option("--size", min=16, help="Side of the head-condition renders.")] = 512,
):
    """Write a split's tasks for generating elsewhere: ids, prompts, seeds, reference photos, head conditions.

    Name each image <task_id>.png and take them back with `caphuman-bench ingest FOLDER --name YOUR_METHOD`.

    Example: caphuman-bench plan --export tasks/ --split demo --renders synthetic
    """
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.stages.plan import export_tasks

    if renders not in ("flame", "synthetic", "none"):
        raise BenchError(f"--renders {renders!r}: expected flame, synthetic or none")
    bench = Benchmark.load(spec, identities_dir)
    written = export_tasks(bench, split, export, seed=seed, renders=renders, size=size)
    console.print(f"{written} tasks of split {split} → {export / 'tasks.jsonl'} (references/, conditions/ beside it)",
                  soft_wrap=True)


@app.command()
def ingest(
    images: Annotated[Path, typer.Argument(help="Folder of images named <task_id>.png (or .jpg, .jpeg, .webp).")],
    name: Annotated[str, typer.Option("--name", help="The method's name on the leaderboard.")],
    split: Annotated[str, typer.Option("--split", help=f"The split the images were made for (as exported): {SPLITS}.")] = "full",
    head_input: Annotated[str, typer.Option("--head-input", help=f"How your method used the head condition: {', '.join(HEAD_INPUTS)}.")] = "none",
    description: Annotated[str, typer.Option("--description", help="One line on the method, for the leaderboard.")] = "",
    runs_dir: RunsDir = Path("runs"),
    spec: Spec = None,
    identities_dir: IdentitiesDir = None,
    seed: Annotated[int, typer.Option("--seed", help="The base seed the tasks were exported with.")] = 0,
    device: Device = "auto",
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated metric names (default: every metric whose weights are present).")] = None,
    no_face: Annotated[str, typer.Option("--no-face", help="zero (default) or skip.")] = "zero",
    clip_model: Annotated[Optional[str], typer.Option("--clip-model", help="ViT-L-14 (default) or ViT-B-32.")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help=PROTOCOL_HELP)] = "fastcomposer",
    weights_path: Annotated[Optional[list[str]], typer.Option("--weights", help="Explicit weights file: ID=PATH.")] = None,
    no_score: Annotated[bool, typer.Option("--no-score", help="Make the run directory only.")] = False,
):
    """Turn a folder of images made elsewhere into a run directory, then score it like any other run.

    The folder is checked whole first (every task has one image, nothing else, one size, readable); its
    content's hash joins the run's configuration, so changed images make a new run.

    Example: caphuman-bench ingest my_images/ --name my_method --split demo
    """
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.cards import MethodCard
    from caphuman_bench.cli.run import execute, finish
    from caphuman_bench.methods.ingested import check_image_folder
    from caphuman_bench.stages.plan import Shard, plan_tasks

    if head_input not in HEAD_INPUTS:
        raise BenchError(f"--head-input {head_input!r}: expected one of {', '.join(HEAD_INPUTS)}")
    bench = Benchmark.load(spec, identities_dir)
    width, height = check_image_folder(images, plan_tasks(bench, split, seed), None)
    card = MethodCard(
        name=name, adapter="ingested", description=description or f"images made elsewhere, ingested from {images.name}/",
        inputs=["reference", "prompt"] + (["head"] if head_input != "none" else []), head_input=head_input,
        params={"images_dir": str(images.resolve()), "height": height, "width": width, "batch_size": 16},
        path=f"caphuman-bench ingest {images}")
    options = score_options(no_face, clip_model, weights_path, protocol)
    planned, gen, results, score_errors = execute(card, bench, split, runs_dir, None, {}, seed, device, Shard(0, 1), False,
                                                  no_score, metrics.split(",") if metrics else None, options, 8)
    finish(planned, gen, results, score_errors)


