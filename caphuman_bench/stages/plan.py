"""Stage 1 — plan: the task list of a run, each task with its own seed, and sharding.

A task is (identity, prompt, head condition, sample index). Its seed is derived from the benchmark
version, the run's base seed and the task alone, so an image never depends on batch size, shard or
order.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.errors import BenchError
from caphuman_bench.tasks import Task


def task_seed(benchmark_version: str, base_seed: int, identity: str, prompt: str, condition: str, sample: int) -> int:
    key = f"{benchmark_version}|{base_seed}|{identity}|{prompt}|{condition}|{sample}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & (2**63 - 1)


def plan_tasks(bench: Benchmark, split_name: str, base_seed: int = 0) -> list[Task]:
    split = bench.split(split_name)
    if not split.identities:
        raise BenchError(
            f"{bench.root / 'splits.yaml'}: split {split_name!r} has no identities in this spec; its identities come "
            f"from `caphuman-bench data prepare --celeba-root DIR --out DIR` (or --identities-dir FACES), then pass "
            f"--spec DIR --identities-dir DIR/identities"
        )
    tasks = []
    for identity in split.identities:
        for prompt in split.prompts:
            for condition in split.conditions:
                for sample in range(split.samples):
                    tasks.append(Task(
                        task_id=f"{identity}__{prompt}__{condition}__s{sample}",
                        identity_id=identity, prompt_id=prompt, condition_id=condition, sample=sample,
                        seed=task_seed(bench.version, base_seed, identity, prompt, condition, sample),
                    ))
    return tasks


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def select(self, tasks: list[Task]) -> list[Task]:
        """Round-robin over the planned order: every shard gets a similar mix of identities."""
        return tasks[self.index :: self.count]

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"


def parse_shard(text: str | None) -> Shard:
    """`--shard i/n`, else RANK / WORLD_SIZE from torchrun or `accelerate launch`, else 0/1."""
    if text:
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not match or not int(match[2]) or int(match[1]) >= int(match[2]):
            raise BenchError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/2")
        return Shard(int(match[1]), int(match[2]))
    world, rank = os.environ.get("WORLD_SIZE", "1") or "1", os.environ.get("RANK", "0") or "0"
    if not (world.isdigit() and rank.isdigit() and int(rank) < max(int(world), 1)):
        raise BenchError(f"environment RANK={rank!r} WORLD_SIZE={world!r}: expected 0 <= RANK < WORLD_SIZE")
    return Shard(int(rank), int(world)) if int(world) > 1 else Shard(0, 1)
