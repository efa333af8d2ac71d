"""Stock diffusers pipelines of each method card's family at full size, random weights, built on the device.

A card's generation cost is its denoising networks at its own steps, size and guidance: SD-1.5 or SDXL,
with or without a ControlNet, plus the VAE decode and the text encoders once per batch. Full-size modules
are built from their published configurations with random initialisation directly on the device (seconds,
not the minutes that writing and reading weight files takes); `--tiny` builds the same pipelines at toy
size on the CPU (`methods/sd15.build_tiny_sd15_pipeline`, `pipelines/tiny_sdxl`).

Not modelled: what a method adds outside the family's networks — IP-Adapter / InstantID image projection
and their extra cross-attention keys (a few tokens per layer), FaceID's and PhotoMaker's UNet LoRA (which
keep the UNet's attention unfused in the adapters: `acceleration.fuse_attention_projections`), the ID
encoders run once per reference, FastComposer's localised cross-attention. Each row says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# SD-1.5's published configurations (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json).
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}  # the rest: diffusers' defaults are SD-1.5's
VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
       "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
# SDXL base 1.0's (stabilityai/stable-diffusion-xl-base-1.0: unet/, text_encoder_2/ config.json).
SDXL_UNET = {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "cross_attention_dim": 2048,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
CLIP_BIGG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
             "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}


@dataclass(frozen=True)
class Family:
    base: str  # sd15 | sdxl
    controlnet: bool
    extras: str = ""  # what the family's pipeline leaves out of the method


# Each generating card's family (reference generates nothing; caphuman has its own benchmark rows).
CARD_FAMILIES = {
    "sd15": Family("sd15", False),
    "controlnet_head": Family("sd15", True),
    "controlnet_landmarks": Family("sd15", True),
    "textual_inversion": Family("sd15", False, "a learned token: none at generation"),
    "textual_inversion_controlnet_head": Family("sd15", True, "a learned token: none at generation"),
    "dreambooth": Family("sd15", False, "a fine-tuned UNet: none at generation"),
    "dreambooth_controlnet_head": Family("sd15", True, "a fine-tuned UNet: none at generation"),
    "lora": Family("sd15", False, "rank-4 UNet LoRA (unfused in the adapter)"),
    "lora_controlnet_head": Family("sd15", True, "rank-4 UNet LoRA (unfused in the adapter)"),
    "fastcomposer": Family("sd15", False, "localised cross-attention, image encoder once per reference"),
    "ip_adapter_controlnet": Family("sd15", True, "IP-Adapter-plus resampler and image cross-attention, CLIP ViT-H per reference"),
    "ip_adapter_faceid": Family("sd15", False, "FaceID projection, image cross-attention and UNet LoRA"),
    "ip_adapter_faceid_controlnet_head": Family("sd15", True, "FaceID projection, image cross-attention and UNet LoRA"),
    "ip_adapter_faceid_plusv2": Family("sd15", False, "FaceID-Plus projection, image cross-attention, UNet LoRA, CLIP ViT-H per reference"),
    "ip_adapter_faceid_plusv2_controlnet_head": Family("sd15", True, "FaceID-Plus projection, image cross-attention, UNet LoRA, CLIP ViT-H per reference"),
    "arc2face": Family("sd15", False, "ArcFace once per reference"),
    "arc2face_controlnet": Family("sd15", True, "ArcFace once per reference"),
    "photomaker": Family("sdxl", False, "ID encoder once per reference, UNet LoRA"),
    "photomaker_v2": Family("sdxl", False, "ID encoder and ArcFace once per reference, UNet LoRA"),
    "instantid": Family("sdxl", True, "IP-Adapter resampler and image cross-attention, ArcFace once per reference"),
}


def card_setting(name: str) -> dict:
    """The card's steps, size and guidance (its own defaults), and its family."""
    from caphuman_bench.cards import get_card

    if name not in CARD_FAMILIES:
        raise SystemExit(f"--method {name}: no family pipeline for it (cards: {', '.join(CARD_FAMILIES)}; caphuman: no --method)")
    params = get_card(name).params
    family = CARD_FAMILIES[name]
    return {"family": family, "steps": int(params.get("num_inference_steps", 30)),
            "size": int(params.get("height", 1024 if family.base == "sdxl" else 512)), "guidance": float(params.get("guidance_scale", 7.5))}


def build_family_pipeline(family: Family, device: torch.device, dtype: torch.dtype, tiny: bool, seed: int = 0):
    """The stock diffusers pipeline of `family` (eager), random weights, on `device` in `dtype`."""
    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionControlNetPipeline,
                           StableDiffusionPipeline, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from caphuman_bench.loaders.convert_caphuman import clip_tokenizer
    from caphuman_bench.methods.sd15 import SD15_DDIM, build_tiny_sd15_pipeline
    from caphuman_bench.pipelines.tiny_sdxl import SDXL_EULER, tiny_sdxl_components

    torch.manual_seed(seed)
    if tiny:
        if family.base == "sd15":
            pipe = build_tiny_sd15_pipeline(controlnet=family.controlnet, image_encoder=False, seed=seed)
        else:
            parts = tiny_sdxl_components(seed, controlnet=family.controlnet)
            cls = StableDiffusionXLControlNetPipeline if family.controlnet else StableDiffusionXLPipeline
            pipe = cls(**parts, add_watermarker=False)
        return _ready(pipe.to(device, dtype))
    # schedulers keep numpy-facing tables: made outside the device context, which would put them on the GPU
    scheduler = DDIMScheduler(**SD15_DDIM) if family.base == "sd15" else EulerDiscreteScheduler(**SDXL_EULER)
    with torch.device(device):  # random initialisation on the GPU: seconds, not minutes
        if family.base == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET)
            parts = {"unet": unet, "vae": AutoencoderKL(**VAE, sample_size=512, scaling_factor=0.18215),
                     "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)), "tokenizer": clip_tokenizer(77),
                     "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
                     "requires_safety_checker": False}
            cls = StableDiffusionPipeline
            if family.controlnet:
                parts["controlnet"], cls = ControlNetModel.from_unet(unet), StableDiffusionControlNetPipeline
        else:
            unet = UNet2DConditionModel(**SDXL_UNET)
            parts = {"unet": unet, "vae": AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False),
                     "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                     "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
                     "tokenizer": clip_tokenizer(77), "tokenizer_2": clip_tokenizer(77), "scheduler": scheduler,
                     "add_watermarker": False}
            cls = StableDiffusionXLPipeline
            if family.controlnet:
                parts["controlnet"], cls = ControlNetModel.from_unet(unet), StableDiffusionXLControlNetPipeline
        pipe = cls(**parts)
    return _ready(pipe.to(device, dtype))


def _ready(pipe):
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).eval().requires_grad_(False)
    return pipe


def family_call(pipe, family: Family, batch: int, size: int, steps: int, guidance: float):
    """A function making one batch as a run's adapter does (one prompt per image, one generator per image),
    returning the final latents-decoded images as a tensor."""
    generator = torch.Generator().manual_seed(99)
    extra = {}
    if family.controlnet:
        extra["image"] = torch.rand(batch, 3, size, size, generator=generator).to(pipe.device, pipe.unet.dtype)

    def call():
        return pipe(["a photo of a woman wearing a red hat"] * batch, negative_prompt=[""] * batch, height=size, width=size,
                    num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(batch)], **extra).images

    return call
