"""Official FastComposer checkpoint (`pytorch_model.bin` of mit-han-lab/fastcomposer) → the pipeline's components.

The file is the `state_dict()` of the official `FastComposerModel` (fastcomposer/model.py), which the
official inference loads with `load_state_dict(strict=True)`: every component under its attribute name.
Key map, official → port (explicit; everything else is an error naming the keys):

    unet.<k>                          → unet <k>               (diffusers UNet2DConditionModel, same names)
    vae.<k>                           → vae <k>                (AutoencoderKL; diffusers ≤ 0.16 named the mid-block
                                                                attention query/key/value/proj_attn: → to_q/to_k/to_v/to_out.0)
    text_encoder.<k>                  → text_encoder <k>       (FastComposerTextEncoder kept CLIP's embeddings/encoder/
                                                                final_layer_norm without the text_model level, as
                                                                transformers 5's CLIPTextModel does)
    image_encoder.vision_model.<k>    → image_encoder vision_model.<k>     (CLIPVisionModelWithProjection)
    image_encoder.visual_projection.weight → image_encoder visual_projection.weight
    postfuse_module.<k>               → postfuse_module <k>    (FastComposerPostfuseModule, same names)

The `embeddings.position_ids` buffers transformers 4.x saved are checked to be arange(n) and dropped.
Configs: SD-1.5's UNet and VAE (as `convert_caphuman.SD15_HPARAMS`), openai/clip-vit-large-patch14's
text tower and vision tower with its 768-d projection (the official `--image_encoder_name_or_path`).
Loading is `torch.load(weights_only=True)` or safetensors: no code runs when the file is read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from caphuman_bench.errors import BenchError
from caphuman_bench.loaders.convert_caphuman import (
    SD15_HPARAMS,
    _expected_shapes,
    _names,
    caphuman_configs,
    clip_tokenizer,
    load_checkpoint_file,
    strict_convert,
)
from caphuman_bench.models.fastcomposer import FastComposerPostfuseModule

COMPONENTS = ("unet", "vae", "text_encoder", "image_encoder", "postfuse_module")
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json: the official pipeline is built with
# StableDiffusionPipeline.from_pretrained(runwayml/stable-diffusion-v1-5), i.e. this PNDM scheduler.
SD15_PNDM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}


def fastcomposer_modules(meta: bool = True, hparams: dict | None = None) -> dict[str, torch.nn.Module]:
    """The components at the released model's sizes, or at those of `hparams` (constructor arguments under
    unet / vae / text_encoder / image_encoder, as the conformance vectors' hparams.json); on the meta
    device unless `meta=False`."""
    from accelerate import init_empty_weights

    if hparams is None:
        sd15 = caphuman_configs(SD15_HPARAMS)
        hparams = {"unet": {**sd15.unet, "sample_size": 64}, "vae": sd15.vae, "text_encoder": SD15_HPARAMS["text_encoder"],
                   "image_encoder": SD15_HPARAMS["image_encoder"]}
    with init_empty_weights(include_buffers=False) if meta else torch.device("cpu"):
        return {
            "unet": UNet2DConditionModel(**hparams["unet"]),
            "vae": AutoencoderKL(**hparams["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**hparams["text_encoder"])),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**hparams["image_encoder"])),
            "postfuse_module": FastComposerPostfuseModule(embed_dim=hparams["text_encoder"]["hidden_size"]),
        }


def _target_key(component: str, official: str) -> str:
    """An official key's name in the port's component (the key map above)."""
    key = official[len(component) + 1:]
    if component == "text_encoder" and key.startswith("text_model."):  # a transformers-4 CLIPTextModel layout
        key = key[len("text_model."):]
    if component == "vae" and ".attentions." in key:
        module, name, leaf = key.rsplit(".", 2)
        if name in LEGACY_VAE_ATTENTION:
            key = f"{module}.{LEGACY_VAE_ATTENTION[name]}.{leaf}"
    return key


def _drop_position_ids(source: dict[str, torch.Tensor], module: torch.nn.Module, label: str) -> dict[str, torch.Tensor]:
    """Remove the saved `embeddings.position_ids` buffers after checking they are arange(n)."""
    kept = {}
    for key, tensor in source.items():
        if not key.endswith("embeddings.position_ids"):
            kept[key] = tensor
            continue
        embeddings = module.vision_model.embeddings if hasattr(module, "vision_model") else module.embeddings
        n_positions = embeddings.position_embedding.weight.shape[0]
        if tensor.numel() != n_positions or not torch.equal(tensor.reshape(-1).long(), torch.arange(n_positions)):
            raise BenchError(f"{label}: {key} is not arange({n_positions})")
    return kept


def convert_fastcomposer_state_dict(state_dict: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module],
                                    label: str = "checkpoint") -> dict[str, dict[str, torch.Tensor]]:
    """Official state dict → {component: state dict}, strictly: every key used, every parameter filled,
    shapes equal; errors name the official keys. `modules` gives the target names and shapes (meta is fine)."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in COMPONENTS}
    stray = []
    for key, tensor in state_dict.items():
        owner = key.partition(".")[0]
        (parts[owner] if owner in parts else {})[key] = tensor
        if owner not in parts:
            stray.append(key)
    problems = [f"unexpected {len(stray)} key(s) outside {', '.join(COMPONENTS)}: {_names(sorted(stray))}"] if stray else []
    out = {}
    for name in COMPONENTS:
        try:
            source = parts[name]
            if name in ("text_encoder", "image_encoder"):
                source = _drop_position_ids(source, modules[name], label)
            out[name] = strict_convert(name, source, lambda src, name=name: {_target_key(name, k): v for k, v in src.items()},
                                       _expected_shapes(modules[name]), label)
        except BenchError as exc:  # report every component's problems at once
            problems.append(str(exc).removeprefix(f"{label}: "))
    if problems:
        raise BenchError(f"{label}: " + " | ".join(problems))
    return out


def load_fastcomposer_components(path: str | Path, device: str | torch.device = "cpu",
                                 dtype: torch.dtype = torch.float32, hparams: dict | None = None) -> dict:
    """Everything `FastComposerPipeline` needs, from the one official file (SD-1.5's tokenizer and PNDM
    scheduler are built in code: the tokenizer from open_clip's bundled BPE, see `clip_tokenizer`).
    `hparams`: other sizes than the released model's (see `fastcomposer_modules`)."""
    return fastcomposer_components(load_checkpoint_file(path), device, dtype, hparams, label=str(path))


def fastcomposer_components(state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32, hparams: dict | None = None,
                            label: str = "checkpoint") -> dict:
    """`load_fastcomposer_components` from a state dict already read: the conformance vectors rebuild
    their text token table before loading (`conformance/fastcomposer.py`)."""
    modules = fastcomposer_modules(meta=True, hparams=hparams)
    converted = convert_fastcomposer_state_dict(state_dict, modules, label=label)
    for name, tensors in converted.items():
        modules[name].load_state_dict(tensors, strict=True, assign=True)
    components = {name: m.to(device=device, dtype=dtype).eval() for name, m in modules.items()}
    components["tokenizer"] = clip_tokenizer(77)
    components["scheduler"] = PNDMScheduler(**SD15_PNDM)
    return components
