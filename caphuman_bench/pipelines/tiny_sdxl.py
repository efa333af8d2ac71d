"""Tiny random SDXL components built in code: the smoke model of the SDXL methods (PhotoMaker, InstantID).

SDXL's layout at toy size, after diffusers' own test fixture (tests/pipelines/stable_diffusion_xl/
test_stable_diffusion_xl.py `get_dummy_components`): a UNet with `addition_embed_type="text_time"`
(added time ids, 8-d each, plus the pooled text embedding of the second encoder), two CLIP text encoders
whose penultimate hidden states are concatenated (32 + 32 = the UNet's 64-d cross-attention), the second
with a projection (pooled, 32-d): 6 · 8 + 32 = 80 added-embedding inputs. 64 px images, 8 × 8 latents.
The tokenizers are the real CLIP BPE tokenizer (`clip_tokenizer`).
"""

from __future__ import annotations

import torch

from caphuman_bench.loaders.convert_caphuman import clip_tokenizer
from caphuman_bench.pipelines.tiny import redraw_like_reference, tiny_text_encoder, tiny_vae

TINY_TEXT_DIM = 32
TINY_CROSS_ATTENTION_DIM = 2 * TINY_TEXT_DIM
TIME_EMBED_DIM = 8
# SDXL-base's scheduler_config.json (EulerDiscreteScheduler, the scheduler PhotoMaker's README sets).
SDXL_EULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
              "interpolation_type": "linear", "use_karras_sigmas": False}


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TINY_TEXT_DIM,
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
    )


def tiny_sdxl_components(seed: int = 0, controlnet: bool = False) -> dict:
    """The keyword arguments of `StableDiffusionXLPipeline` (and a ControlNet of the UNet's layout if asked)."""
    from diffusers import ControlNetModel, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_sdxl_unet()
        text_encoder = tiny_text_encoder(TINY_TEXT_DIM, 77)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=TINY_TEXT_DIM, intermediate_size=2 * TINY_TEXT_DIM, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=TINY_TEXT_DIM))
        vae = tiny_vae()
        extra = {}
        if controlnet:
            # 64 px → 8 px: three stride-2 convs in the hint encoder, as SDXL's 1024 → 128.
            extra["controlnet"] = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
    generator = torch.Generator().manual_seed(seed)
    # diffusers zero-initialises output convs and ControlNet's zero convs: redraw so every input acts.
    for module in (unet, *extra.values()):
        redraw_like_reference(module, generator)
    return {
        "vae": vae.eval(), "text_encoder": text_encoder.eval(), "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": clip_tokenizer(77), "tokenizer_2": clip_tokenizer(77), "unet": unet.eval(),
        "scheduler": EulerDiscreteScheduler(**SDXL_EULER), **{k: v.eval() for k, v in extra.items()},
    }
