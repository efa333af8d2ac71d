"""The fault sweeps' CLI helpers (test_reliability.py, test_reliability_sweep2.py); their tiny finished run,
the fixtures `spec`, `baseline` and `damaged`, is in conftest.py so that neither module imports a fixture."""

from __future__ import annotations

import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

from caphuman_bench.cli import main

METRICS = "face_detection"


def invoke(*args) -> tuple[int, str, str]:
    """`caphuman-bench ARGS` in-process: (exit code, stdout, stderr)."""
    out, err = StringIO(), StringIO()
    argv = sys.argv
    sys.argv = ["caphuman-bench", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result, *needles: str, code: int = 2) -> str:
    """Exit `code`, no traceback, and the last line is `error: …` containing every needle."""
    got, out, err = result
    assert "Traceback" not in out + err, err
    assert got == code, (got, err)
    line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert line.startswith("error: "), err
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def run_args(spec: Path, runs: Path, *extra) -> tuple:
    return ("run", "--method", "reference", "--preset", "smoke", "--split", "tiny", "--spec", spec,
            "--runs-dir", runs, "--metrics", METRICS, "--device", "cpu", *extra)
