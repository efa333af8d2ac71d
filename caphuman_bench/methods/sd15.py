"""Stable Diffusion 1.5 without identity: the prompt-only floor (`sd15`) and ControlNet head control
(`controlnet_head`, `controlnet_landmarks`), one adapter parameterised by `controlnet`.

- `controlnet: none`: diffusers' `StableDiffusionPipeline`, the prompt alone.
- `controlnet: normals`: `lllyasviel/control_v11p_sd15_normalbae` on the normals of the head render
  CapHuman is steered by (`HeadRenderMixin`: the reference's FLAME code, DECA's unless `reconstructor`
  says otherwise, mixed with the condition), in
  normalbae's convention (`head_renders.normals_to_controlnet_image`). The reference photo enters only
  through that render's FLAME shape; there is no identity embedding.
- `controlnet: landmarks`: `lllyasviel/control_v11p_sd15_openpose` on the 68 FLAME landmarks of the
  same head (`render.landmarks`), drawn as ControlNet 1.1's openpose annotator draws a face (white
  dots on black, `draw_openpose_face`), those on surfaces turned away from the camera left out as the
  annotator's detector would not find them: the landmark-guided row.

Sampler defaults are the authors' (written in the cards with their source): CompVis' txt2img script
for the floor, ControlNet 1.1's gradio demos (DDIM, 20 steps, scale 9, eta 1, "best quality" added
to the prompt, its negative prompt) for the ControlNet rows.

Also here, shared by every SD-1.5 adapter: the DDIM settings, the check of a folder-shaped weights
entry, and the tiny random SD-1.5 (± ControlNet, ± CLIP vision tower) of the smoke preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import GenerationRequest, MethodAdapter, check_latent_size, consecutive_batches
from caphuman_bench.methods.head_renders import HeadRenderMixin, head_weights, normals_to_controlnet_image
from caphuman_bench.registry import register_method

# SD-1.5's scheduler_config.json as DDIM (what CompVis' txt2img, ControlNet's demos and IP-Adapter's
# notebooks sample with).
SD15_DDIM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}

# What each folder-shaped weights entry must hold for `from_pretrained` with local files only.
FOLDER_FILES = {
    "stable_diffusion_v1_5": ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                              "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"),
    "ip_adapter_image_encoder_sd15": ("config.json",),
    "controlnet_normalbae_sd15": ("config.json",),
    "controlnet_openpose_sd15": ("config.json",),
}
CONTROLNET_WEIGHTS = {"none": None, "normals": "controlnet_normalbae_sd15", "landmarks": "controlnet_openpose_sd15"}


def weights_folder(weights_id: str, path: Path) -> Path:
    """A folder entry resolves to the folder itself or to one file inside it (HF cache): the folder."""
    folder = path if path.is_dir() else path.parent
    missing = [f for f in FOLDER_FILES.get(weights_id, ()) if not (folder / f).exists()]
    if missing:
        raise BenchError(f"{folder}: weights {weights_id!r} incomplete, missing {', '.join(missing)}")
    return folder


def build_tiny_sd15_pipeline(controlnet: bool, image_encoder: bool, context_dim: int = 32, seed: int = 0):
    """SD-1.5's layout at toy size (64 px images, 8×8 latents), random weights: a
    `StableDiffusionControlNetPipeline` with `controlnet`, else a `StableDiffusionPipeline`; with
    `image_encoder`, a tiny CLIP vision tower for IP-Adapters that read CLIP hidden states."""
    from diffusers import (ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from caphuman_bench.loaders.convert_caphuman import clip_tokenizer
    from caphuman_bench.pipelines.tiny import redraw_like_reference, tiny_text_encoder, tiny_vae

    blocks = {"block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": context_dim,
              "attention_head_dim": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=8, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **blocks)
        # 64 px → 8 px: three stride-2 convs in the hint encoder, as SD's 512 → 64.
        control = ControlNetModel(conditioning_embedding_out_channels=(16, 16, 32, 32), **blocks) if controlnet else None
        vae, text_encoder = tiny_vae(), tiny_text_encoder(context_dim, 77)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8)).eval() if image_encoder else None
    generator = torch.Generator().manual_seed(seed)
    # diffusers zero-initialises ControlNet's zero convs: redraw so the head condition acts.
    for module in (unet, control):
        if module is not None:
            redraw_like_reference(module, generator)
    parts = dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(77), unet=unet.eval(),
                 scheduler=DDIMScheduler(**SD15_DDIM), safety_checker=None,
                 feature_extractor=CLIPImageProcessor(size=32, crop_size=32), image_encoder=vision,
                 requires_safety_checker=False)
    if control is not None:
        return StableDiffusionControlNetPipeline(controlnet=control.eval(), **parts)
    return StableDiffusionPipeline(**parts)


@register_method("sd15")
class StableDiffusion15Method(HeadRenderMixin, MethodAdapter):
    param_types = {
        **MethodAdapter.param_types,
        "num_inference_steps": int,
        "guidance_scale": float,
        "eta": float,
        "negative_prompt": str,
        "added_prompt": str,
        "controlnet": str,
        "controlnet_conditioning_scale": float,
        "mixing": str,
        "dtype": str,
        "tiny": bool,
    }
    tiny_context_dim = 32  # the tiny UNet's cross-attention width

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        super().check_params(params, where)
        controlnet = str(params.get("controlnet", "none"))
        if controlnet not in CONTROLNET_WEIGHTS:
            raise BenchError(f"{where}: parameter 'controlnet' must be one of {', '.join(CONTROLNET_WEIGHTS)}, got {controlnet!r}")
        check_latent_size(params, where, square=controlnet != "none")

    @classmethod
    def required_weights(cls, card, params: dict[str, Any]) -> list[str]:
        if params.get("tiny"):
            return []
        controlnet = str(params.get("controlnet", "none"))
        needed = ["stable_diffusion_v1_5"]
        if controlnet != "none":
            needed += [CONTROLNET_WEIGHTS[controlnet], *head_weights(params)]
        if controlnet == "landmarks":
            needed.append("flame_landmark_embedding")
        return needed

    @property
    def controlnet(self) -> str:
        return str(self.params.get("controlnet", "none"))

    # ------------------------------------------------------------------------------------------
    # loading

    def load(self) -> None:
        self.device = torch.device(self.context.device)
        self.dtype = self.compute_dtype(self.device)
        self._codes: dict[str, dict[str, np.ndarray]] = {}
        tiny = bool(self.params.get("tiny"))
        self.pipe = self.build_tiny_pipeline() if tiny else self.build_pipeline()
        if tiny and self.dtype != torch.float32:
            self.pipe.to(dtype=self.dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe = self.accelerate(self.pipe)  # the CUDA fast path (pipelines/acceleration.py)
        if self.controlnet != "none":
            self._load_head(tiny)

    def build_tiny_pipeline(self):
        return build_tiny_sd15_pipeline(self.controlnet != "none", image_encoder=False, context_dim=self.tiny_context_dim)

    def build_pipeline(self, image_encoder=None):
        """SD-1.5 (and the card's ControlNet) from their manifest folders; DDIM as the cards' sources sample."""
        from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
        from transformers import CLIPImageProcessor

        paths = self.context.weights
        parts = dict(image_encoder=image_encoder, feature_extractor=CLIPImageProcessor(), safety_checker=None,
                     requires_safety_checker=False, torch_dtype=self.dtype, local_files_only=True)
        base = weights_folder("stable_diffusion_v1_5", Path(paths["stable_diffusion_v1_5"]))
        if self.controlnet == "none":
            pipe = StableDiffusionPipeline.from_pretrained(base, **parts)
        else:
            weights_id = CONTROLNET_WEIGHTS[self.controlnet]
            controlnet = ControlNetModel.from_pretrained(weights_folder(weights_id, Path(paths[weights_id])),
                                                         torch_dtype=self.dtype, local_files_only=True)
            pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet, **parts)
        pipe.scheduler = DDIMScheduler(**SD15_DDIM)
        return pipe

    def _load_head(self, tiny: bool) -> None:
        """The head renderer, reconstructor (and landmark embedding) the ControlNet's condition image is drawn from."""
        from caphuman_bench.render.landmarks import HeadLandmarks, LandmarkEmbedding

        paths = self.context.weights
        self.load_head_models(self.device, tiny=tiny)
        if self.controlnet == "landmarks":
            embedding = LandmarkEmbedding.synthetic() if tiny else LandmarkEmbedding.from_file(paths["flame_landmark_embedding"])
            self.landmarks = HeadLandmarks(self.renderer, embedding)

    # ------------------------------------------------------------------------------------------
    # generation

    def control_image(self, request: GenerationRequest) -> Image.Image:
        """The ControlNet's condition image of the request's head (normals or drawn landmarks)."""
        from caphuman_bench.render.landmarks import draw_openpose_face

        if self.controlnet == "normals":
            render = self.head_render(request.identity_id, request.reference, request.condition, request.height)
            return normals_to_controlnet_image(render.normal)
        if self.controlnet == "landmarks":
            target = self.head_render(request.identity_id, request.reference, request.condition, request.height).target
            points = self.landmarks.of_target(target, request.height)
            return draw_openpose_face(points, request.width, request.height, visible=self.landmarks.facing_camera(target))
        raise BenchError(f"{self.card.name}: no ControlNet (parameter 'controlnet' is 'none'), so no condition image")

    def head_target(self, identity_id: str, reference: Image.Image, condition):
        return None if self.controlnet == "none" else super().head_target(identity_id, reference, condition)

    def group_key(self, request: GenerationRequest):
        """Requests that may share one pipeline call (all of them here: nothing identity-specific)."""
        return None

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        """Consecutive requests of one `group_key` and size go through the pipeline together."""
        batches = consecutive_batches(requests, int(self.params.get("batch_size", 1)),
                                      key=lambda r: (self.group_key(r), r.height, r.width))
        return [image for batch in batches for image in self._generate_batch(batch)]

    def extra_pipeline_inputs(self, requests: list[GenerationRequest], guided: bool) -> dict[str, Any]:
        """What a subclass adds to the pipeline call (identity embeddings)."""
        return {}

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        added = str(self.params.get("added_prompt", ""))
        guidance_scale = float(self.params.get("guidance_scale", 7.5))
        inputs: dict[str, Any] = {}
        if self.controlnet != "none":
            inputs["image"] = [self.control_image(r) for r in requests]
            inputs["controlnet_conditioning_scale"] = float(self.params.get("controlnet_conditioning_scale", 1.0))
        output = self.pipe(
            [f"{r.prompt}, {added}" if added else r.prompt for r in requests],
            negative_prompt=[str(self.params.get("negative_prompt", ""))] * len(requests),
            height=requests[0].height,
            width=requests[0].width,
            num_inference_steps=int(self.params.get("num_inference_steps", 50)),
            guidance_scale=guidance_scale,
            eta=float(self.params.get("eta", 0.0)),
            generator=[r.generator for r in requests],
            output_type="pil",
            **inputs,
            **self.extra_pipeline_inputs(requests, guidance_scale > 1),
        )
        return list(output.images)
