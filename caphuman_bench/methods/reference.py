"""The `reference` method: returns the identity's reference photo itself.

It is the identity upper bound every leaderboard should show: what ID similarity a perfect copy
of the reference scores under each recogniser (it ignores prompt and head condition, so its CLIP
score and head control are lower bounds of a different kind).
"""

from __future__ import annotations

from PIL import Image, ImageOps

from caphuman_bench.methods.base import GenerationRequest, MethodAdapter
from caphuman_bench.registry import register_method


@register_method("reference")
class ReferenceMethod(MethodAdapter):
    param_types = {**MethodAdapter.param_types, "resize": bool}

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        images = []
        for request in requests:
            image = request.reference.convert("RGB")
            if self.params.get("resize", True):  # centre crop to the aspect, then resize: no squashed faces
                image = ImageOps.fit(image, (request.width, request.height), Image.Resampling.LANCZOS)
            images.append(image)
        return images
