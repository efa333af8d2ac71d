"""A tiny CapHuman built in code: the `smoke` preset's model and the pipeline tests' fixture.

UNet and CapFace have the sizes of an hparams.json-style dict (default: the `caphuman_tiny`
conformance variant). With `reference_dir` they load that directory's `state_dict.safetensors`
through the official-checkpoint converter, i.e. the exact weights whose outputs the conformance
vectors record; without it they are drawn at random. VAE and CLIP text encoder are tiny random
models (no weights can be downloaded); the tokenizer is the real CLIP BPE tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from caphuman_bench.loaders.convert_caphuman import (
    SD15_HPARAMS,
    build_components,
    caphuman_configs,
    clip_tokenizer,
    convert_caphuman_state_dict,
    load_checkpoint_file,
    load_converted,
)
from caphuman_bench.pipelines.pipeline_caphuman import CapHumanPipeline

# The sizes of tests/data/caphuman_tiny/hparams.json (variant "caphuman_tiny_a"): SD-1.5's layout, shrunk.
_TINY_NET = {**SD15_HPARAMS["unet"], "model_channels": 32, "attention_resolutions": [1], "num_res_blocks": 1,
             "channel_mult": [1, 2], "num_heads": 2, "context_dim": 32}
TINY_HPARAMS: dict = {
    **{k: v for k, v in SD15_HPARAMS.items() if k not in ("vae", "text_encoder", "image_encoder")},
    "variant": "caphuman_tiny_a",
    "unet": _TINY_NET,
    "capface": {**SD15_HPARAMS["capface"], **_TINY_NET, "mask_predict_in_channels": 32},
    "conditioning": {**SD15_HPARAMS["conditioning"], "context_dim": 32, "img_linear_dim": 64, "num_image_tokens": 17},
}


@torch.no_grad()
def redraw_like_reference(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter as the conformance vectors' generator did (see their README).

    diffusers zero-initialises the zero convs and output convs, which would make CapFace (and the
    UNet output) identically zero; random weights of this recipe exercise every path, mask gating
    included. Weights ~ N(0, gain^2 / fan_in) with gain 1.7 in the hint encoder and 4.0 in the mask
    head; biases and norm shifts ~ N(0, 0.1^2); norm scales ~ 1 + N(0, 0.1^2).
    """
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        is_norm = any(tag in name for tag in ("norm", "layer_norm", "ln_"))
        if param.ndim == 1 and is_norm and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif param.ndim == 1:
            param.copy_(0.1 * noise)
        else:
            gain = 4.0 if "mask_predict" in name else 1.7 if "controlnet_cond_embedding" in name else 1.0
            fan_in = math.prod(param.shape[1:])
            param.copy_(noise * gain / math.sqrt(fan_in))


def tiny_vae() -> AutoencoderKL:
    """A 4-level (x8) AutoencoderKL with 16 channels: SD's latent geometry, a few thousand weights."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_text_encoder(context_dim: int, num_tokens: int) -> CLIPTextModel:
    """A 2-layer CLIP text encoder over the real 49408-token vocabulary."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=context_dim,
            intermediate_size=2 * context_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=num_tokens,
            hidden_act="quick_gelu",
        )
    )


def build_tiny_caphuman_pipeline(
    hparams: dict | None = None, seed: int = 0, reference_dir: str | Path | None = None
) -> CapHumanPipeline:
    """Tiny CapHuman (CPU, float32). `reference_dir`: a conformance directory whose weights to load."""
    if reference_dir is not None and hparams is None:
        hparams = json.loads((Path(reference_dir) / "hparams.json").read_text())
    configs = caphuman_configs(hparams if hparams is not None else TINY_HPARAMS)
    conditioning = configs.hparams["conditioning"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = build_components(configs, ("unet", "capface"))
        vae = tiny_vae()
        text_encoder = tiny_text_encoder(conditioning["context_dim"], conditioning.get("num_text_tokens", 77))
    if reference_dir is not None:
        state_dict = load_checkpoint_file(Path(reference_dir) / "state_dict.safetensors")
        load_converted(modules, convert_caphuman_state_dict(state_dict, configs, modules, label=str(reference_dir)))
    else:
        generator = torch.Generator().manual_seed(seed)
        for name in ("unet", "capface"):
            redraw_like_reference(modules[name], generator)
    pipe = CapHumanPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(conditioning.get("num_text_tokens", 77)),
        unet=modules["unet"].eval(),
        capface=modules["capface"].eval(),
        scheduler=DDIMScheduler(**configs.scheduler),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
