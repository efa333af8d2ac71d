"""Orchestration shared by `run` and `ablate`: plan a run directory, generate, score, aggregate.

The stages only talk through the run directory; this module just calls them in order.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import MethodCard
from caphuman_bench.provenance import config_hash, environment
from caphuman_bench.rundir import RunDir
from caphuman_bench.stages.plan import plan_tasks

BENCHMARK_NAME = "humaniphc"


def pick_device(device: str) -> str:
    """`auto` → the GPU of this process (LOCAL_RANK under torchrun / accelerate, SLURM_LOCALID under
    srun) or the CPU."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"
        # modulo: srun with --gpus-per-task shows each task only its own GPU as cuda:0
        return f"cuda:{int(local) % max(1, torch.cuda.device_count())}"
    return "cpu"


def run_label(card: MethodCard, preset: str | None, overrides: dict) -> str:
    label = card.name
    if overrides:
        label += "[" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) + "]"
    if preset:
        label += f" ({preset})"
    return label


@dataclass
class PlannedRun:
    run: RunDir
    params: dict
    label: str


def plan_run(card: MethodCard, bench: Benchmark, split: str, runs_dir: Path, *, preset: str | None = None,
             overrides: dict | None = None, seed: int = 0) -> PlannedRun:
    """Resolve the configuration, name the run directory by its hash, write run.json and tasks."""
    overrides = dict(overrides or {})
    params = card.resolve_params(preset, overrides)
    tasks = plan_tasks(bench, split, seed)
    references = {i: bench.reference_sha256(i) for i in dict.fromkeys(t.identity_id for t in tasks)}
    identity = {"card_hash": card.card_hash(), "params": params, "benchmark": BENCHMARK_NAME,
                "benchmark_version": bench.version, "spec_hash": bench.spec_hash, "split": split, "seed": seed,
                "references": references}
    chash = config_hash(identity)
    label = run_label(card, preset, overrides)
    run = RunDir(Path(runs_dir) / f"{card.name}-{split}-{chash[:10]}")
    info = {
        "label": label,
        "method": card.model_dump(),
        "card_hash": identity["card_hash"],
        "preset": preset,
        "overrides": overrides,
        "params": params,
        "seed": seed,
        "benchmark": {"name": BENCHMARK_NAME, "version": bench.version, "split": split, "spec_hash": bench.spec_hash,
                      "spec_root": str(bench.root.resolve()),
                      "identities_dir": str(bench.identities_dir.resolve()) if bench.identities_dir else None,
                "reference_sha256": references},
        "config_hash": chash,
        "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run.initialise(info, tasks)
    return PlannedRun(run, params, label)


def default_split(preset: str | None) -> str:
    return "demo" if preset == "smoke" else "full"
