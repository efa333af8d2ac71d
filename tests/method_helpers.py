"""Building a method's smoke adapter and its generation requests in tests."""

from __future__ import annotations

import numpy as np
import torch

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.methods.base import GenerationRequest


def generation_request(bench: Benchmark, identity_id: str = "nasa-astronaut", condition_id: str = "yaw-r20", seed: int = 3,
                       size: int = 64, prompt_id: str = "acc-red-hat", prompt: str | None = None) -> GenerationRequest:
    """One task's request as the generate stage builds it (prompt filled with the identity's subject phrase)."""
    subject = bench.identities[identity_id].subject
    return GenerationRequest(
        task_id=f"{identity_id}-{condition_id}-{seed}", identity_id=identity_id,
        prompt=prompt or bench.prompts[prompt_id].fill(subject), subject=subject,
        reference=bench.reference_image(identity_id), condition=bench.conditions[condition_id],
        generator=torch.Generator().manual_seed(seed), height=size, width=size,
    )


def generated_pixels(adapter, bench: Benchmark, overrides: dict | None = None, *, head_of: str | None = None,
                     **request) -> np.ndarray:
    """The image of one request with some parameters overridden for this call only. `head_of`: a head-aware
    adapter draws the head with that identity's code instead of the reference's (the reference photo still
    reaches every other input), so a test can close the head's path from the photo."""
    saved = dict(adapter.params)
    adapter.params.update(overrides or {})
    one = generation_request(bench, **request)
    if head_of is not None:
        one.identity_id = f"{one.identity_id}-with-the-head-of-{head_of}"
        adapter._codes[one.identity_id] = adapter.photo_code(head_of, bench.reference_image(head_of))
    try:
        (image,) = adapter.generate([one])
    finally:
        adapter.params.clear()
        adapter.params.update(saved)
    return np.asarray(image)
