"""Prompt accuracy: CLIP zero-shot recognition of an image's own prompt among the benchmark's prompts.

Our reading (the paper does not spell it out): an image counts as correct at k when, among all
prompts of the benchmark's prompt set (each with its subject placeholder filled by "a person"),
fewer than k prompts are strictly more similar to the image than its own prompt. Top-1 and top-5
are reported; a top-k with k >= the number of distinct prompts would be trivially 1 and is NaN.
"""

from __future__ import annotations

import math
from typing import ClassVar

from caphuman_bench.metrics._clip import CLIP_CONVENTION, clip_for, clip_numerics, clip_weights
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreItem
from caphuman_bench.metrics.protocol import scoring_protocol
from caphuman_bench.registry import register_metric

TOP_K = {"prompt_acc_top1": 1, "prompt_acc_top5": 5}


@register_metric("prompt_accuracy", higher_is_better={name: True for name in TOP_K}, weights=("clip_vit_l14_openai",))
class PromptAccuracy(BenchMetric):
    """Top-1 / top-5 CLIP zero-shot accuracy of an image's own prompt among the benchmark's prompts."""

    convention: ClassVar[dict] = {
        "value": "1 if fewer than k prompts of the benchmark's prompt set are strictly more CLIP-similar to "
        "the image than its own prompt, else 0; the mean is top-k accuracy; NaN when k >= number of prompts",
        "candidates": "all distinct prompts of the benchmark (ScoreContext.prompts), placeholder filled by 'a person'",
        "clip": "the scoring protocol's CLIP model, precision and image preprocessing, as clip_score's (one CLIP per protocol)",
        "unreadable": "unreadable images are not scored (NaN, status unreadable)",
        **CLIP_CONVENTION,
    }

    @classmethod
    def required_weights(cls, options: dict) -> tuple[str, ...]:
        return clip_weights(options)

    def numerics(self) -> dict:
        return clip_numerics(self.context, scoring_protocol(self.context.options).clip_fp16_on_cuda)

    def measure(self, items: list[ScoreItem]) -> list[ItemScore]:
        candidates = list(dict.fromkeys(self.context.prompts))
        index = {prompt: i for i, prompt in enumerate(candidates)}
        nan = {name: math.nan for name in TOP_K}
        scorable = [i for i, item in enumerate(items) if item.image is not None and item.prompt in index]
        ranks = {}
        if scorable:  # the protocol's CLIP, as clip_score's: the two share the model and the image embeddings
            protocol = scoring_protocol(self.context.options)
            clip = clip_for(self.context, fp16_on_cuda=protocol.clip_fp16_on_cuda)
            images = clip.image_embeddings([items[i].image for i in scorable], protocol.clip_image)
            similarity = images @ clip.text_embeddings(candidates).T
            for row, i in zip(similarity, scorable):
                own = row[index[items[i].prompt]]
                ranks[i] = int((row > own).sum())  # 0 = its own prompt is the most similar
        rows = []
        for i, item in enumerate(items):
            if item.image is None:
                rows.append(ItemScore(dict(nan), "unreadable", item.image_error or "image could not be read"))
            elif i not in ranks:
                rows.append(ItemScore(dict(nan), "error", f"prompt {item.prompt!r} is not in the benchmark's prompt set "
                                                          f"({len(candidates)} prompts)"))
            else:
                values = {name: (float(ranks[i] < k) if k < len(candidates) else math.nan) for name, k in TOP_K.items()}
                rows.append(ItemScore(values, "ok", "", {"rank": ranks[i] + 1, "n_prompts": len(candidates)}))
        return rows
