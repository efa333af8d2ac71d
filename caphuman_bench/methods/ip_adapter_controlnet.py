"""The `ip_adapter_controlnet` baseline: SD-1.5 + IP-Adapter (plus-face) + ControlNet normalbae.

Identity: the reference photo through IP-Adapter `ip-adapter-plus-face_sd15` (CLIP ViT-H/14 image
encoder, penultimate hidden states → Resampler → 16 tokens in decoupled cross-attention), loaded with
diffusers' own `load_ip_adapter`. Head: ControlNet `control_v11p_sd15_normalbae` on the surface normals
of the same head render CapHuman is steered by (`HeadRenderMixin`: the reference's FLAME code, by `reconstructor`, mixed with
the condition), so head-control scoring compares both methods with the same target.

Normal map: `head_renders.normals_to_controlnet_image` (normalbae's convention).

With `tiny: true` (the smoke preset) every network has random weights and needs no file: a tiny UNet,
ControlNet, CLIP vision tower and an IP-Adapter state dict in the official file layout (the tiny
equivalent of diffusers' test helper `create_ip_adapter_plus_state_dict`), the synthetic FLAME head.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import GenerationRequest, MethodAdapter, check_latent_size, consecutive_batches
from caphuman_bench.methods.head_renders import HeadRenderMixin, head_weights, normals_to_controlnet_image
from caphuman_bench.methods.sd15 import SD15_DDIM, build_tiny_sd15_pipeline, weights_folder
from caphuman_bench.registry import register_method

MODEL_WEIGHTS = ("stable_diffusion_v1_5", "ip_adapter_plus_face_sd15", "ip_adapter_image_encoder_sd15",
                 "controlnet_normalbae_sd15")
FOLDERS = ("stable_diffusion_v1_5", "ip_adapter_image_encoder_sd15", "controlnet_normalbae_sd15")


# ----------------------------------------------------------------------------------------------
# the tiny smoke model


def tiny_ip_adapter_plus_state_dict(unet, image_embed_dim: int, generator: torch.Generator,
                                    hidden_dim: int = 64, num_queries: int = 16, depth: int = 4) -> dict:
    """Random IP-Adapter-plus weights in the official file layout ({"image_proj": Resampler, "ip_adapter":
    to_k_ip / to_v_ip of every cross-attention, numbered 1, 3, 5, ... in `attn_processors` order}).

    diffusers infers heads = to_q rows / 64, so `hidden_dim` is a multiple of 64.
    """
    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) / math.sqrt(shape[-1])

    output_dim = unet.config.cross_attention_dim
    proj: dict[str, torch.Tensor] = {
        "latents": torch.randn(1, num_queries, hidden_dim, generator=generator) / math.sqrt(hidden_dim),
        "proj_in.weight": draw(hidden_dim, image_embed_dim), "proj_in.bias": torch.zeros(hidden_dim),
        "proj_out.weight": draw(output_dim, hidden_dim), "proj_out.bias": torch.zeros(output_dim),
        "norm_out.weight": torch.ones(output_dim), "norm_out.bias": torch.zeros(output_dim),
    }
    for i in range(depth):
        for norm in (f"layers.{i}.0.norm1", f"layers.{i}.0.norm2", f"layers.{i}.1.0"):
            proj[f"{norm}.weight"], proj[f"{norm}.bias"] = torch.ones(hidden_dim), torch.zeros(hidden_dim)
        proj[f"layers.{i}.0.to_q.weight"] = draw(hidden_dim, hidden_dim)
        proj[f"layers.{i}.0.to_kv.weight"] = draw(2 * hidden_dim, hidden_dim)
        proj[f"layers.{i}.0.to_out.weight"] = draw(hidden_dim, hidden_dim)
        proj[f"layers.{i}.1.1.weight"] = draw(4 * hidden_dim, hidden_dim)
        proj[f"layers.{i}.1.3.weight"] = draw(hidden_dim, 4 * hidden_dim)
    attention: dict[str, torch.Tensor] = {}
    cross = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    for index, name in enumerate(cross):
        to_k = unet.get_submodule(name.removesuffix(".processor")).to_k.weight
        attention[f"{2 * index + 1}.to_k_ip.weight"] = draw(*to_k.shape)
        attention[f"{2 * index + 1}.to_v_ip.weight"] = draw(*to_k.shape)
    return {"image_proj": proj, "ip_adapter": attention}


def build_tiny_ip_adapter_controlnet_pipeline(seed: int = 0):
    """The tiny SD-1.5 + ControlNet + CLIP vision tower of `sd15`, IP-Adapter plus already loaded."""
    pipe = build_tiny_sd15_pipeline(controlnet=True, image_encoder=True, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    state_dict = tiny_ip_adapter_plus_state_dict(pipe.unet, pipe.image_encoder.config.hidden_size, generator)
    pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", low_cpu_mem_usage=False)
    return pipe


# ----------------------------------------------------------------------------------------------
# the adapter


@register_method("ip_adapter_controlnet")
class IPAdapterControlNetMethod(HeadRenderMixin, MethodAdapter):
    param_types = {
        **MethodAdapter.param_types,
        "num_inference_steps": int,
        "guidance_scale": float,
        "ip_adapter_scale": float,
        "controlnet_conditioning_scale": float,
        "negative_prompt": str,
        "mixing": str,
        "dtype": str,
        "tiny": bool,
    }

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        super().check_params(params, where)
        check_latent_size(params, where, square=True)

    @classmethod
    def required_weights(cls, card, params: dict[str, Any]) -> list[str]:
        return [] if params.get("tiny") else [*MODEL_WEIGHTS, *head_weights(params)]

    def load(self) -> None:
        self.device = torch.device(self.context.device)
        self.dtype = self.compute_dtype(self.device)
        self._codes: dict[str, dict[str, np.ndarray]] = {}
        self._ip_embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.params.get("tiny"):
            self.pipe = self.build_tiny_pipeline()
            if self.dtype != torch.float32:
                self.pipe.to(dtype=self.dtype)
            self.load_head_models(self.device, tiny=True)
        else:
            self._load_full()
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe = self.accelerate(self.pipe)  # the CUDA fast path (pipelines/acceleration.py)

    def build_tiny_pipeline(self):
        return build_tiny_ip_adapter_controlnet_pipeline(seed=0)

    def _load_full(self) -> None:
        from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        paths = self.context.weights
        folders = {wid: weights_folder(wid, Path(paths[wid])) for wid in FOLDERS}
        controlnet = ControlNetModel.from_pretrained(folders["controlnet_normalbae_sd15"], torch_dtype=self.dtype,
                                                     local_files_only=True)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(folders["ip_adapter_image_encoder_sd15"],
                                                                      dtype=self.dtype, local_files_only=True)
        # h94's image_encoder folder has no preprocessor config: IP-Adapter uses CLIPImageProcessor() (224 px).
        self.pipe = StableDiffusionControlNetPipeline.from_pretrained(
            folders["stable_diffusion_v1_5"], controlnet=controlnet, image_encoder=image_encoder,
            feature_extractor=CLIPImageProcessor(), safety_checker=None, requires_safety_checker=False,
            torch_dtype=self.dtype, local_files_only=True,
        )
        self.pipe.scheduler = DDIMScheduler(**SD15_DDIM)
        adapter_file = Path(paths["ip_adapter_plus_face_sd15"])
        # image_encoder_folder=None: the encoder is already registered from its own manifest entry.
        self.pipe.load_ip_adapter(str(adapter_file.parent), subfolder="", weight_name=adapter_file.name,
                                  image_encoder_folder=None, local_files_only=True)
        self.load_head_models(self.device, tiny=False)

    def control_image(self, request: GenerationRequest) -> Image.Image:
        render = self.head_render(request.identity_id, request.reference, request.condition, request.height)
        return normals_to_controlnet_image(render.normal)

    @torch.no_grad()
    def identity_embeds(self, identity_id: str, photos: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference, all-black image) CLIP penultimate hidden states [1, 1, T, D]: IP-Adapter plus's
        conditional and unconditional inputs (diffusers' `encode_image`), once per identity; with several
        photos (a `references` split), the mean of their hidden states."""
        if identity_id not in self._ip_embeds:
            encoded = [self.pipe.encode_image(p.convert("RGB"), self.device, 1, output_hidden_states=True) for p in photos]
            positive, negative = (torch.stack([e[i] for e in encoded]).mean(dim=0) for i in (0, 1))
            self._ip_embeds[identity_id] = (positive[None], negative[None])
        return self._ip_embeds[identity_id]

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        """Batches of consecutive requests of one identity: diffusers' pipeline gives every prompt of a
        call the same IP-Adapter image embedding (it repeats it batch_size times)."""
        batch_size = int(self.params.get("batch_size", 1))
        return [image for batch in consecutive_batches(requests, batch_size) for image in self._generate_batch(batch)]

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        sizes = {(r.height, r.width) for r in requests}
        if len(sizes) != 1 or any(h != w for h, w in sizes):
            raise BenchError(f"ip_adapter_controlnet: a batch needs one square size, got {sorted(sizes)}")
        size = sizes.pop()[0]
        negative = str(self.params.get("negative_prompt", ""))
        guidance_scale = float(self.params.get("guidance_scale", 7.5))
        output = self.pipe(
            [r.prompt for r in requests],
            image=[self.control_image(r) for r in requests],
            **self.identity_inputs(requests[0], guidance_scale > 1),
            negative_prompt=[negative] * len(requests),
            height=size,
            width=size,
            num_inference_steps=int(self.params.get("num_inference_steps", 50)),
            guidance_scale=guidance_scale,
            controlnet_conditioning_scale=float(self.params.get("controlnet_conditioning_scale", 1.0)),
            generator=[r.generator for r in requests],
            output_type="pil",
        )
        return list(output.images)

    def identity_inputs(self, request: GenerationRequest, guided: bool) -> dict[str, Any]:
        """The pipeline's IP-Adapter inputs for the request's identity (the card's scale set): its embedding
        [1, 1, T, D]; with guidance [2, ...], unconditional first."""
        self.pipe.set_ip_adapter_scale(float(self.params.get("ip_adapter_scale", 0.7)))
        positive, negative = self.identity_embeds(request.identity_id, request.references)
        return {"ip_adapter_image_embeds": [torch.cat([negative, positive]) if guided else positive]}
