"""CLIP score: how well a generated image matches its prompt's text.

The raw cosine between the CLIP image embedding and the prompt's — the paper's scale (~0.22 for
ViT-L/14). Under the default protocol `fastcomposer` exactly FastComposer's `txt_to_img_similarity`: the
prompt with the identity's class word, the float-tensor preprocessing, fp16 on CUDA; `caphuman-bench`
fills the placeholder with "a person" and uses open_clip's PIL preprocessing in fp32 (metrics/protocol.py).
torchmetrics' `CLIPScore` reports max(100 · mean cosine, 0) over a batch instead (it clamps the batch mean,
not each image); multiply by 100 to compare.
"""

from __future__ import annotations

import math
from typing import ClassVar

from caphuman_bench.metrics._clip import CLIP_CONVENTION, clip_for, clip_numerics, clip_weights
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreItem
from caphuman_bench.metrics.protocol import PROTOCOL_CONVENTION, scoring_protocol
from caphuman_bench.registry import register_metric


@register_metric("clip_score", higher_is_better=True, weights=("clip_vit_l14_openai",))
class ClipScore(BenchMetric):
    """Raw cosine between the CLIP embeddings of the generated image and its prompt (paper scale, ~0.22)."""

    convention: ClassVar[dict] = {
        "value": "raw cosine in [-1, 1] per image, the paper's scale (torchmetrics' CLIPScore = max(100 * mean cosine, 0))",
        "unreadable": "unreadable images are not scored (NaN, status unreadable)",
        **CLIP_CONVENTION,
        **PROTOCOL_CONVENTION,
    }

    @classmethod
    def required_weights(cls, options: dict) -> tuple[str, ...]:
        return clip_weights(options)

    def numerics(self) -> dict:
        return clip_numerics(self.context, scoring_protocol(self.context.options).clip_fp16_on_cuda)

    def measure(self, items: list[ScoreItem]) -> list[ItemScore]:
        readable = [i for i, item in enumerate(items) if item.image is not None]
        cosines = {}
        if readable:
            protocol = scoring_protocol(self.context.options)
            clip = clip_for(self.context, fp16_on_cuda=protocol.clip_fp16_on_cuda)
            images = clip.image_embeddings([items[i].image for i in readable], protocol.clip_image)
            subject = protocol.clip_text == "subject"
            texts = clip.text_embeddings([(items[i].subject_prompt or items[i].prompt) if subject else items[i].prompt
                                          for i in readable])
            cosines = dict(zip(readable, (images * texts).sum(dim=-1).tolist()))
        return [
            ItemScore({self.metric_name: cosines[i]}) if i in cosines
            else ItemScore({self.metric_name: math.nan}, "unreadable", item.image_error or "image could not be read")
            for i, item in enumerate(items)
        ]
