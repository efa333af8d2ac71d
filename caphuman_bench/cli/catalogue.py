"""What is there: `methods`, `metrics`, `weights`, `data`, `conformance`, `render`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from caphuman_bench.cli.common import (
    Device,
    IdentitiesDir,
    Spec,
    app,
    data_app,
    out,
    weights_app,
    weights_paths,
)


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """List the method cards: the task inputs each uses, how the head condition reaches it, whether its weights are present.

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
                             weight_paths=weights_paths(weights_path))
    for name, path in written.items():
        out.print(f"{name}: {path}")
