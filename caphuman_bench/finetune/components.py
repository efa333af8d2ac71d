"""The SD-1.5 parts the fine-tuning baselines train on and generate with, full size or tiny.

Training and generation load the base model through this one module, so a fine-tuned artefact is
always applied to the very weights it was trained from: the `stable_diffusion_v1_5` diffusers folder
(local files only), or, with `tiny`, SD-1.5's layout at toy size drawn from a fixed seed (64 px
images, 8×8 latents; the sizes of `ip_adapter_controlnet`'s tiny model), rebuilt identically in every
process.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from caphuman_bench.errors import BenchError

# SD-1.5's scheduler/scheduler_config.json (a PNDMScheduler); the tiny model uses it as it is.
SD15_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                         "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                         "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon"}
SD15_FOLDER_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                     "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json")
CONTROLNET_FOLDER_FILES = ("config.json",)
TINY_SEED = 0
_TINY_BLOCKS = {"block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
                "attention_head_dim": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D")}


@dataclass
class SD15Components:
    """What a training loop needs; `scheduler_config` also builds the sampler at generation."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    scheduler_config: dict

    def fresh_tokenizer(self):
        """A copy to add tokens to, leaving the base tokenizer as loaded."""
        return copy.deepcopy(self.tokenizer)


def weights_folder(path: str | Path, weights_id: str, needed: tuple[str, ...]) -> Path:
    """A folder entry resolves to the folder itself or to one file inside it (HF cache): the folder, checked complete."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    missing = [f for f in needed if not (folder / f).exists()]
    if missing:
        raise BenchError(f"{folder}: weights {weights_id!r} incomplete, missing {', '.join(missing)}")
    return folder


def load_sd15(sd15_path: str | Path | None, *, tiny: bool) -> SD15Components:
    """The base model on the CPU in float32 (callers move and cast what they do not train)."""
    if tiny:
        return _tiny_sd15()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = weights_folder(sd15_path, "stable_diffusion_v1_5", SD15_FOLDER_FILES)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return SD15Components(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True),
        scheduler_config={k: v for k, v in scheduler_config.items() if not k.startswith("_")},
    )


def load_controlnet(controlnet_path: str | Path | None, *, tiny: bool, dtype: torch.dtype):
    """ControlNet normalbae (`controlnet_normalbae_sd15`), or a tiny random one matching the tiny UNet."""
    from diffusers import ControlNetModel

    if not tiny:
        folder = weights_folder(controlnet_path, "controlnet_normalbae_sd15", CONTROLNET_FOLDER_FILES)
        return ControlNetModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    from caphuman_bench.pipelines.tiny import redraw_like_reference

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        # 64 px → 8 px: three stride-2 convs in the hint encoder, as SD's 512 → 64.
        controlnet = ControlNetModel(conditioning_embedding_out_channels=(16, 16, 32, 32), **_TINY_BLOCKS)
    # diffusers zero-initialises ControlNet's zero convs: redraw so the head condition acts.
    redraw_like_reference(controlnet, torch.Generator().manual_seed(TINY_SEED + 1))
    return controlnet.to(dtype=dtype).eval()


def _tiny_sd15() -> SD15Components:
    from diffusers import UNet2DConditionModel

    from caphuman_bench.loaders.convert_caphuman import clip_tokenizer
    from caphuman_bench.pipelines.tiny import redraw_like_reference, tiny_text_encoder, tiny_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(sample_size=8, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **_TINY_BLOCKS)
        vae, text_encoder = tiny_vae(), tiny_text_encoder(_TINY_BLOCKS["cross_attention_dim"], 77)
    redraw_like_reference(unet, torch.Generator().manual_seed(TINY_SEED))  # diffusers zero-initialises conv_out
    return SD15Components(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(77), unet=unet,
                          scheduler_config=dict(SD15_SCHEDULER_CONFIG))
