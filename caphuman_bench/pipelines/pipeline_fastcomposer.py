"""FastComposer (Xiao et al., 2023) as a diffusers pipeline: SD-1.5 whose subject word is fused with
the subject's CLIP image embedding, with delayed subject conditioning.

Reads top to bottom like diffusers' `StableDiffusionPipeline`: check_inputs → encode_prompt (text and
subject-augmented) → prepare latents → denoising loop with classifier-free guidance → decode. What it
follows from the official code (mit-han-lab/fastcomposer, `fastcomposer/pipeline.py`
`StableDiffusionFastCompposerPipeline`, `fastcomposer/transforms.py`, `demo/pipeline.py`):

* The prompt names the subject with the trigger word right after it: "a photo of a woman img wearing
  a red hat", or "... of a woman img, neon lights". As the official `_tokenize_and_mask_noun_phrases_ends`
  does, a copy of the tokenizer knows "img" as an added special token (demo/pipeline.py
  `tokenizer.add_tokens(["img"], special_tokens=True)`), so the trigger is split out of the text
  wherever it stands, before a comma too; its id is removed and the token before it (the last BPE
  token of "woman") is the subject token; the ids are padded with the pad token to 77. (Prompts over
  77 tokens are cut without keeping the end token, as there; the benchmark's are short.)
* Text-only embeddings = the text encoder on `prompt.replace("img", "")`, tokenized as usual (the
  official `prompt_text_only`); augmented embeddings = the text encoder on the ids above, with the
  subject token fused with the image embedding (`FastComposerPostfuseModule`).
* Delayed subject conditioning: steps i ≤ (1 − alpha)·num_inference_steps use the text-only
  embeddings, later steps the augmented ones (the official `alpha_`). The unconditional branch is
  the negative prompt's embeddings throughout.
* Subject image: zero-padded to a square (`PadToSquare`: (long − short) // 2 on both sides), resized
  to `object_resolution` (bilinear, antialiased, on uint8), scaled to [0, 1], resized to the vision
  tower's input size if it differs, normalised with CLIP's mean and std.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from caphuman_bench.models.fastcomposer import FastComposerPostfuseModule

TRIGGER_WORD = "img"  # demo/pipeline.py and evaluation/single_object/run.py: tokenizer.add_tokens(["img"])
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def trigger_tokenizer(tokenizer: CLIPTokenizer) -> CLIPTokenizer:
    """A copy of `tokenizer` that splits the trigger word out as one added special token (the official
    `special_tokenizer`); the pipeline's own tokenizer is left as it is."""
    special = copy.deepcopy(tokenizer)
    special.add_tokens([TRIGGER_WORD], special_tokens=True)
    return special


def subject_token_ids(special_tokenizer: CLIPTokenizer, pad_token_id: int, prompt: str) -> tuple[list[int], int]:
    """The official `_tokenize_and_mask_noun_phrases_ends` for one subject: the prompt's ids without the
    trigger, padded (or cut) to the tokenizer's length, and the index of the token before the trigger.
    Exactly one trigger, with a word before it, is required."""
    trigger_id = special_tokenizer.convert_tokens_to_ids(TRIGGER_WORD)
    ids = special_tokenizer.encode(prompt)
    positions = [i for i, token in enumerate(ids) if token == trigger_id]
    if len(positions) != 1:
        raise ValueError(f"prompt {prompt!r} must contain the trigger word {TRIGGER_WORD!r} exactly once "
                         f"(after the subject word), found {len(positions)}")
    index, length = positions[0] - 1, special_tokenizer.model_max_length
    if index < 1:  # ids[0] is the start token
        raise ValueError(f"prompt {prompt!r}: the trigger word {TRIGGER_WORD!r} must follow the subject word")
    if index >= length:
        raise ValueError(f"prompt {prompt!r}: the subject word lies beyond the text encoder's {length} tokens")
    clean = [token for token in ids if token != trigger_id][:length]
    return clean + [pad_token_id] * (length - len(clean)), index


def subject_pixel_values(image: PIL.Image.Image, object_resolution: int, image_size: int) -> torch.Tensor:
    """The official test-time object transform and the image encoder's own resize + normalisation: [3, S, S]."""
    from torchvision.transforms import functional as TF

    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # uint8 [3, H, W]
    _, h, w = pixels.shape
    if h != w:
        pad = abs(h - w) // 2
        pixels = F.pad(pixels, (pad, pad, 0, 0) if h > w else (0, 0, pad, pad), value=0)
    pixels = TF.resize(pixels, [object_resolution, object_resolution], interpolation=TF.InterpolationMode.BILINEAR,
                       antialias=True)
    pixels = pixels.float() / 255.0
    if object_resolution != image_size:
        pixels = F.interpolate(pixels[None], (image_size, image_size), mode="bilinear", antialias=True)[0]
    return TF.normalize(pixels, CLIP_MEAN, CLIP_STD)


class FastComposerPipeline(DiffusionPipeline):
    r"""Subject-driven text-to-image generation without fine-tuning per subject (FastComposer, single subject).

    Components: `vae`, `text_encoder` (CLIPTextModel), `tokenizer`, `unet` (FastComposer's fine-tuned
    SD-1.5 UNet), `scheduler`, `image_encoder` (CLIPVisionModelWithProjection, ViT-L/14),
    `postfuse_module` (FastComposerPostfuseModule).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->postfuse_module->unet->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: KarrasDiffusionSchedulers,
                 image_encoder: CLIPVisionModelWithProjection, postfuse_module: FastComposerPostfuseModule) -> None:
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              image_encoder=image_encoder, postfuse_module=postfuse_module)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.trigger_tokenizer = trigger_tokenizer(tokenizer)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def check_inputs(self, prompt: list[str], reference_images: list, negative_prompt: list[str], height: int,
                     width: int, guidance_scale: float, alpha: float) -> None:
        if len(reference_images) != len(prompt) or len(negative_prompt) != len(prompt):
            raise ValueError(f"one reference image and one negative prompt per prompt: {len(prompt)} prompts, "
                             f"{len(reference_images)} images, {len(negative_prompt)} negative prompts")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height} × {width}")
        if guidance_scale <= 1.0:
            raise ValueError("FastComposer samples with classifier-free guidance: guidance_scale must be > 1")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        for text in prompt:
            subject_token_ids(self.trigger_tokenizer, self.tokenizer.pad_token_id, text)

    def _tokens(self, texts: list[str], device: torch.device) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], negative_prompt: list[str], device: torch.device):
        """(negative embeddings, text-only embeddings, embeddings of the ids without the trigger, subject
        mask [B, T]) for prompts with the trigger word."""
        rows = [subject_token_ids(self.trigger_tokenizer, self.tokenizer.pad_token_id, text) for text in prompt]
        subject_ids = torch.tensor([ids for ids, _ in rows], dtype=torch.long, device=device)
        mask = torch.zeros_like(subject_ids, dtype=torch.bool)
        mask[torch.arange(len(rows)), [index for _, index in rows]] = True
        subject_embeds = self.text_encoder(subject_ids)[0]
        text_embeds = self.text_encoder(self._tokens([text.replace(TRIGGER_WORD, "") for text in prompt], device))[0]
        negative_embeds = self.text_encoder(self._tokens(list(negative_prompt), device))[0]
        return negative_embeds, text_embeds, subject_embeds, mask

    @torch.no_grad()
    def encode_subject(self, reference_images: list[PIL.Image.Image], object_resolution: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
        """Projected CLIP image embeddings [B, D] of the subject images."""
        size = self.image_encoder.config.image_size
        pixels = torch.stack([subject_pixel_values(image, object_resolution, size) for image in reference_images])
        return self.image_encoder(pixels.to(device, dtype)).image_embeds

    def prepare_latents(self, batch_size: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                        generator, latents: torch.Tensor | None = None) -> torch.Tensor:
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")
        return latents.to(device, dtype) * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        reference_images: PIL.Image.Image | list[PIL.Image.Image],
        negative_prompt: str | list[str] = "",
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        alpha: float = 0.5,
        object_resolution: int = 224,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
    ) -> StableDiffusionPipelineOutput:
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        reference_images = [reference_images] if isinstance(reference_images, PIL.Image.Image) else list(reference_images)
        negative_prompt = [negative_prompt] * len(prompt) if isinstance(negative_prompt, str) else list(negative_prompt)
        self.check_inputs(prompt, reference_images, negative_prompt, height, width, guidance_scale, alpha)
        device = self._execution_device

        # 1. text-only and subject-augmented conditions
        negative_embeds, text_embeds, subject_embeds, subject_mask = self.encode_prompt(prompt, negative_prompt, device)
        object_embeds = self.encode_subject(reference_images, object_resolution, device, text_embeds.dtype)
        augmented_embeds = self.postfuse_module(subject_embeds, object_embeds, subject_mask)

        # 2. latents and timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(len(prompt), height, width, text_embeds.dtype, device, generator, latents)
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_parameters}
        start_subject_step = (1.0 - alpha) * num_inference_steps

        # 3. denoising loop with delayed subject conditioning
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            condition = text_embeds if i <= start_subject_step else augmented_embeds
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_uncond, noise_cond = self.unet(model_input, t, encoder_hidden_states=torch.cat([negative_embeds, condition])
                                                 ).sample.chunk(2)
            noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise, t, latents, **extra).prev_sample

        # 4. decode
        if output_type == "latent":
            return StableDiffusionPipelineOutput(images=latents, nsfw_content_detected=None)
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        images = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
