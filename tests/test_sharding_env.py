"""Launchers pick shards through environment variables only: torchrun (also multi-node), srun, and
Slurm job arrays; together they cover the plan exactly once."""

from __future__ import annotations

import pytest

from caphuman_bench.errors import BenchError
from caphuman_bench.stages.plan import Shard, parse_shard


def test_torchrun_multi_node_rank_is_global():
    # torchrun --nnodes 2 --nproc_per_node 4: node 1's third process
    assert parse_shard(None, {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == Shard(6, 8)


def test_srun_tasks_shard_by_procid():
    assert parse_shard(None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}) == Shard(3, 4)
    assert parse_shard(None, {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == Shard(0, 1)


def test_job_array_times_tasks_covers_every_shard_once():
    seen = []
    for array_id in (10, 11, 12):  # sbatch --array=10-12 --ntasks=2
        for procid in (0, 1):
            env = {"SLURM_ARRAY_TASK_ID": str(array_id), "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3",
                   "SLURM_PROCID": str(procid), "SLURM_NTASKS": "2"}
            seen.append(parse_shard(None, env))
    assert sorted(s.index for s in seen) == list(range(6)) and {s.count for s in seen} == {6}
    tasks = list(range(50))
    assert sorted(t for s in seen for t in s.select(tasks)) == tasks


def test_job_array_alone_and_with_torchrun():
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(2, 4)
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "3", "WORLD_SIZE": "4"}
    assert parse_shard(None, env) == Shard(7, 8)


def test_explicit_shard_wins_and_bad_environment_is_named():
    assert parse_shard("1/2", {"RANK": "3", "WORLD_SIZE": "4"}) == Shard(1, 2)
    with pytest.raises(BenchError, match="SLURM_ARRAY_TASK_ID 7"):
        parse_shard(None, {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(BenchError, match="outside"):
        parse_shard(None, {"SLURM_PROCID": "4", "SLURM_NTASKS": "4"})


def test_no_launcher_is_one_shard():
    assert parse_shard(None, {}) == Shard(0, 1)
