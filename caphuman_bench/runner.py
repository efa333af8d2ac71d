"""Orchestration shared by `run` and `ablate`: plan a run directory, generate, score, aggregate.

The stages only talk through the run directory; this module just calls them in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import MethodCard
from caphuman_bench.errors import BenchError
from caphuman_bench.launch import env_number
from caphuman_bench.plugins import outside_code_sha256
from caphuman_bench.provenance import config_hash, environment
from caphuman_bench.registry import get_method
from caphuman_bench.rundir import RunDir
from caphuman_bench.stages.plan import plan_tasks

BENCHMARK_NAME = "humaniphc"


def pick_device(device: str) -> str:
    """`auto` → the GPU of this process (LOCAL_RANK under torchrun / accelerate, SLURM_LOCALID under
    srun) or the CPU; any other name is checked here, so a bad `--device` is one error before any work."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        local = env_number("LOCAL_RANK", env_number("SLURM_LOCALID", 0))
        # modulo: srun with --gpus-per-task shows each task only its own GPU as cuda:0
        return f"cuda:{local % max(1, torch.cuda.device_count())}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise BenchError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device!r}: no CUDA GPU is available here; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise BenchError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise BenchError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")
    return device


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
    adapter = get_method(card.adapter)
    outside_code = outside_code_sha256(adapter.__module__)
    if outside_code:  # an outside adapter's code is part of the configuration: an edited file is a new run
        identity["adapter_sha256"] = outside_code
    artefacts = adapter.artefacts(card, params, bench, list(references), Path(runs_dir))
    if artefacts:  # fine-tuned weights: a retrained artefact is another configuration
        identity["artefacts"] = {i: a["sha256"] for i, a in artefacts.items()}
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
        **({"artefacts": artefacts} if artefacts else {}),
        "config_hash": chash,
        "head_inputs": getattr(adapter, "head_inputs", lambda params: None)(params),
        "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run.initialise(info, tasks)
    return PlannedRun(run, params, label)


def default_split(preset: str | None) -> str:
    return "demo" if preset == "smoke" else "full"
