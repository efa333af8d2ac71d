"""What every command group shares: the Typer apps, the consoles, the option types and parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from caphuman_bench.errors import BenchError

app = typer.Typer(help="HumanIPHC: the benchmark of identity-preserving, head-controllable portrait generation "
                  "(CapHuman, CVPR 2024).", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
weights_app = typer.Typer(help="Weights files: what is present, where it comes from, its licence.", no_args_is_help=True)
data_app = typer.Typer(help="The benchmark data: prepare CelebA identities, inspect the spec.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@app.callback()
def outside_plugins(
    include: Annotated[Optional[list[Path]], typer.Option(
        "--include", help="A folder of outside methods, metrics (*.py) and cards (*.yaml), read as if shipped (repeat; "
                          "also $CAPHUMAN_BENCH_INCLUDE). Example: caphuman-bench --include my_methods run -m mine")] = None,
):
    """HumanIPHC: the benchmark of identity-preserving, head-controllable portrait generation (CapHuman, CVPR 2024)."""
    from caphuman_bench.plugins import add_include

    if include:
        add_include(include)


app.add_typer(data_app, name="data")
console = Console(stderr=True)
out = Console()

RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Root of all run directories.")]
Spec = Annotated[Optional[Path], typer.Option("--spec", help="Benchmark spec folder (default: the shipped benchmark_data/humaniphc).")]
IdentitiesDir = Annotated[Optional[Path], typer.Option("--identities-dir", help="Folder of <identity>.jpg reference photos.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (GPU of this rank when present).")]
# The shipped spec's splits (tests/test_console.py checks them against splits.yaml); --spec may bring others.
SPLITS = "full, identity, prompt, pose, pose-extreme, references or demo (`caphuman-bench data show` lists a spec's splits)"


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def parse_pairs(values: list[str] | None, what: str) -> dict:
    pairs = {}
    for value in values or []:
        key, sep, raw = value.partition("=")
        if not sep or not key:
            raise BenchError(f"{what} {value!r}: expected KEY=VALUE")
        pairs[key.strip()] = yaml.safe_load(raw)
    return pairs


PROTOCOL_HELP = ("fastcomposer (default: the paper's evaluation — largest face, max(cos, 0), CLIP text with the class "
                 "word, tensor preprocessing) or caphuman-bench (most confident face, signed cosine, 'a person').")


def weights_paths(values: list[str] | None) -> dict[str, str]:
    """`--weights ID=PATH` pairs; an id the manifest does not know, or a file that is missing or does not
    open, is refused, never ignored."""
    from caphuman_bench import weights

    paths = {}
    for key, value in parse_pairs(values, "--weights").items():
        if key not in weights.manifest():
            raise BenchError(f"--weights {key}=…: unknown weights id {key!r}; `caphuman-bench weights status` lists them")
        weights.verify_file(Path(str(value)).expanduser(), f"--weights {key}")  # named, so never skipped: it must load
        paths[key] = str(value)
    return paths


HEAD_RECONSTRUCTOR_HELP = ("Score head_control with this FLAME reconstructor (repeat): deca (default, the paper's: "
                           "head_control, rmse_pose, …), emoca_v2, smirk (head_control[NAME], rmse_pose[NAME], …); "
                           "its weights must be present.")


def reconstructor_names(values: list[str] | None, option: str) -> list[str]:
    """Reconstructor names given to `option`, each registered (a one-line error lists the known ones), once each."""
    from caphuman_bench.models.reconstructors import reconstructor_names as known

    for name in values or []:
        if name not in known():
            raise BenchError(f"{option} {name!r}: unknown reconstructor; known: {', '.join(known())}")
    return list(dict.fromkeys(values or []))


def score_options(no_face: str, clip_model: Optional[str], weight_paths: list[str] | None, protocol: str = "fastcomposer",
                  head_reconstructors: list[str] | None = None) -> dict:
    from caphuman_bench.metrics._clip import CLIP_CHECKPOINTS

    if no_face not in ("zero", "skip"):
        raise BenchError(f"--no-face {no_face!r}: expected zero or skip")
    if protocol not in ("fastcomposer", "caphuman-bench"):
        raise BenchError(f"--protocol {protocol!r}: expected fastcomposer or caphuman-bench")
    options = {"no_face": no_face, "protocol": protocol, "weights_paths": weights_paths(weight_paths)}
    if clip_model:
        if clip_model not in CLIP_CHECKPOINTS:
            raise BenchError(f"--clip-model {clip_model!r}: expected one of {', '.join(CLIP_CHECKPOINTS)}")
        options["clip_model"] = clip_model
    if head_reconstructors:
        options["head_reconstructors"] = reconstructor_names(head_reconstructors, "--head-reconstructor")
    return options


def print_scores(summary, run_dir: Path) -> None:
    for name, reason in summary.skipped.items():
        console.print(f"[yellow]skipped metric {name}[/]: {escape(reason)}", soft_wrap=True)
    for name, count in summary.errors.items():
        console.print(f"[red]metric {name}: {count} image(s) could not be scored[/] (status error; reasons in "
                      f"{escape(str(run_dir / 'scores.parquet'))}); the next `caphuman-bench score` retries them", soft_wrap=True)


def report_failures(failed: int, status_files: list[Path]) -> None:
    """The last line of a run with failed tasks; the caller exits 1."""
    console.print(f"[red]{failed} task(s) failed[/]; reasons in {escape(', '.join(map(str, status_files)))}", soft_wrap=True)


def print_results(results: list[dict]) -> None:
    from caphuman_bench.stages.report import leaderboard, leaderboard_wide, to_markdown

    out.print(to_markdown(leaderboard_wide(leaderboard(results))), markup=False, highlight=False, soft_wrap=True)


def print_rows(headers: list[str], rows: list[list[str]], ids: int = 1) -> None:
    """A table where it fits, else one block per row; the first `ids` columns are names a reader copies,
    so they are never cut or wrapped: the other columns wrap. Markup in cells is Rich's."""
    id_width = sum(max([len(Text.from_markup(r[i]).plain) for r in rows] + [len(headers[i])]) for i in range(ids))
    if id_width + 14 * (len(headers) - ids) + 3 * len(headers) + 1 <= out.width:
        table = Table(*headers)
        for column in table.columns[:ids]:
            column.no_wrap, column.overflow = True, "ignore"
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    for row in rows:
        out.print(Text.from_markup(f"[bold]{row[0]}[/]"), *(f"  {h}: {v}" for h, v in zip(headers[1:], row[1:]) if v),
                  sep="\n", soft_wrap=False, overflow="fold")
