"""Stage 1b — finetune: per-identity weights of the fine-tuning baselines, before their runs are planned.

Resumable like generation: an identity whose artefact verifies (record complete, same reference photo,
subject phrase and training configuration, file sha256 as recorded) is skipped; one that does not is trained again
from the base model, never used. Identities are sharded like tasks (`--shard`, RANK / WORLD_SIZE).
A failure is reported with its reason and the other identities go on; a destination that cannot be
written (read-only, full) stops the stage before training, or at the first save that fails. Temp files
of a killed `finetune` are removed when the next one starts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from caphuman_bench import weights
from caphuman_bench.atomic import EnvironmentFault, check_writable, remove_stale_temps
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import MethodCard
from caphuman_bench.errors import BenchError
from caphuman_bench.finetune.artefacts import ArtefactStore
from caphuman_bench.finetune.training import class_prompt, identity_phrase, prior_preservation
from caphuman_bench.registry import get_method
from caphuman_bench.stages.plan import Shard, plan_tasks


@dataclass
class FinetuneSummary:
    root: str
    trained: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    retrained: dict[str, str] = field(default_factory=dict)  # identity -> why its old artefact was not used
    failures: dict[str, str] = field(default_factory=dict)


def fine_tuned_adapter(card: MethodCard) -> type:
    adapter_cls = get_method(card.adapter)
    if getattr(adapter_cls, "recipe", None) is None:
        raise BenchError(f"method {card.name!r} (adapter {card.adapter!r}) is not fine-tuned per identity; "
                         "`finetune` takes the cards of the textual_inversion, dreambooth and lora adapters")
    return adapter_cls


def finetune(card: MethodCard, bench: Benchmark, split: str, runs_dir, params: dict, *, device: str, shard: Shard,
             weights_paths: dict[str, str] | None = None, progress=None) -> FinetuneSummary:
    """Train what is missing for the identities of `split` (this shard's share); `params` already validated."""
    from caphuman_bench.finetune.components import load_sd15
    from caphuman_bench.finetune.training import ClassImages, Trainer

    adapter_cls = fine_tuned_adapter(card)
    resolved = weights.require(adapter_cls.training_weights(params), weights_paths)
    store = ArtefactStore(runs_dir, adapter_cls.recipe, params)
    summary = FinetuneSummary(root=str(store.root))
    if store.root.exists():
        remove_stale_temps(store.root)  # half-written weights of a killed finetune (1.7 GB each for DreamBooth)
    # The planned tasks' identities: an empty split stops here with plan_tasks' message on how to prepare it.
    identities = shard.select(list(dict.fromkeys(t.identity_id for t in plan_tasks(bench, split))))
    references = {i: bench.reference_sha256(i) for i in identities}
    todo = []
    for identity_id in identities:
        artefact, reason = store.verify(identity_id, references[identity_id], bench.identities[identity_id].subject,
                                        full=True)
        if artefact is not None:
            summary.kept.append(identity_id)
            continue
        if store.folder(identity_id).exists():
            summary.retrained[identity_id] = reason
        todo.append(identity_id)
    if not todo:
        return summary
    check_writable(store.root)  # a read-only or full destination stops before any training, not at each save

    base = load_sd15(resolved.get("stable_diffusion_v1_5"), tiny=bool(params.get("tiny")))
    class_images = {}  # class prompt -> its images, made (or completed) before any training
    if prior_preservation(adapter_cls.recipe, params):
        import torch

        maker = ClassImages(base, torch.device(device), torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        for prompt in sorted({class_prompt(params, bench.identities[i].subject) for i in todo}):
            class_images[prompt] = maker.ensure(store.class_images_folder(prompt), prompt,
                                                int(params["train_num_class_images"]), int(params.get("train_seed", 0)))
    trainer = Trainer(adapter_cls.recipe, base, params, device)
    bar = progress.add_task(f"finetune {card.name}", total=len(todo)) if progress else None
    for identity_id in todo:
        subject = bench.identities[identity_id].subject
        try:
            store.clear(identity_id)
            artefact = trainer.train(bench.reference_image(identity_id), subject, _identity_seed(params, identity_id),
                                     class_images=class_images.get(class_prompt(params, subject), []) if class_images else [])
            artefact.save(store.file(identity_id))
            store.write_record(identity_id, references[identity_id], subject,
                               identity_phrase(adapter_cls.recipe, subject, params), artefact.details())
            summary.trained.append(identity_id)
        except EnvironmentFault:
            raise  # the disk, not the identity: every later save would fail the same way
        except (RuntimeError, ValueError, BenchError) as exc:
            summary.failures[identity_id] = f"{type(exc).__name__}: {exc}"
        if progress:
            progress.advance(bar)
    return summary


def _identity_seed(params: dict, identity_id: str) -> int:
    """`train_seed` and the identity: one identity's artefact never depends on which others were trained."""
    digest = hashlib.sha256(f"{int(params.get('train_seed', 0))}|{identity_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)
