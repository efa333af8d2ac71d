"""Stage 1 — plan: the task list of a run, each task with its own seed, and sharding.

A task is (identity, prompt, head condition, sample index). Its seed is derived from the benchmark
version, the run's base seed and the task alone, so an image never depends on batch size, shard or
order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.errors import BenchError
from caphuman_bench.launch import env_number
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


def parse_shard(text: str | None, env: dict[str, str] | None = None) -> Shard:
    """`--shard i/n`, else the launcher's environment, else 0/1.

    Processes: RANK / WORLD_SIZE (torchrun, also multi-node, and `accelerate launch`), else
    SLURM_PROCID / SLURM_NTASKS (`srun`, one task per GPU). A Slurm job array multiplies them:
    array task a of A (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT) takes
    shards a·n … a·n + n − 1 of A·n, so every job of the array and every process in it gets its own.
    """
    if text:
        match = re.fullmatch(r"([0-9]+)/([0-9]+)", text.strip())
        if not match or not int(match[2]) or int(match[1]) >= int(match[2]):
            raise BenchError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/2")
        return Shard(int(match[1]), int(match[2]))
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        return env_number(name, default, env)

    if number("WORLD_SIZE", 1) > 1:
        index, count = number("RANK", 0), number("WORLD_SIZE", 1)
    elif number("SLURM_NTASKS", 1) > 1:
        index, count = number("SLURM_PROCID", 0), number("SLURM_NTASKS", 1)
    else:
        index, count = 0, 1
    if env.get("SLURM_ARRAY_TASK_ID") is not None and number("SLURM_ARRAY_TASK_COUNT", 1) > 1:
        array_index = number("SLURM_ARRAY_TASK_ID", 0) - number("SLURM_ARRAY_TASK_MIN", 0)
        array_count = number("SLURM_ARRAY_TASK_COUNT", 1)
        if not 0 <= array_index < array_count:
            raise BenchError(f"SLURM_ARRAY_TASK_ID {env['SLURM_ARRAY_TASK_ID']}: outside the array "
                             f"(SLURM_ARRAY_TASK_MIN {number('SLURM_ARRAY_TASK_MIN', 0)}, SLURM_ARRAY_TASK_COUNT {array_count}); "
                             "use a contiguous array such as --array=0-3")
        index, count = array_index * count + index, array_count * count
    if not 0 <= index < count:
        raise BenchError(f"process rank {index} is outside 0..{count - 1} (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    return Shard(index, count)


def export_tasks(bench: Benchmark, split_name: str, out_dir: str | os.PathLike, *, seed: int = 0, renders: str = "none",
                 size: int = 512) -> int:
    """The tasks of a split for a method run elsewhere (`caphuman-bench plan --export`), in `out_dir`:

    tasks.jsonl         one task a line: task_id (the image's file name), identity, subject, prompt_id, the
                        filled prompt, condition_id, sample, seed, the reference photo(s), and the head
                        condition as explicit FLAME parameters (yaw/pitch/roll in degrees, pose, exp, cam, light)
    references/         each identity's reference photo(s), <identity>.png (<identity>_<k>.png for more)
    conditions/         with `renders` flame or synthetic: <condition>/{normal,albedo,rendered}.png on FLAME's
                        mean head (identity-agnostic; methods steered by the reference's own head re-render it)
    Returns the number of tasks. The seeds are `run`'s, so an ingested run and a run here share tasks."""
    from caphuman_bench.atomic import write_text_atomic
    from caphuman_bench.images import save_png_atomic

    out = Path(out_dir)
    tasks = plan_tasks(bench, split_name, seed)
    references: dict[str, list[str]] = {}
    for identity_id in dict.fromkeys(t.identity_id for t in tasks):
        photos = bench.reference_images(identity_id)
        names = [f"{identity_id}.png"] + [f"{identity_id}_{k}.png" for k in range(1, len(photos))]
        for name, photo in zip(names, photos):
            save_png_atomic(photo, out / "references" / name)
        references[identity_id] = [f"references/{n}" for n in names]
    condition_ids = list(dict.fromkeys(t.condition_id for t in tasks))
    rendered = _export_renders(bench, condition_ids, out / "conditions", renders, size) if renders != "none" else {}
    lines = []
    for task in tasks:
        identity, condition = bench.identities[task.identity_id], bench.conditions[task.condition_id]
        lines.append(json.dumps({
            **task.to_dict(),
            "subject": identity.subject,
            "prompt": bench.prompts[task.prompt_id].fill(identity.subject),
            "references": references[task.identity_id],
            "condition": {"yaw": condition.yaw, "pitch": condition.pitch, "roll": condition.roll,
                          **{k: np.asarray(v).tolist() for k, v in condition.coefficients().items()}},
            **({"condition_renders": rendered[task.condition_id]} if rendered else {}),
        }))
    write_text_atomic(out / "tasks.jsonl", "\n".join(lines) + "\n")
    return len(tasks)


def _export_renders(bench: Benchmark, condition_ids: list[str], out: Path, renders: str, size: int) -> dict[str, dict]:
    from caphuman_bench.images import save_png_atomic
    from caphuman_bench.render.cli import to_images
    from caphuman_bench.render.head_condition import HeadConditionRenderer, neutral_identity_code

    renderer = HeadConditionRenderer.synthetic("cpu") if renders == "synthetic" else HeadConditionRenderer.from_weights("cpu")
    written = {}
    for condition_id in condition_ids:
        render = renderer.render(neutral_identity_code(), bench.conditions[condition_id], mode="all", size=size)
        written[condition_id] = {}
        for name, image in to_images(render).items():
            save_png_atomic(image, out / condition_id / f"{name}.png")
            written[condition_id][name] = f"conditions/{condition_id}/{name}.png"
    return written
