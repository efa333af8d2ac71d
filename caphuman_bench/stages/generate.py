"""Stage 2 — generate: the images of a run's tasks that are not finished yet.

Resumable: an image whose last status is ok and whose file exists is never regenerated (unless
`force`); a failure is logged with its reason and the run goes on. Images are written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from caphuman_bench import weights
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import MethodCard
from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import GenerationRequest, MethodContext
from caphuman_bench.registry import get_method
from caphuman_bench.rundir import RunDir
from caphuman_bench.stages.plan import Shard, Task
from caphuman_bench.stages.writer import ImageWriter


@dataclass
class GenerateSummary:
    planned: int = 0
    generated: int = 0
    kept: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def method_weights(card: MethodCard, params: dict, weights_paths: dict[str, str] | None = None) -> tuple[type, dict]:
    """The card's adapter class (its parameters checked) and its weights files; every missing one named in one error."""
    adapter_cls = get_method(card.adapter)
    adapter_cls.check_params(params, card.path or card.name)
    return adapter_cls, weights.require(adapter_cls.required_weights(card, params), weights_paths)


def generate(run: RunDir, bench: Benchmark, card: MethodCard, params: dict, *, device: str, shard: Shard,
             force: bool = False, weights_paths: dict[str, str] | None = None, progress=None) -> GenerateSummary:
    mine = shard.select(run.tasks())
    finished = set() if force else run.finished_ids()
    todo = [t for t in mine if t.task_id not in finished]
    summary = GenerateSummary(planned=len(mine), kept=len(mine) - len(todo))
    if not todo:
        return summary

    # Pre-flight, before any model is built: weights present, reference photos readable.
    adapter_cls, resolved = method_weights(card, params, weights_paths)
    references = {t.identity_id: bench.reference_image(t.identity_id) for t in todo}

    adapter = adapter_cls(card, params, MethodContext(device=device, workdir=run.cache_dir / "method", weights=resolved))
    adapter.load()

    for identity_id, condition_id in dict.fromkeys((t.identity_id, t.condition_id) for t in todo):
        if run.read_target(identity_id, condition_id) is None:
            target = adapter.head_target(identity_id, references[identity_id], bench.conditions[condition_id])
            if target is not None:
                run.write_target(identity_id, condition_id, target)

    height, width = int(params.get("height", 512)), int(params.get("width", 512))
    task_bar = progress.add_task(f"generate {card.name}", total=len(todo)) if progress else None
    writer = ImageWriter()  # PNG encoding and status lines overlap the next batch's denoising
    for batch in _batches(todo, max(1, int(params.get("batch_size", 1)))):
        requests = [_request(t, bench, references, height, width) for t in batch]
        started = time.perf_counter()
        try:
            images = adapter.generate(requests)
            if len(images) != len(batch):
                raise RuntimeError(f"adapter returned {len(images)} images for {len(batch)} requests")
        except (RuntimeError, ValueError, BenchError) as exc:
            for t in batch:
                run.append_status(t.task_id, "failed", f"{type(exc).__name__}: {exc}")
            summary.failed += len(batch)
            summary.failures.append(f"{batch[0].task_id}: {exc}")
        else:
            seconds = (time.perf_counter() - started) / len(batch)
            for t, image in zip(batch, images):
                writer.submit(image, run.image_path(t.task_id),
                              then=lambda t=t, s=seconds: run.append_status(t.task_id, "ok", seconds=s, seed=t.seed))
            summary.generated += len(batch)
        if progress:
            progress.advance(task_bar, len(batch))
    writer.close()
    return summary


def _request(task: Task, bench: Benchmark, references, height: int, width: int) -> GenerationRequest:
    identity = bench.identities[task.identity_id]
    generator = torch.Generator(device="cpu").manual_seed(task.seed)
    return GenerationRequest(
        task_id=task.task_id,
        identity_id=task.identity_id,
        prompt=bench.prompts[task.prompt_id].fill(identity.subject),
        reference=references[task.identity_id],
        condition=bench.conditions[task.condition_id],
        generator=generator,
        height=height,
        width=width,
    )
