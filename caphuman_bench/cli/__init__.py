"""`caphuman-bench`: a thin Typer layer over the stages (plan → generate → score → report).

One module per group of commands (`run`, `results`, `catalogue`); `common` holds what they share.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.markup import escape

from caphuman_bench.cli.common import app, console
from caphuman_bench.errors import BenchError

# Each module registers its commands on `app`; `--help` lists them in this order.
for _group in ("run", "ingest", "results", "catalogue"):
    importlib.import_module(f"{__name__}.{_group}")


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
    from caphuman_bench.quiet import quiet_console

    def fail(message: str, code: int = 2) -> None:
        console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # one line, never wrapped
        sys.exit(code)

    try:
        check_environment()  # before torchmetrics' import reads LOCAL_RANK
        with quiet_console():
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

