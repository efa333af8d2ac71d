"""Calling the CLI in-process from tests, and reading what a run wrote."""

from __future__ import annotations

import hashlib
import sys

from caphuman_bench.cli import main


def cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """Run `caphuman-bench ARGS`; (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["caphuman-bench", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def image_digests(run_dir) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run_dir / "images").glob("*.png"))}


def only_run(runs_dir):
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    return run
