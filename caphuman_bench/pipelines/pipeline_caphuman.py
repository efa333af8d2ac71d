"""CapHuman (CVPR 2024) as a diffusers pipeline: SD-1.5 + CapFace, identity tokens, head condition.

Reads top to bottom like diffusers' `pipelines/controlnet/pipeline_controlnet.py`: check_inputs ->
encode_prompt -> prepare latents -> DDIM loop with classifier-free guidance -> decode. What differs
from a ControlNet pipeline, all following the official code (VamosC/CapHuman, `src/cldm/cldm.py`):

* CapFace cross-attends to the identity context `[img_linear(image_tokens), id_linear(id_embedding)]`,
  not to the text, with the time-dependent dropout `tau` (see `CapFaceModel`).
* Its residuals are gated by the hard face mask it predicts from the head condition.
* Guidance drops only the text: the unconditional branch sees the same hint and identity context, so
  CapFace's output is the same in both branches and is computed once per step. So are the UNet's
  blocks before the text enters; the CUDA fast path runs those once too (`acceleration.GuidancePrefix`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from caphuman_bench.models.capface import CapFaceModel

CONDITION_CHANNELS = 9  # cat([normal in [-1, 1], albedo in [0, 1], rendered shading in [0, 1]])


@dataclass
class CapHumanPipelineOutput(BaseOutput):
    """`images` (PIL list, numpy, tensor in [0, 1], or latents) and CapFace's soft `masks` [B, 1, h, w]."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: torch.Tensor


@dataclass
class DenoiserOutput:
    """One official `apply_model` call: the prediction and what led to it (for conformance checks)."""

    eps: torch.Tensor  # [B, 4, h, w]
    mask: torch.Tensor  # soft mask [B, 1, h, w]
    control_context: torch.Tensor  # [B, N_img + 1, D] after the tau rule
    control_residuals: list[torch.Tensor]  # ungated, production order: input blocks..., middle block
    hard_masks: list[torch.Tensor]  # 0/1 gates in the UNet's order of use: middle block, then decoder skips


def pil_images(images: torch.Tensor) -> list[PIL.Image.Image]:
    """[B, 3, H, W] in [0, 1] to PIL with diffusers' rounding (`numpy_to_pil`: float32 x 255, round half
    to even, uint8), done where the tensor is: a quarter of the bytes cross to the host, as uint8."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(p) for p in pixels]


class CapHumanPipeline(DiffusionPipeline):
    r"""Identity-preserving, head-controllable portrait generation (CapHuman).

    Components: `vae` (AutoencoderKL), `text_encoder` (CLIPTextModel), `tokenizer` (CLIPTokenizer),
    `unet` (UNet2DConditionModel, SD-1.5), `capface` (CapFaceModel), `scheduler` (DDIMScheduler with
    steps_offset=1, set_alpha_to_one=False, leading spacing, scaled_linear betas 0.00085..0.012).
    """

    model_cpu_offload_seq = "text_encoder->capface->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]  # absent when only the denoiser is checked
    _callback_tensor_inputs = ["latents", "pred_original_sample", "noise_pred"]
    guidance_prefix = None  # the fast path's `acceleration.GuidancePrefix`: entered for the guided UNet calls

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        capface: CapFaceModel,
        scheduler: DDIMScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, capface=capface, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def check_inputs(self, prompt, prompt_embeds, condition_image, image_tokens, id_embedding, generator):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if condition_image.ndim != 4 or condition_image.shape[1] != CONDITION_CHANNELS:
            raise ValueError(f"`condition_image` must be [B, 9, H, W], got {list(condition_image.shape)}")
        batch = condition_image.shape[0]
        height, width = condition_image.shape[-2:]
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"condition image size {height}x{width} must be divisible by {self.vae_scale_factor}")
        if isinstance(prompt, list) and len(prompt) != batch:
            raise ValueError(f"{len(prompt)} prompts for {batch} condition images")
        if image_tokens.ndim != 3 or image_tokens.shape[0] != batch:
            raise ValueError(f"`image_tokens` must be [B={batch}, N, D], got {list(image_tokens.shape)}")
        if id_embedding.ndim != 3 or id_embedding.shape[:2] != (batch, 1):
            raise ValueError(f"`id_embedding` must be [B={batch}, 1, D], got {list(id_embedding.shape)}")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images: pass one per image")

    def encode_prompt(self, prompt: list[str], device: torch.device) -> torch.Tensor:
        """CLIP last hidden state of the padded 77-token prompt (the official FrozenCLIPEmbedder), one
        row per prompt; each distinct prompt is tokenised and encoded once (a batch repeats a few)."""
        distinct = list(dict.fromkeys(prompt))
        tokens = self.tokenizer(
            distinct,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        embeds = self.text_encoder(tokens.input_ids.to(device))[0]
        if len(distinct) == len(prompt):
            return embeds
        row = {text: i for i, text in enumerate(distinct)}
        return torch.stack([embeds[row[text]] for text in prompt])  # views and one copy: no index tensor to upload

    def prepare_latents(self, batch, height, width, dtype, device, generator, latents=None):
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def capface_residuals(self, latents, t, hint, mask, image_tokens, id_embedding, tau, use_global, use_local, copies=1,
                          hard_masks=None):
        """CapFace's mask-gated residuals for one step (each repeated `copies` times along the batch),
        and the (tau-ruled) identity context it used; `hard_masks`: see `CapFaceModel.gate_residuals`."""
        context = self.capface.identity_context(image_tokens, id_embedding, t, tau, use_global, use_local)
        down, mid = self.capface(latents, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        down, mid = self.capface.gate_residuals(down, mid, mask, copies=copies, hard_masks=hard_masks)
        return down, mid, context

    @torch.no_grad()
    def apply_model(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_context: torch.Tensor,
        hint: torch.Tensor,
        image_tokens: torch.Tensor,
        id_embedding: torch.Tensor,
        tau: float = 0,
        use_global: bool = True,
        use_local: bool = True,
    ) -> DenoiserOutput:
        """One denoiser call exactly as the official `CapHuman.apply_model` (no guidance); `t` is [B] or scalar."""
        context = self.capface.identity_context(image_tokens, id_embedding, t, tau, use_global, use_local)
        down, mid = self.capface(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        mask = self.capface.predict_mask(hint)
        by_size = {}
        gated_down, gated_mid = self.capface.gate_residuals(down, mid, mask, hard_masks=by_size)
        eps = self.unet(
            x,
            t,
            encoder_hidden_states=text_context,
            down_block_additional_residuals=gated_down,
            mid_block_additional_residual=gated_mid,
        ).sample
        hard_masks = [by_size[tuple(r.shape[-2:])] for r in [mid, *reversed(down)]]
        return DenoiserOutput(eps, mask, context, [*down, mid], hard_masks)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        condition_image: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        id_embedding: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.0,
        eta: float = 0.0,
        tau: float = 0,
        use_global: bool = True,
        use_local: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> CapHumanPipelineOutput | tuple:
        r"""Generate one image per row of `condition_image`.

        Args:
            prompt: one prompt for all rows or one per row (or pass `prompt_embeds` [B, 77, D]).
            condition_image: [B, 9, H, W] head condition at pixel resolution; sets the output size.
            image_tokens: [B, N, img_dim] CLIP-vision tokens of the face-parsed reference (local identity).
            id_embedding: [B, 1, 512] L2-normalised FaceNet embedding (global identity).
            negative_prompt: text of the unconditional branch (official default: empty).
            tau: identity dropout threshold: CapFace's context is zeroed at steps with t > tau; 0 = off.
            use_global / use_local: False zeroes the ID token / the image tokens (ablation).
            generator: one `torch.Generator` per image makes each image independent of batch composition.
            output_type: "pil", "np", "pt" (images in [0, 1]) or "latent".
            latents, prompt_embeds, negative_prompt_embeds: precomputed inputs (conformance checks).
            callback_on_step_end: `fn(pipe, step, t, tensors)` with tensors named in
                `callback_on_step_end_tensor_inputs` (any of `latents`, `pred_original_sample`, `noise_pred`).
        """
        self.check_inputs(prompt, prompt_embeds, condition_image, image_tokens, id_embedding, generator)
        device = self._execution_device
        dtype = self.unet.dtype
        batch = condition_image.shape[0]
        height, width = condition_image.shape[-2:]
        do_guidance = guidance_scale > 1.0

        # 1. timesteps first: the scheduler's upload of them waits for the GPU, which is still idle here
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        host_timesteps = self.scheduler.timesteps.tolist()  # what the scheduler reads its tables at (see 5.)

        # 2. text: prompts and negatives in one pass of the text encoder
        prompts = ([prompt] * batch if isinstance(prompt, str) else list(prompt)) if prompt_embeds is None else []
        negatives = []
        if do_guidance and negative_prompt_embeds is None:
            negatives = [negative_prompt or ""] * batch if not isinstance(negative_prompt, list) else list(negative_prompt)
        if prompts or negatives:
            encoded = self.encode_prompt(prompts + negatives, device)
            prompt_embeds = encoded[: len(prompts)] if prompts else prompt_embeds
            negative_prompt_embeds = encoded[len(prompts) :] if negatives else negative_prompt_embeds
        text_context = prompt_embeds.to(device=device, dtype=dtype)
        if do_guidance:
            text_context = torch.cat([negative_prompt_embeds.to(device=device, dtype=dtype), text_context])

        # 3. conditions: the hint's features and the soft mask depend on the hint only: computed once
        hint = condition_image.to(device=device, dtype=self.capface.dtype)
        image_tokens = image_tokens.to(device=device, dtype=self.capface.dtype)
        id_embedding = id_embedding.to(device=device, dtype=self.capface.dtype)
        hint = self.capface.encode_hint(hint)
        mask = self.capface.predict_mask(hint)

        # 4. latents: per-image generators draw on the host, while the GPU encodes the hint
        latents = self.prepare_latents(batch, height, width, dtype, device, generator, latents)

        # 5. denoising loop; the scheduler reads its tables at the host's copy of each timestep (a device
        # timestep would make the host wait for the GPU at every step, and the GPU then for the host)
        hard_masks = {}  # the mask's 0/1 versions at each residual size, made at the first step
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            down, mid, _ = self.capface_residuals(
                latents.to(self.capface.dtype), t, hint, mask, image_tokens, id_embedding, tau, use_global, use_local,
                copies=2 if do_guidance else 1,  # both guidance halves get the same residuals
                hard_masks=hard_masks,
            )
            down, mid = [d.to(dtype) for d in down], mid.to(dtype)
            latent_input = torch.cat([latents] * 2) if do_guidance else latents
            # both halves hold the same latents and residuals: they differ from the first cross-attention on
            shared = self.guidance_prefix.sharing() if do_guidance and self.guidance_prefix is not None else contextlib.nullcontext()
            with shared:
                noise_pred = self.unet(
                    latent_input,
                    t,
                    encoder_hidden_states=text_context,
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                ).sample
            if do_guidance:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            step = self.scheduler.step(noise_pred, host_timesteps[i], latents, eta=eta, generator=generator)
            latents, pred_original_sample = step.prev_sample, step.pred_original_sample
            if callback_on_step_end is not None:
                step_tensors = {"latents": latents, "pred_original_sample": pred_original_sample, "noise_pred": noise_pred}
                callback_on_step_end(self, i, t, {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs})

        # 6. decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type="pt" if output_type == "pil" else output_type)
            images = pil_images(images) if output_type == "pil" else images
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, mask
        return CapHumanPipelineOutput(images=images, masks=mask)
