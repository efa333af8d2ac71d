"""CLIP score: how well a generated image matches its prompt's text.

The raw cosine between the CLIP image embedding and the embedding of the prompt with its subject
placeholder filled by "a person" — the paper's scale (~0.22 for ViT-L/14). torchmetrics'
`CLIPScore` reports max(100 · cosine, 0) instead; multiply by 100 to compare.
"""

from __future__ import annotations

import math
from typing import ClassVar

from caphuman_bench.metrics._clip import CLIP_CONVENTION, clip_for, clip_weights
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreItem
from caphuman_bench.registry import register_metric


@register_metric("clip_score", higher_is_better=True, weights=("clip_vit_l14_openai",))
class ClipScore(BenchMetric):
    """Raw cosine between the CLIP embeddings of the generated image and its prompt (paper scale, ~0.22)."""

    convention: ClassVar[dict] = {
        "value": "raw cosine in [-1, 1] (the paper's scale); torchmetrics' CLIPScore = max(100 * cosine, 0)",
        "unreadable": "unreadable images are not scored (NaN, status unreadable)",
        **CLIP_CONVENTION,
    }

    @classmethod
    def required_weights(cls, options: dict) -> tuple[str, ...]:
        return clip_weights(options)

    def measure(self, items: list[ScoreItem]) -> list[ItemScore]:
        readable = [i for i, item in enumerate(items) if item.image is not None]
        cosines = {}
        if readable:
            clip = clip_for(self.context)
            images = clip.image_embeddings([items[i].image for i in readable])
            texts = clip.text_embeddings([items[i].prompt for i in readable])
            cosines = dict(zip(readable, (images * texts).sum(dim=-1).tolist()))
        return [
            ItemScore({self.metric_name: cosines[i]}) if i in cosines
            else ItemScore({self.metric_name: math.nan}, "unreadable", item.image_error or "image could not be read")
            for i, item in enumerate(items)
        ]
