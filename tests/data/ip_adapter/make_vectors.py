"""Known-answer vectors for the IP-Adapter rows, made by the authors' code (tencent-ailab/IP-Adapter).

Run in an environment with the authors' diffusers era (README.md here names it), CPU, float32:

    python tests/data/ip_adapter/make_vectors.py --authors-repo PATH/TO/IP-Adapter --out tests/data/ip_adapter

Tiny random SD-1.5-shaped UNet and ControlNet (diffusers configs built here), a tiny CLIP vision tower,
and IP-Adapter weights drawn into the authors' own modules (`MLPProjModel` / `ProjPlusModel` /
`Resampler` and their attention processors), saved in the official file layout (`image_proj.*`,
`ip_adapter.*`; float16 like the released checkpoints). Each case runs the authors' `generate` with
fixed prompt embeddings (the pipeline's `encode_prompt` returns them: the text encoder is not under
test), fixed initial latents, 3 DDIM steps, 2 samples, and records what the port must reproduce.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

SIZE, STEPS, SAMPLES, GUIDANCE, SEED = 64, 3, 2, 7.5, 7
CONTEXT_DIM = 64  # cross-attention width: FaceID-Plus' resampler has dim // 64 = 1 head
BLOCKS = {"block_out_channels": [16, 32], "layers_per_block": 1, "cross_attention_dim": CONTEXT_DIM,
          "attention_head_dim": 8, "norm_num_groups": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}
UNET = {"sample_size": 8, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], **BLOCKS}
CONTROLNET = {"conditioning_embedding_out_channels": [16, 16, 32, 32], **BLOCKS}  # 64 px hint → 8 px
CLIP_VISION = {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 224, "patch_size": 32}
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}  # the authors' demo notebooks' DDIM
LORA_RANK = 4

# case name: (adapter weights file, ControlNet?, authors' generate keywords)
CASES = {
    "faceid": ("ip_adapter_faceid.safetensors", False, {"scale": 1.0}),
    "faceid_controlnet": ("ip_adapter_faceid.safetensors", True, {"scale": 1.0}),
    "plusv2": ("ip_adapter_faceid_plusv2.safetensors", False, {"scale": 1.0, "s_scale": 1.0, "shortcut": True}),
    "plusv2_controlnet": ("ip_adapter_faceid_plusv2.safetensors", True, {"scale": 1.0, "s_scale": 1.0, "shortcut": True}),
    "plus_face_controlnet": ("ip_adapter_plus_face.safetensors", True, {"scale": 0.7}),
}


def redraw(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random (zero-initialised ones too: LoRA ups, ControlNet zero convs), LayerNorms near 1."""
    for name, p in module.named_parameters():
        if p.ndim == 1:
            base = 1.0 if name.endswith("weight") and "norm" in name.lower() else 0.0
            p.data = base + 0.1 * torch.randn(p.shape, generator=generator)
        else:
            p.data = torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel())


def float32_torch():
    """The authors' IPAdapter classes hard-code float16; their module gets a torch whose float16 is float32."""
    proxy = types.ModuleType("torch_float32")
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.float16 = torch.float32
    return proxy


def build_models(out: Path, generator: torch.Generator):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet, controlnet = UNet2DConditionModel(**UNET), ControlNetModel(**CONTROLNET)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION))
    for module in (unet, controlnet, vision):
        redraw(module, generator)
    unet.save_pretrained(out / "unet")
    controlnet.save_pretrained(out / "controlnet")
    vision.save_pretrained(out / "image_encoder")
    # only its config matters (latents in, latents out): vae_scale_factor 8
    vae = AutoencoderKL(block_out_channels=[8, 8, 8, 8], norm_num_groups=8, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    return vae


def pipeline(out: Path, vae, with_controlnet: bool):
    from diffusers import (
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    parts = dict(vae=vae, text_encoder=None, tokenizer=None, unet=UNet2DConditionModel.from_pretrained(out / "unet"),
                 scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    if with_controlnet:
        return StableDiffusionControlNetPipeline(controlnet=ControlNetModel.from_pretrained(out / "controlnet"), **parts)
    return StableDiffusionPipeline(**parts)


def save_adapter(path: Path, image_proj: torch.nn.Module, unet) -> None:
    """The official layout, flattened as the authors' safetensors reader expects: image_proj.* and ip_adapter.*."""
    layers = torch.nn.ModuleList(unet.attn_processors.values())
    tensors = {f"image_proj.{k}": v for k, v in image_proj.state_dict().items()}
    tensors.update({f"ip_adapter.{k}": v for k, v in layers.state_dict().items()})
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", type=Path, required=True, help="a checkout of tencent-ailab/IP-Adapter")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.authors_repo.resolve()))
    import ip_adapter.ip_adapter as authors_ip_adapter
    from ip_adapter.ip_adapter import IPAdapterPlus
    from ip_adapter.ip_adapter_faceid import IPAdapterFaceID, IPAdapterFaceIDPlus
    from ip_adapter.resampler import Resampler

    authors_ip_adapter.torch = float32_torch()
    torch.set_num_threads(2)
    out = args.out
    generator = torch.Generator().manual_seed(SEED)
    vae = build_models(out, generator)

    class TinyIPAdapterPlus(IPAdapterPlus):
        """The authors' Resampler with heads = dim // 64 (the released 768-wide one has 12), so it stays small."""

        def init_proj(self):
            dim = self.pipe.unet.config.cross_attention_dim
            return Resampler(dim=dim, depth=4, dim_head=64, heads=dim // 64, num_queries=self.num_tokens,
                             embedding_dim=self.image_encoder.config.hidden_size, output_dim=dim, ff_mult=4)

    # inputs
    tensors: dict[str, torch.Tensor] = {
        "text": torch.randn(1, 77, CONTEXT_DIM, generator=generator),
        "negative_text": torch.randn(1, 77, CONTEXT_DIM, generator=generator),
        "faceid_embeds": torch.nn.functional.normalize(torch.randn(1, 512, generator=generator), dim=-1),
        "x_T": torch.randn(SAMPLES, 4, SIZE // 8, SIZE // 8, generator=generator),
    }
    smooth = lambda: torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=(SIZE, SIZE),
                                                     mode="bilinear", align_corners=False)[0]
    tensors["controlnet_image"] = (smooth() * 255).round().to(torch.uint8)  # [3, H, W] RGB
    tensors["face_image"] = (torch.nn.functional.interpolate(torch.rand(1, 3, 14, 14, generator=generator), size=(224, 224),
                                                             mode="bilinear")[0] * 255).round().to(torch.uint8)
    to_pil = lambda t: Image.fromarray(t.permute(1, 2, 0).numpy())

    # adapters: the authors' modules, redrawn, saved in their layout
    drawn = set()
    for case, (weights, _, _) in CASES.items():
        if weights in drawn:
            continue
        drawn.add(weights)
        pipe = pipeline(out, vae, with_controlnet=False)
        modules = adapter_modules(case, pipe, out, IPAdapterFaceID, IPAdapterFaceIDPlus, TinyIPAdapterPlus)
        for module in modules:
            redraw(module, generator)
        save_adapter(out / weights, modules[0], pipe.unet)

    cases = []
    for case, (weights, with_controlnet, keywords) in CASES.items():
        pipe = pipeline(out, vae, with_controlnet)
        model = authors_model(case, pipe, out, weights, IPAdapterFaceID, IPAdapterFaceIDPlus, TinyIPAdapterPlus)
        text, negative = tensors["text"], tensors["negative_text"]

        def encode_prompt(*_args, prompt_embeds=None, negative_prompt_embeds=None, **_kwargs):
            """generate's own call gets the fixed text; the pipeline's later call keeps what it is given, as diffusers'."""
            if prompt_embeds is not None:
                return prompt_embeds, negative_prompt_embeds
            return text.repeat(SAMPLES, 1, 1), negative.repeat(SAMPLES, 1, 1)

        pipe.encode_prompt = encode_prompt
        face = to_pil(tensors["face_image"])
        inputs = {"faceid_embeds": tensors["faceid_embeds"]} if case.startswith(("faceid", "plusv2")) else {}
        if case.startswith("plusv2"):
            inputs["face_image"] = face
        if case.startswith("plus_face"):
            inputs["pil_image"] = face
        embeds_args = dict(inputs)
        if case.startswith("plusv2"):
            embeds_args.update(s_scale=keywords["s_scale"], shortcut=keywords["shortcut"])
        tokens, uncond_tokens = model.get_image_embeds(**embeds_args)
        seen = {"eps": [], "context": [], "latents": []}
        pipe.unet.register_forward_hook(lambda m, a, o: seen["eps"].append(o[0] if isinstance(o, tuple) else o.sample))
        if with_controlnet:
            pipe.controlnet.register_forward_pre_hook(
                lambda m, a, k: seen["context"].append(k["encoder_hidden_states"].clone()), with_kwargs=True)
        extra = {"image": to_pil(tensors["controlnet_image"]), "controlnet_conditioning_scale": 1.0} if with_controlnet else {}

        def step_end(_pipe, _i, _t, kw):
            seen["latents"].append(kw["latents"].clone())
            return kw

        latents = model.generate(**inputs, **keywords, num_samples=SAMPLES, seed=SEED, guidance_scale=GUIDANCE,
                                 num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=tensors["x_T"].clone(),
                                 output_type="latent", callback_on_step_end=step_end, **extra)
        record = {"image_tokens": tokens, "uncond_image_tokens": uncond_tokens,
                  "eps": torch.stack(seen["eps"]), "latents": torch.stack(seen["latents"]), "samples": latents}
        if with_controlnet:
            # what the ControlNet's cross-attention reads: IPAdapter(Plus) gives it CNAttnProcessor, which drops
            # the last num_tokens tokens ("only use text"); the FaceID classes leave its processors alone
            processors = {type(p).__name__ for p in pipe.controlnet.attn_processors.values()}
            dropped = model.num_tokens if any(name.startswith("CNAttnProcessor") for name in processors) else 0
            context = seen["context"][0]
            record["controlnet_context"] = context[:, : context.shape[1] - dropped]
            assert all(torch.equal(c, context) for c in seen["context"])
        for key, value in record.items():
            tensors[f"{case}/{key}"] = value.detach().float().contiguous()
        cases.append({"name": case, "adapter_weights": weights, "controlnet": with_controlnet,
                      "generate": {**keywords, "num_samples": SAMPLES, "guidance_scale": GUIDANCE,
                                   "num_inference_steps": STEPS, "height": SIZE, "width": SIZE,
                                   "controlnet_conditioning_scale": 1.0 if with_controlnet else None},
                      "outputs": sorted(record)})

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "cases.safetensors"))
    import diffusers
    import transformers

    meta = {"unet": UNET, "controlnet": CONTROLNET, "image_encoder": CLIP_VISION, "scheduler": SCHEDULER,
            "lora_rank": LORA_RANK, "seed": SEED, "cases": cases,
            "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "numpy": np.__version__}}
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")


def adapter_modules(case, pipe, out, faceid_cls, faceid_plus_cls, plus_cls):
    """[image projection, *attention processors] of a freshly built authors' model (no checkpoint read)."""
    model = authors_model(case, pipe, out, None, faceid_cls, faceid_plus_cls, plus_cls)
    return [model.image_proj_model, *pipe.unet.attn_processors.values()]


def authors_model(case, pipe, out, weights, faceid_cls, faceid_plus_cls, plus_cls):
    """The authors' class for the case; `weights` None skips the checkpoint read (used to draw the weights)."""
    cls = faceid_cls if case.startswith("faceid") else faceid_plus_cls if case.startswith("plusv2") else plus_cls
    load = cls.load_ip_adapter
    if weights is None:
        cls.load_ip_adapter = lambda self: None
    try:
        if cls is faceid_cls:
            return cls(pipe, str(out / (weights or "")), "cpu", lora_rank=LORA_RANK, torch_dtype=torch.float32)
        if cls is faceid_plus_cls:
            return cls(pipe, str(out / "image_encoder"), str(out / (weights or "")), "cpu", lora_rank=LORA_RANK,
                       torch_dtype=torch.float32)
        return cls(pipe, str(out / "image_encoder"), str(out / (weights or "")), "cpu", num_tokens=16)
    finally:
        cls.load_ip_adapter = load


if __name__ == "__main__":
    main()
