"""What is there: `methods`, `metrics`, `weights`, `data`, `conformance`, `render`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from caphuman_bench.errors import BenchError
from caphuman_bench.cli.common import (
    Device,
    IdentitiesDir,
    Spec,
    app,
    data_app,
    console,
    out,
    print_rows,
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
    table = []
    for row in rows:
        missing = [w for w, present in row["weights"].items() if not present]
        state = ("none needed" if not row["weights"] else "[green]present[/]" if not missing else
                 f"[yellow]missing {len(missing)} of {len(row['weights'])}[/]")
        table.append([row["method"], ", ".join(row["inputs"]), row["head_input"], state, row["description"]])
    print_rows(["method", "inputs", "head input", "weights", "description"], table)
    out.print("weights: `caphuman-bench weights status --method NAME` names each file and where it comes from; every "
              "method also has a `smoke` preset that needs none", soft_wrap=True)


@app.command()
def metrics(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """List the registered metrics, their reported values and weights.

    Example: caphuman-bench metrics
    """
    from caphuman_bench import weights
    from caphuman_bench.registry import all_metrics

    rows = [{"metric": name, "higher_is_better": dict(cls.info.higher_is_better),
             "weights": {w: weights.locate(w) is not None for w in cls.info.weights}}
            for name, cls in all_metrics().items()]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    print_rows(["metric", "values (↑ higher / ↓ lower is better)", "weights"],
               [[r["metric"], ", ".join(f"{k} {'↑' if v else '↓'}" for k, v in r["higher_is_better"].items()),
                 ", ".join(f"{w} ({'present' if ok else 'missing'})" for w, ok in r["weights"].items()) or "none"]
                for r in rows])


def _weights_of(method: Optional[str], every: bool = True) -> list[str]:
    """Manifest ids a method card needs (with its metrics' files, which every run scores with), or all."""
    from caphuman_bench import weights

    if method is None:
        return list(weights.manifest()) if every else []
    from caphuman_bench.cards import get_card
    from caphuman_bench.registry import all_metrics

    card = get_card(method)
    scoring = [w for cls in all_metrics().values() for w in cls.info.weights]
    return list(dict.fromkeys(card.weights + scoring))


@weights_app.command("status")
def weights_status(
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Only the files this method card and the metrics need.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Every file the methods and metrics need: present or missing, size, source, licence. Offline.

    Example: caphuman-bench weights status --method caphuman
    """
    from caphuman_bench import weights

    wanted = set(_weights_of(method))
    rows = [r for r in weights.status_rows() if r["id"] in wanted]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    print_rows(["id", "file", "status", "size", "used by", "licence", "source"],
               [[r["id"], r["file"], "[green]present[/]" if r["present"] else "[red]missing[/]", r["size"], r["used_by"],
                 r["licence"], r["source"]] for r in rows], ids=2)
    missing = [r for r in rows if not r["present"]]
    out.print(f"{len(rows) - len(missing)} of {len(rows)} present; missing about {weights.total_size(missing)}. Search order: "
              f"explicit --weights ID=PATH, ${weights.WEIGHTS_ENV}/<file>, Hugging Face cache, installed package", soft_wrap=True)


@weights_app.command("fetch")
def weights_fetch(
    weights_ids: Annotated[Optional[list[str]], typer.Argument(help="Manifest ids hosted on the Hugging Face hub.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Every hub-hosted file this method card and the metrics need.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every hub-hosted file of the manifest.")] = False,
):
    """Download hub-hosted weights into the Hugging Face cache (needs network and, for gated repos, a token).
    Files that are not on the hub are named with their source and licence: get those by hand.

    Example: caphuman-bench weights fetch --method caphuman
    """
    from caphuman_bench import weights

    ids = list(dict.fromkeys((weights_ids or []) + _weights_of(method, every=every) if (method or every) else (weights_ids or [])))
    if not ids:
        raise BenchError("name weights ids, --method NAME or --all (`caphuman-bench weights status` lists them)")
    rows = {r["id"]: r for r in weights.status_rows()}
    unknown = [i for i in ids if i not in rows]
    if unknown:
        raise BenchError(f"unknown weights id(s) {', '.join(unknown)}; `caphuman-bench weights status` lists them")
    todo = [i for i in ids if not rows[i]["present"]]
    hub = [i for i in todo if weights.entry(i).hf_repo and weights.entry(i).hf_file]
    console.print(f"{len(ids) - len(todo)} of {len(ids)} present; fetching {len(hub)} from the hub "
                  f"(about {weights.total_size([rows[i] for i in hub])})", soft_wrap=True)
    for weights_id in hub:
        out.print(f"{weights_id}: {weights.fetch(weights_id)}", soft_wrap=True)
    for weights_id in [i for i in todo if i not in hub]:
        e = weights.entry(weights_id)
        console.print(f"[yellow]by hand[/] {weights_id} ({e.file}, {e.size}): {e.source} — {e.licence}", soft_wrap=True)


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
    device: Annotated[str, typer.Option("--device", help="cpu (the tolerance is for float32 on CPU, where the vectors "
                                                         "were made), cuda or cuda:N.")] = "cpu",
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
    identity: Annotated[Optional[str], typer.Option("--identity", help="Identity id or photo whose FLAME code is rendered, or a saved DECA code .npz/.json (default: FLAME's neutral head).")] = None,
    reconstructor: Annotated[str, typer.Option("--reconstructor", help="Who reads a photo's FLAME code: deca (default, the paper's), emoca_v2, smirk.")] = "deca",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for <condition>/normal.png, albedo.png, rendered.png per condition and grid.png of them all.")] = Path("renders"),
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
                             weight_paths=weights_paths(weights_path), reconstructor=reconstructor)
    for name, path in written.items():
        out.print(f"{name}: {path}", soft_wrap=True)  # a path is never wrapped
