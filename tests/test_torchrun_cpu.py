"""torchrun on CPU: two processes (rank → shard, one shared run directory) give the images and the
scores of one process, byte for byte and value for value."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ARGS = ["run", "--method", "caphuman", "--preset", "smoke", "--metrics", "face_detection", "--device", "cpu"]


def _run(command: list[str], runs: Path) -> Path:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([*command, "-m", "caphuman_bench.cli", *ARGS, "--runs-dir", str(runs)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def _images(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "images").glob("*.png"))}


@pytest.mark.slow
def test_two_torchrun_processes_equal_one(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    one = _run([sys.executable], tmp_path / "one")
    two = _run([torchrun, "--standalone", "--nproc_per_node", "2", "--no-python", sys.executable], tmp_path / "two")
    assert one.name == two.name  # same configuration hash
    assert len(_images(one)) == 12 and _images(one) == _images(two)
    columns = ["task_id", "metric", "status", "image_sha256", "face_detection", "extra"]
    a, b = (pd.read_parquet(r / "scores.parquet").sort_values(["task_id", "metric"]).reset_index(drop=True) for r in (one, two))
    shared = [c for c in columns if c in a.columns]
    pd.testing.assert_frame_equal(a[shared], b[shared])
    statuses = [line for line in (two / "status.jsonl").read_text().splitlines() if '"ok"' in line]
    assert len(statuses) == 12  # each task generated once, by one of the two ranks
