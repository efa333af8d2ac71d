"""`head_overlay`: the reference photo with the target head's normal map laid over it, half and half.

Not a real method: the smallest head-aware adapter, to copy. It shows the three things such an
adapter does: declare its parameters, load the head models in `load`, and answer `generate` with one
PIL image per request. `HeadRenderMixin` (listed before `MethodAdapter`) gives it CapHuman's own
target head (the reference's DECA code mixed with the condition), its parameters and `head_target`,
so head control is scored against exactly what the method was steered to.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from caphuman_bench.methods.base import GenerationRequest, MethodAdapter
from caphuman_bench.methods.head_renders import HeadRenderMixin, normals_to_controlnet_image
from caphuman_bench.registry import register_method


@register_method("head_overlay")
class HeadOverlay(HeadRenderMixin, MethodAdapter):
    param_types = {**MethodAdapter.param_types, "mixing": str, "opacity": float, "tiny": bool}

    def load(self) -> None:
        # tiny: the synthetic FLAME head and the reconstructor's tiny model, no files; else FLAME and the
        # card's `reconstructor` (DECA by default) from the card's weights
        self.load_head_models(self.context.device, tiny=bool(self.params.get("tiny")))

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        opacity = float(self.params.get("opacity", 0.5))
        images = []
        for request in requests:
            size = (request.width, request.height)
            photo = np.asarray(ImageOps.fit(request.reference.convert("RGB"), size), dtype=np.float32)
            render = self.head_render(request.identity_id, request.reference, request.condition, request.height)
            normals = np.asarray(normals_to_controlnet_image(render.normal).resize(size), dtype=np.float32)
            alpha = opacity * np.asarray(Image.fromarray(render.mask[0] > 0).resize(size), dtype=np.float32)[..., None]
            images.append(Image.fromarray((photo * (1 - alpha) + normals * alpha).round().astype(np.uint8)))
        return images
