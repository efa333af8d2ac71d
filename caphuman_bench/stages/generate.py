"""Stage 2 — generate: the images of a run's tasks that are not finished yet.

Resumable: an image whose last status is ok and whose file exists is never regenerated (unless
`force`); a failure is logged with its reason and the run goes on. Images are written atomically.
Each task is claimed before it is generated (`RunDir.claims`), so two processes on one run
directory (the same command twice) split the work instead of both doing all of it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from caphuman_bench import weights
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import MethodCard
from caphuman_bench.errors import BenchError, FaceNotFoundError
from caphuman_bench.methods.base import GenerationRequest, MethodContext
from caphuman_bench.pipelines.acceleration import NUMERIC_LEVERS
from caphuman_bench.registry import get_method
from caphuman_bench.rundir import RunDir
from caphuman_bench.stages.plan import Shard, Task
from caphuman_bench.stages.writer import ImageWriter

log = logging.getLogger(__name__)


@dataclass
class GenerateSummary:
    planned: int = 0
    generated: int = 0
    kept: int = 0
    failed: int = 0
    elsewhere: int = 0  # tasks another process was generating
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
    planned = run.tasks()
    claim_index = {t.task_id: i for i, t in enumerate(planned)}
    mine = shard.select(planned)
    finished = set() if force else run.finished_ids()
    todo = [t for t in mine if t.task_id not in finished]
    summary = GenerateSummary(planned=len(mine), kept=len(mine) - len(todo))
    if not todo:
        return summary

    # Pre-flight, before any model is built: weights present, reference photos readable.
    adapter_cls, resolved = method_weights(card, params, weights_paths)
    photos = {t.identity_id: bench.reference_images(t.identity_id) for t in todo}
    references = {identity_id: images[0] for identity_id, images in photos.items()}

    # Fine-tuned weights as planned; run.json holds their paths relative to the runs folder that holds the run.
    artefacts = {i: {**a, "path": str(run.path.parent / a["path"])} for i, a in run.info().get("artefacts", {}).items()}
    adapter = adapter_cls(card, params, MethodContext(device=device, workdir=run.cache_dir / "method", weights=resolved,
                                                      artefacts=artefacts))
    adapter.load()
    if getattr(adapter, "levers", None) is not None:
        run.record_levers(device, adapter.levers.as_dict(), fixed=NUMERIC_LEVERS)

    for identity_id, condition_id in dict.fromkeys((t.identity_id, t.condition_id) for t in todo):
        if _stored_target(run, identity_id, condition_id) is None:
            try:
                target = adapter.head_target(identity_id, references[identity_id], bench.conditions[condition_id])
            except FaceNotFoundError as exc:  # no head condition: its tasks fail with this reason below
                log.warning("%s", exc)
                continue
            if target is not None:
                run.write_target(identity_id, condition_id, target)

    task_bar = progress.add_task(f"generate {card.name}", total=len(todo)) if progress else None
    # PNG encoding and status lines overlap the next batch's denoising; a task's claim is released once
    # its image and status line are written (the writer closes before the claims do).
    with run.claims() as claims, ImageWriter() as writer:
        for batch in _batches(todo, max(1, int(params.get("batch_size", 1)))):
            claimed = _claim(run, claims, batch, claim_index, force)
            summary.elsewhere += len(batch) - len(claimed)
            _generate_batch(run, adapter, bench, claimed, photos, params, summary, writer,
                            release=lambda t: claims.release(claim_index[t.task_id]))
            if progress:
                progress.advance(task_bar, len(batch))
    return summary


def _claim(run: RunDir, claims, batch: list[Task], claim_index: dict[str, int], force: bool) -> list[Task]:
    """The tasks of `batch` this process now holds and no other process finished meanwhile."""
    claimed = [t for t in batch if claims.claim(claim_index[t.task_id])]
    if not force and any(run.image_path(t.task_id).exists() for t in claimed):
        finished = run.finished_ids()  # another process may have just finished some
        for t in [t for t in claimed if t.task_id in finished]:
            claims.release(claim_index[t.task_id])
        claimed = [t for t in claimed if t.task_id not in finished]
    return claimed


def _generate_batch(run: RunDir, adapter, bench: Benchmark, batch: list[Task], photos: dict[str, list], params: dict,
                    summary: GenerateSummary, writer: ImageWriter, release) -> None:
    if not batch:
        return
    height, width = int(params.get("height", 512)), int(params.get("width", 512))
    requests = [_request(t, bench, photos, height, width) for t in batch]
    started = time.perf_counter()
    try:
        images = adapter.generate(requests)
        if len(images) != len(batch):
            raise RuntimeError(f"adapter returned {len(images)} images for {len(batch)} requests")
    except (RuntimeError, ValueError, BenchError) as exc:
        for t in batch:
            run.append_status(t.task_id, "failed", f"{type(exc).__name__}: {exc}")
            release(t)
        summary.failed += len(batch)
        summary.failures.append(f"{batch[0].task_id}: {exc}")
    except BaseException:
        for t in batch:
            release(t)
        raise
    else:
        seconds = (time.perf_counter() - started) / len(batch)
        for t, image in zip(batch, images):
            writer.submit(image, run.image_path(t.task_id), then=lambda t=t: _finish(run, t, seconds, release))
        summary.generated += len(batch)


_STATUS_LOCK = threading.Lock()  # the writer's threads append status lines one at a time


def _finish(run: RunDir, task: Task, seconds: float, release) -> None:
    """After the image is in place: its `ok` line, then its claim goes."""
    with _STATUS_LOCK:
        run.append_status(task.task_id, "ok", seconds=seconds, seed=task.seed)
    release(task)


def _stored_target(run: RunDir, identity_id: str, condition_id: str):
    """A stored head target, or None when there is none or it is damaged (then it is rebuilt)."""
    try:
        return run.read_target(identity_id, condition_id)
    except BenchError as exc:
        log.warning("%s", exc)
        return None


def _request(task: Task, bench: Benchmark, photos: dict[str, list], height: int, width: int) -> GenerationRequest:
    identity = bench.identities[task.identity_id]
    generator = torch.Generator(device="cpu").manual_seed(task.seed)
    return GenerationRequest(
        task_id=task.task_id,
        identity_id=task.identity_id,
        prompt=bench.prompts[task.prompt_id].fill(identity.subject),
        subject=identity.subject,
        reference=photos[task.identity_id][0],
        references=photos[task.identity_id],
        condition=bench.conditions[task.condition_id],
        generator=generator,
        height=height,
        width=width,
    )
