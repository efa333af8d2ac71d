"""Across processes: metric states reduce to the single-process aggregate; env-var sharding
(torchrun / accelerate) covers the plan exactly once."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreItem
from caphuman_bench.registry import MetricInfo

VALUES = np.array([0.1, 0.5, 0.25, 0.9, 0.7, 0.3, 0.45])


class ValueMetric(BenchMetric):
    """Reports the number encoded in the task id (a stand-in family for testing the reduction)."""

    metric_name = "value"
    info = MetricInfo("value", {"value": True}, (), "")

    def measure(self, items):
        return [ItemScore({"value": float(it.task_id)}) for it in items]


def _items(values):
    from PIL import Image

    image = Image.new("RGB", (32, 32))
    return [ScoreItem(str(v), "i", "p", "c", 0, image, image, "x") for v in values]


def _worker(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    metric = ValueMetric()
    metric.update(_items(VALUES[rank::world]))
    result = metric.compute()
    queue.put((rank, result["value"]))
    dist.barrier()
    dist.destroy_process_group()


def test_metric_states_reduce_across_processes(tmp_path):
    single = ValueMetric()
    single.update(_items(VALUES))
    expected = single.compute()["value"]
    assert expected["n"] == len(VALUES)
    assert math.isclose(expected["mean"], VALUES.mean()) and math.isclose(expected["std"], VALUES.std(ddof=1))

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), queue), nprocs=2, start_method="spawn", join=True)
    for _ in range(2):
        rank, got = queue.get()
        assert got["n"] == expected["n"]
        assert math.isclose(got["mean"], expected["mean"], rel_tol=1e-12)
        assert math.isclose(got["std"], expected["std"], rel_tol=1e-9)


@pytest.mark.slow
def test_rank_and_world_size_shard_like_torchrun(tmp_path):
    """Two processes with RANK/WORLD_SIZE (what torchrun and accelerate set) produce the plan once."""
    runs = tmp_path / "runs"
    base = [sys.executable, "-m", "caphuman_bench.cli", "run", "--method", "reference", "--preset", "smoke",
            "--runs-dir", str(runs), "--no-score"]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(base, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all("generated 6" in err for _, err in outputs)
    (run,) = list(runs.iterdir())
    assert len(list((run / "images").glob("*.png"))) == 12
    assert "shard 0/2" in outputs[0][1] and "shard 1/2" in outputs[1][1]
