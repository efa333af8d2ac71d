"""InstantID (InstantX, arXiv 2401.07519) as a diffusers SDXL ControlNet pipeline.

Read from the authors' `pipeline_stable_diffusion_xl_instantid.py` (`StableDiffusionXLInstantIDPipeline`,
`draw_kps`) and `infer.py`; not on PyPI nor in diffusers 0.42, hence this port. Two things set it
apart from diffusers' `StableDiffusionXLControlNetPipeline`, and are why the loop is written here:

* the face's ArcFace embedding (512-d, raw) goes through IP-Adapter's Resampler (16 tokens) into
  decoupled cross-attention of the UNet. The authors' `ip-adapter.bin` has IP-Adapter-plus's layout
  (Resampler dim 1280, 20 heads × 64, 4 layers, 16 queries, 512 → 2048), so diffusers'
  `load_ip_adapter` loads it as `IPAdapterPlusImageProjection` + `IPAdapterAttnProcessor2_0`, the same
  computation as the authors' `IPAttnProcessor`. The unconditional branch is the Resampler of a zero
  embedding (`_encode_prompt_image_emb`: `torch.zeros_like(prompt_image_emb)`).
* IdentityNet (the ControlNet) cross-attends to those 16 identity tokens, not to the text
  (`encoder_hidden_states=prompt_image_emb` in the authors' loop); its image is the five facial
  keypoints drawn by `draw_keypoints`.

`draw_keypoints` is the authors' `draw_kps` on OpenCV (installed with mediapipe's opencv-contrib-python).

Both are checked against the authors' code on tiny random weights: `caphuman-bench conformance instantid`
(vectors and their generator in tests/data/instantid/).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLControlNetPipeline
from PIL import Image

# draw_kps: colour of keypoint k (left eye, right eye, nose, mouth left, mouth right), RGB.
KEYPOINT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KEYPOINT_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # each drawn in the colour of its first keypoint
LIMB_DIMMING = 0.6  # limbs are drawn first, then the whole canvas is scaled by 0.6 (uint8 floor)
# draw_kps draws on the face image, which infer.py resizes to about 1024 px (min side 1024, max 1280):
# stick half-width 4 px and keypoint radius 10 px at that size.
KPS_REFERENCE_SIDE, KPS_STICK_WIDTH, KPS_RADIUS = 1024, 4, 10


def draw_keypoints(keypoints: np.ndarray, width: int, height: int) -> Image.Image:
    """InstantID's `draw_kps` on a black width × height canvas: an ellipse (half-axes length / 2 and 4)
    per limb from each keypoint to the nose, in that keypoint's colour, dimmed to 60 %; then a filled
    disc of radius 10 at each keypoint in full colour. Stick width and radius scale with
    min(width, height) / 1024 (rounded, at least 1), so at 1024 px they are the authors' 4 and 10."""
    import cv2

    scale = min(width, height) / KPS_REFERENCE_SIDE
    stick, radius = max(1, round(KPS_STICK_WIDTH * scale)), max(1, round(KPS_RADIUS * scale))
    kps = np.asarray(keypoints, dtype=np.float64)
    canvas = np.zeros((height, width, 3))
    for a, b in KEYPOINT_LIMBS:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = math.hypot(x[0] - x[1], y[0] - y[1])
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), stick), int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas, polygon, KEYPOINT_COLOURS[a])
    canvas = (canvas * LIMB_DIMMING).astype(np.uint8)
    for k, (x, y) in enumerate(kps):
        canvas = cv2.circle(canvas, (int(x), int(y)), radius, KEYPOINT_COLOURS[k], -1)
    return Image.fromarray(canvas, mode="RGB")


def load_instantid_pipeline(sdxl_folder: str | Path, controlnet_folder: str | Path, ip_adapter: dict,
                            dtype: torch.dtype = torch.float32) -> StableDiffusionXLInstantIDPipeline:
    """The authors' `infer.py` loading: SDXL from its diffusers folder, IdentityNet from `ControlNetModel/`,
    then `ip-adapter.bin`'s two dicts ({"image_proj": Resampler, "ip_adapter": to_k_ip / to_v_ip}) through
    diffusers' `load_ip_adapter` (IP-Adapter-plus layout), in `dtype`, local files only."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(controlnet_folder, torch_dtype=dtype, local_files_only=True)
    pipe = StableDiffusionXLInstantIDPipeline.from_pretrained(
        sdxl_folder, controlnet=controlnet, torch_dtype=dtype, add_watermarker=False, local_files_only=True)
    ip_adapter = {part: {key: value.to(dtype) for key, value in ip_adapter[part].items()} for part in ("image_proj", "ip_adapter")}
    pipe.load_ip_adapter(ip_adapter, subfolder="", weight_name="", image_encoder_folder=None)
    return pipe


def clip_token_count(tokenizer, text: str) -> tuple[int, int]:
    """(tokens of `text`, how many of them CLIP reads): `model_max_length` (77) less the start and end tokens."""
    count = len(tokenizer(text, truncation=False, add_special_tokens=False, verbose=False).input_ids)
    return count, min(count, tokenizer.model_max_length - 2)


class StableDiffusionXLInstantIDPipeline(StableDiffusionXLControlNetPipeline):
    """SDXL + IdentityNet + IP-Adapter (loaded with `load_ip_adapter`); one identity per call."""

    @torch.no_grad()
    def __call__(self, prompt: list[str], image: list[Image.Image], face_embedding: torch.Tensor,
                 negative_prompt: list[str] | None = None, height: int = 1024, width: int = 1024,
                 num_inference_steps: int = 30, guidance_scale: float = 5.0, controlnet_conditioning_scale: float = 0.8,
                 ip_adapter_scale: float = 0.8, generator=None, output_type: str = "pil"):
        """`prompt`, `image` (keypoint images) and `generator` one per output image; `face_embedding` [512]."""
        device = self._execution_device
        guided = guidance_scale > 1.0
        batch = len(prompt)
        self.set_ip_adapter_scale(ip_adapter_scale)

        prompt_embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt)
        image_embeds = self.face_embeds(face_embedding, batch, guided, prompt_embeds.dtype)
        if guided:
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled])
        identity_tokens = self.unet.encoder_hid_proj(image_embeds)[0].flatten(1, 2)  # [B, 16, D]: IdentityNet's context

        control = self.prepare_image(image=image, width=width, height=height, batch_size=batch, num_images_per_prompt=1,
                                     device=device, dtype=self.controlnet.dtype, do_classifier_free_guidance=guided)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device,
                                       generator)
        add_time_ids = self._get_add_time_ids((height, width), (0, 0), (height, width), dtype=prompt_embeds.dtype,
                                              text_encoder_projection_dim=self.text_encoder_2.config.projection_dim)
        added = {"text_embeds": pooled, "time_ids": add_time_ids.to(device).repeat(pooled.shape[0], 1)}
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)

        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            down, mid = self.controlnet(model_input, t, encoder_hidden_states=identity_tokens, controlnet_cond=control,
                                        conditioning_scale=controlnet_conditioning_scale, added_cond_kwargs=added,
                                        return_dict=False)
            noise = self.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                              added_cond_kwargs={**added, "image_embeds": image_embeds},
                              down_block_additional_residuals=down, mid_block_additional_residual=mid,
                              return_dict=False)[0]
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
        return self.decode_latents_sdxl(latents, output_type)

    def maybe_convert_prompt(self, prompt, tokenizer):
        """The prompts unchanged: this pipeline loads no textual-inversion tokens, which is all diffusers'
        hook looks for, and the look tokenizes each prompt uncut (transformers then warns "92 > 77" about
        infer.py's negative prompt). The cut itself is `encode_prompt`'s, as in the authors' pipeline
        (the same diffusers method): 77 tokens with the start and end ones, truncation=True — see `clip_token_count`."""
        return prompt

    def face_embeds(self, face_embedding: torch.Tensor, batch: int, guided: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        """The IP-Adapter's input [batch (×2 with guidance), 1 image, 1 token, 512]: the face embedding, and in
        the unconditional half zeros (the authors' `_encode_prompt_image_emb`: `torch.zeros_like`)."""
        face = face_embedding.reshape(1, 1, 1, -1).to(device=self._execution_device, dtype=dtype).expand(batch, -1, -1, -1)
        return [torch.cat([torch.zeros_like(face), face]) if guided else face]

    def decode_latents_sdxl(self, latents: torch.Tensor, output_type: str):
        """SDXL's decode: the VAE in float32 when it would overflow in float16 (`force_upcast`)."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(torch.float32)
        latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        return self.image_processor.postprocess(image, output_type=output_type)
