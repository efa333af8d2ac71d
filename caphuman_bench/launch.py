"""Whole numbers the user or a launcher hands the process: `--shard i/n`, torchrun's and Slurm's
environment, $CAPHUMAN_BENCH_HOST_THREADS.

Each is read with `whole_number`: ASCII digits only (`str.isdigit` and `int` also take '²' or '٢'),
within its range, else one `BenchError` naming the variable. `check_environment` reads them all when the
CLI starts, before any import that parses them itself (torchmetrics reads LOCAL_RANK on import).
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from caphuman_bench.errors import BenchError

THREADS_ENV = "CAPHUMAN_BENCH_HOST_THREADS"  # threads for per-image host work (see parallel.host_threads)
# Each variable and its least value: a count is at least 1, an index at least 0.
ENVIRONMENT_MINIMUM = {
    "WORLD_SIZE": 1, "RANK": 0, "LOCAL_WORLD_SIZE": 1, "LOCAL_RANK": 0,
    "SLURM_NTASKS": 1, "SLURM_PROCID": 0, "SLURM_LOCALID": 0,
    "SLURM_ARRAY_TASK_COUNT": 1, "SLURM_ARRAY_TASK_ID": 0, "SLURM_ARRAY_TASK_MIN": 0,
    THREADS_ENV: 1,
}
_ASCII_DIGITS = re.compile(r"[0-9]+")


def whole_number(text: str, what: str, minimum: int = 0) -> int:
    """`text` as an int, written with the digits 0-9 only and at least `minimum`; else one error naming `what`."""
    if not _ASCII_DIGITS.fullmatch(text):
        raise BenchError(f"{what} {text!r}: expected a whole number written with the digits 0-9")
    value = int(text)
    if value < minimum:
        raise BenchError(f"{what} {text!r}: expected a whole number of at least {minimum}")
    return value


def env_number(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    """Environment variable `name` checked by `whole_number` (its least value from ENVIRONMENT_MINIMUM); unset or empty: `default`."""
    value = (os.environ if env is None else env).get(name) or ""
    return whole_number(value, f"environment {name}", ENVIRONMENT_MINIMUM.get(name, 0)) if value else default


def check_environment(env: Mapping[str, str] | None = None) -> None:
    """Every variable of ENVIRONMENT_MINIMUM that is set must be a whole number in its range."""
    for name in ENVIRONMENT_MINIMUM:
        env_number(name, 0, env)
