"""Official CapHuman checkpoint (LDM / ControlNet layout) -> the diffusers components of the port.

Key renaming reuses diffusers' own single-file converters (`convert_ldm_unet_checkpoint`,
`convert_controlnet_checkpoint`, `convert_ldm_vae_checkpoint`) and their config builders; explicit
maps are written only where CapHuman differs: the mask head, the identity projections, the CLIP
encoders (transformers >= 5 dropped the `text_model.` / `vision_model.` level) and the noise-schedule
buffers. Conversion is strict in both directions: every source key must land in a parameter of the
port (or be a validated buffer), every parameter must be filled, shapes must agree; a failure names
the keys.

Layout of an `hparams.json`-style dict (see `tests/data/caphuman_tiny/hparams.json`): sections
`diffusion`, `unet`, `capface`, `conditioning` in the official config's terms, plus optional `vae`
(an LDM `ddconfig`), `text_encoder` and `image_encoder` (transformers CLIP config fields) for the
frozen encoders. `SD15_HPARAMS` is the released model's.
"""

from __future__ import annotations

import copy
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

from caphuman_bench.errors import BenchError
from caphuman_bench.models.capface import CapFaceModel
from caphuman_bench.weights import load_safetensors, tensor_state_dict

PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "capface": ("control_model.", "id_linear.", "img_linear."),
    "vae": ("first_stage_model.",),
    "text_encoder": ("cond_stage_model.transformer.",),
    "image_encoder": ("control_cond_stage_model.transformer.",),
}
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)
# Training-only entries the official loader (`load_state_dict(strict=False)`) skips in overlay files.
TRAINING_ONLY_PREFIXES = ("model_ema.", "loss.")
MAX_NAMED_KEYS = 12
_CONTROLNET_FROM_UNET = (
    "in_channels",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "transformer_layers_per_block",
)

_SD15_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": True,
    "legacy": False,
}
# models/cldm_v15.yaml of the official repo, in the hparams.json layout.
SD15_HPARAMS: dict = {
    "variant": "caphuman_sd15",
    "diffusion": {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012, "scale_factor": 0.18215,
                  "parameterization": "eps", "channels": 4, "beta_schedule": "linear"},
    "unet": _SD15_UNET,
    "capface": {**_SD15_UNET, "hint_channels": 9, "cond_mode": "img+id", "mask_predict_in_channels": 320,
                "hint_block_channels": [16, 16, 32, 32, 96, 96, 256]},
    "conditioning": {"context_dim": 768, "id_dim": 512, "id_tokens": 1, "img_linear_dim": 1024,
                     "num_image_tokens": 257, "num_text_tokens": 77, "cond_mode": "img+id"},
    "mask_loss_weight": 1.0,
    "mask_threshold": 0.5,
    "vae": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": []},
    # openai/clip-vit-large-patch14, text and vision towers
    "text_encoder": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "projection_dim": 768},
    "image_encoder": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu",
                      "projection_dim": 768},
}


@dataclass
class CapHumanConfigs:
    """Diffusers / transformers configs of every component an hparams dict describes."""

    hparams: dict
    unet: dict
    capface: dict
    scheduler: dict
    vae: dict | None = None
    text_encoder: CLIPTextConfig | None = None
    image_encoder: CLIPVisionConfig | None = None
    components: tuple[str, ...] = field(default=("unet", "capface"))


def _field(hparams: dict, section: str, key: str):
    try:
        return hparams[section][key]
    except KeyError:
        raise BenchError(f"hparams: missing field {section}.{key}") from None


def _ldm_original_config(hparams: dict) -> dict:
    """The hparams in the nesting of an LDM yaml, as diffusers' config builders expect."""
    return {
        "model": {
            "params": {
                "unet_config": {"params": hparams["unet"]},
                "control_stage_config": {"params": hparams["capface"]},
                "first_stage_config": {"params": {"ddconfig": hparams.get("vae") or SD15_HPARAMS["vae"]}},
                "scale_factor": hparams.get("diffusion", {}).get("scale_factor", 0.18215),
            }
        }
    }


def _heads(ldm_params: dict) -> int | list[int]:
    """Diffusers' `attention_head_dim` (a head *count*, per level when the head width is fixed)."""
    if ldm_params.get("num_head_channels", -1) != -1:
        width = ldm_params["num_head_channels"]
        return [ldm_params["model_channels"] * m // width for m in ldm_params["channel_mult"]]
    return ldm_params["num_heads"]


def _hint_widths(capface: dict) -> tuple[int, ...]:
    """(16, 32, 96, 256) from the official [16, 16, 32, 32, 96, 96, 256] conv widths."""
    widths = list(capface.get("hint_block_channels", [16, 16, 32, 32, 96, 96, 256]))
    blocks = tuple(widths[0::2])
    if len(widths) % 2 == 0 or widths[1::2] != list(blocks[:-1]):
        raise BenchError(
            f"hparams: capface.hint_block_channels {widths} is not of the form [a, a, b, b, ..., z] "
            "that diffusers' ControlNetConditioningEmbedding builds"
        )
    return blocks


def caphuman_configs(hparams: dict | None = None) -> CapHumanConfigs:
    """Build every component config from an hparams.json-style dict (default: the SD-1.5 release)."""
    hparams = copy.deepcopy(hparams if hparams is not None else SD15_HPARAMS)
    for section in ("diffusion", "unet", "capface", "conditioning"):
        if section not in hparams:
            raise BenchError(f"hparams: missing section {section!r}")
    original = _ldm_original_config(hparams)
    unet = create_unet_diffusers_config_from_ldm(original, {})
    unet["attention_head_dim"] = _heads(hparams["unet"])
    # diffusers' create_controlnet_diffusers_config_from_ldm (0.42) fails to pass `checkpoint` on and
    # reads the UNet's sizes, not the control branch's: build CapFace's from its own section instead.
    branch = create_unet_diffusers_config_from_ldm(
        {"model": {"params": {**original["model"]["params"], "unet_config": {"params": {"out_channels": 4, **hparams["capface"]}}}}}, {}
    )
    controlnet = {k: branch[k] for k in _CONTROLNET_FROM_UNET}
    controlnet["attention_head_dim"] = _heads(hparams["capface"])
    controlnet["conditioning_channels"] = _field(hparams, "capface", "hint_channels")
    cond = hparams["conditioning"]
    if "id" not in cond.get("cond_mode", "img+id") or "img" not in cond.get("cond_mode", "img+id"):
        raise BenchError(f"hparams: conditioning.cond_mode {cond.get('cond_mode')!r} unsupported (only 'img+id')")
    capface = {
        **controlnet,
        "cross_attention_dim": _field(hparams, "conditioning", "context_dim"),
        "conditioning_embedding_out_channels": _hint_widths(hparams["capface"]),
        "id_embedding_dim": _field(hparams, "conditioning", "id_dim"),
        "image_token_dim": _field(hparams, "conditioning", "img_linear_dim"),
        "mask_threshold": hparams.get("mask_threshold", 0.5),
    }
    mask_in = hparams["capface"].get("mask_predict_in_channels", capface["block_out_channels"][0])
    if mask_in != capface["block_out_channels"][0]:
        raise BenchError(f"hparams: capface.mask_predict_in_channels {mask_in} != model_channels")
    configs = CapHumanConfigs(hparams=hparams, unet=unet, capface=capface, scheduler=scheduler_config(hparams))
    components = ["unet", "capface"]
    if "vae" in hparams:
        configs.vae = create_vae_diffusers_config_from_ldm(original, {})
        components.append("vae")
    if "text_encoder" in hparams:
        configs.text_encoder = CLIPTextConfig(**hparams["text_encoder"])
        components.append("text_encoder")
    if "image_encoder" in hparams:
        configs.image_encoder = CLIPVisionConfig(**hparams["image_encoder"])
        components.append("image_encoder")
    configs.components = tuple(components)
    return configs


def scheduler_config(hparams: dict) -> dict:
    """DDIMScheduler settings equal to the official `ddim_hacked` sampler (README: DDIM case)."""
    diffusion = hparams["diffusion"]
    if diffusion.get("beta_schedule", "linear") != "linear" or diffusion.get("parameterization", "eps") != "eps":
        raise BenchError("hparams: only diffusion.beta_schedule 'linear' with parameterization 'eps' is supported")
    return {
        "num_train_timesteps": diffusion["timesteps"],
        "beta_start": diffusion["linear_start"],
        "beta_end": diffusion["linear_end"],
        "beta_schedule": "scaled_linear",  # LDM "linear" = linspace of sqrt(beta), squared
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    }


def build_components(configs: CapHumanConfigs, components: tuple[str, ...] | None = None) -> dict:
    """Random-weight modules for `components` (build under `accelerate.init_empty_weights()` for meta)."""
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "unet": lambda: UNet2DConditionModel(**configs.unet),
        "capface": lambda: CapFaceModel(**configs.capface),
        "vae": lambda: AutoencoderKL(**configs.vae),
        "text_encoder": lambda: CLIPTextModel(configs.text_encoder),
        "image_encoder": lambda: CLIPVisionModel(configs.image_encoder),
    }
    return {name: builders[name]() for name in (components or configs.components)}


# ----------------------------------------------------------------------------------------------
# strict conversion


def schedule_buffers(hparams: dict) -> dict[str, np.ndarray]:
    """The official `register_schedule` buffers, in float64 (ldm/models/diffusion/ddpm.py)."""
    d = hparams["diffusion"]
    betas = np.linspace(d["linear_start"] ** 0.5, d["linear_end"] ** 0.5, d["timesteps"], dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def check_schedule(buffers: dict[str, torch.Tensor], hparams: dict, source: str = "checkpoint") -> None:
    """Validate the checkpoint's schedule buffers against hparams (and hence the DDIM scheduler)."""
    expected = schedule_buffers(hparams)
    n = hparams["diffusion"]["timesteps"]
    for name, tensor in buffers.items():
        if tuple(tensor.shape) != (n,):
            raise BenchError(f"{source}: schedule buffer {name!r} has shape {list(tensor.shape)}, expected [{n}]")
        if name == "logvar" or tensor.is_meta:  # logvar: training-only loss weight, unused at inference
            continue
        got = tensor.double().cpu().numpy()
        if not np.allclose(got, expected[name], rtol=1e-4, atol=1e-6):
            err = float(np.max(np.abs(got - expected[name])))
            raise BenchError(
                f"{source}: schedule buffer {name!r} differs from hparams.diffusion "
                f"(linear_start/linear_end/timesteps) by up to {err:.3g}"
            )


def _origin(tensor: torch.Tensor, by_id: dict[int, str]) -> str | None:
    """The source key a converted tensor came from (it is the same object or a view of it)."""
    while tensor is not None:
        if id(tensor) in by_id:
            return by_id[id(tensor)]
        tensor = tensor._base
    return None


def _module_map(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Port module path -> official module path, from converted (port key, official key) pairs."""
    modules: dict[str, str] = {}
    for target, source in pairs:
        t, s = target.split("."), source.split(".")
        while len(t) > 1 and len(s) > 1 and t[-1] == s[-1]:
            t, s = t[:-1], s[:-1]
            modules.setdefault(".".join(t), ".".join(s))
    return modules


def _official_name(target_key: str, module_map: dict[str, str]) -> str:
    """Best-effort official name of a missing port key, from converted siblings ('?' if none)."""
    parts = target_key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in module_map:
            return ".".join([module_map[module], *parts[cut:]])
    return "?"


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED_KEYS])
    return shown + (f" ... and {len(keys) - MAX_NAMED_KEYS} more" if len(keys) > MAX_NAMED_KEYS else "")


def strict_convert(
    component: str,
    source: dict[str, torch.Tensor],
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    expected: dict[str, torch.Size],
    origin_label: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Run a key-renaming `convert` and check it consumed every source key and filled every target key."""
    converted = {k: v for k, v in convert(source).items() if v is not None}
    by_id = {id(t): k for k, t in source.items()}
    origin = {k: _origin(v, by_id) for k, v in converted.items()}
    unused = sorted(set(source) - set(origin.values()))
    module_map = _module_map([(k, o) for k, o in origin.items() if o])
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = [
        f"{origin[k]} {list(converted[k].shape)} (port {k} expects {list(expected[k])})"
        for k in sorted(set(converted) & set(expected))
        if tuple(converted[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(
            f"missing {len(missing)} key(s): "
            + _names([f"{_official_name(k, module_map)} (port {k})" for k in missing])
        )
    if unused or unexpected:
        extra = unused + [f"{origin[k]} (port {k})" for k in unexpected]
        problems.append(f"unexpected {len(extra)} key(s): " + _names(extra))
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} key(s): " + _names(mismatched))
    if problems:
        raise BenchError(f"{origin_label}: {component} does not match the configured model: " + "; ".join(problems))
    return converted


def _strip(source: dict[str, torch.Tensor], prefix: str, inner: str = "") -> dict[str, torch.Tensor]:
    """Keys under `prefix`, without it and without an optional `inner` level (`text_model.`)."""
    out = {}
    for key, tensor in source.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
            out[key[len(inner):] if inner and key.startswith(inner) else key] = tensor
    return out


def _convert_capface(source: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    control = {k: v for k, v in source.items() if k.startswith("control_model.")}
    converted = convert_controlnet_checkpoint(control, config)
    converted["mask_predict.weight"] = source.get("control_model.mask_predict.0.weight")
    converted["mask_predict.bias"] = source.get("control_model.mask_predict.0.bias")
    converted.update({k: v for k, v in source.items() if k.startswith(("id_linear.", "img_linear."))})
    return converted


def _clip_source(source: dict[str, torch.Tensor], prefix: str, inner: str, module, label: str):
    """transformers-4.x or -5 CLIP keys -> transformers-5 keys (no `text_model.` level).

    The `position_ids` buffer that transformers 4.24 saved is consumed here: it must be arange(n).
    """
    tensors = _strip(source, prefix, inner)
    position_ids = tensors.pop("embeddings.position_ids", None)
    n_positions = module.embeddings.position_embedding.weight.shape[0]
    if position_ids is not None and not position_ids.is_meta:
        if not torch.equal(position_ids.reshape(-1).long(), torch.arange(n_positions)):
            raise BenchError(f"{label}: {prefix}{inner}embeddings.position_ids is not arange({n_positions})")
    if position_ids is not None and tuple(position_ids.shape) != (1, n_positions):
        raise BenchError(f"{label}: {prefix}{inner}embeddings.position_ids has shape {list(position_ids.shape)}")
    return tensors


def _expected_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def partition(state_dict: dict[str, torch.Tensor], components: tuple[str, ...], label: str):
    """Split official keys by component; keys of no requested component are reported by name."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in components}
    schedule, stray = {}, []
    for key, tensor in state_dict.items():
        owner = next((n for n in components if key.startswith(PREFIXES[n])), None)
        if owner is not None:
            parts[owner][key] = tensor
        elif key in SCHEDULE_BUFFERS:
            schedule[key] = tensor
        else:
            stray.append(key)
    if stray:
        raise BenchError(
            f"{label}: unexpected {len(stray)} key(s) for components {list(components)}: {_names(sorted(stray))}"
        )
    return parts, schedule


def convert_caphuman_state_dict(
    state_dict: dict[str, torch.Tensor],
    configs: CapHumanConfigs,
    modules: dict[str, torch.nn.Module],
    label: str = "checkpoint",
    require_schedule: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Official state dict -> {component: state dict of the port}, strictly, for the components in `modules`.

    `modules` supplies the target parameter names and shapes (meta modules are fine).
    """
    components = tuple(modules)
    parts, schedule = partition(state_dict, components, label)
    if require_schedule:
        missing = [b for b in SCHEDULE_BUFFERS if b not in schedule]
        if missing:
            raise BenchError(f"{label}: missing {len(missing)} schedule buffer(s): {_names(missing)}")
    check_schedule(schedule, configs.hparams, label)

    clip_inner = {"text_encoder": "text_model.", "image_encoder": "vision_model."}
    converters = {
        "unet": lambda src: convert_ldm_unet_checkpoint(src, configs.unet),
        "capface": lambda src: _convert_capface(src, configs.capface),
        "vae": lambda src: convert_ldm_vae_checkpoint(src, configs.vae),
        "text_encoder": dict,
        "image_encoder": dict,
    }
    out, problems = {}, []
    for name in components:
        try:
            source = parts[name]
            if name in clip_inner:
                source = _clip_source(source, PREFIXES[name][0], clip_inner[name], modules[name], label)
            out[name] = strict_convert(name, source, converters[name], _expected_shapes(modules[name]), label)
        except BenchError as exc:  # report every component's problems at once
            problems.append(str(exc).removeprefix(f"{label}: "))
    if problems:
        raise BenchError(f"{label}: " + " | ".join(problems))
    return out


def load_converted(modules: dict[str, torch.nn.Module], converted: dict[str, dict[str, torch.Tensor]], assign=False):
    """`load_state_dict(strict=True)` of each converted component into its module."""
    for name, tensors in converted.items():
        modules[name].load_state_dict(tensors, strict=True, assign=assign)


# ----------------------------------------------------------------------------------------------
# files and entry points


def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` (preferred) or `.ckpt`/`.pt`/`.pth` (torch.load, weights_only)."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return load_safetensors(path, "checkpoint")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise BenchError(f"{path}: cannot load with torch.load(weights_only=True): {exc}") from None
    return tensor_state_dict(obj, path, "a checkpoint")


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The openai/clip-vit-large-patch14 tokenizer, built offline from open_clip's bundled BPE file.

    open_clip ships the same `bpe_simple_vocab_16e6` merges as OpenAI CLIP; the vocab order below is
    OpenAI's (bytes, bytes + '</w>', merges, then the two special tokens: 49408 entries).
    """
    import open_clip.tokenizer as oct

    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=model_max_length,
    )


def overlay_backbone(modules: dict[str, torch.nn.Module], configs: CapHumanConfigs, path: str | Path) -> list[str]:
    """Replace UNet / VAE / text encoder with those of an SD-1.5 single file (e.g. Realistic Vision V3.0).

    Like the official `model.load_state_dict(sd, strict=False)`, only the components present in the file
    are replaced, but each present one must be complete; EMA copies are skipped. Returns the replaced names.
    """
    state_dict = {k: v for k, v in load_checkpoint_file(path).items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    present = tuple(n for n in ("unet", "vae", "text_encoder") if any(k.startswith(PREFIXES[n]) for k in state_dict))
    converted = convert_caphuman_state_dict(
        state_dict, configs, {n: modules[n] for n in present}, label=str(path), require_schedule=False
    )
    load_converted(modules, converted)
    return list(present)


DIFFUSERS_BACKBONE_PARTS = ("unet", "vae", "text_encoder")
DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                          "pytorch_model.bin")


def overlay_diffusers_backbone(modules: dict[str, torch.nn.Module], folder: str | Path) -> list[str]:
    """Replace UNet / VAE / text encoder with those of an SD-1.5-family model in diffusers' folder layout.

    The folder's `unet/`, `vae/`, `text_encoder/` hold diffusers' own classes, so their state dicts
    load strictly into CapHuman's (same classes, same SD-1.5 configuration); parts the folder lacks are
    kept, as `overlay_backbone` does for a single file. Returns the replaced names.
    """
    folder = Path(folder)
    replaced = []
    for name in DIFFUSERS_BACKBONE_PARTS:
        files = [folder / name / f for f in DIFFUSERS_WEIGHT_NAMES if (folder / name / f).exists()]
        if not files:
            continue
        state_dict = load_checkpoint_file(files[0])
        module = modules[name]
        expected = _expected_shapes(module)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected) - {"text_model.embeddings.position_ids"})
        if missing or unexpected:
            raise BenchError(f"{files[0]}: not an SD-1.5 {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
        wrong = [k for k, shape in expected.items() if tuple(state_dict[k].shape) != tuple(shape)]
        if wrong:
            raise BenchError(f"{files[0]}: key {wrong[0]!r} has shape {tuple(state_dict[wrong[0]].shape)}, "
                             f"expected {tuple(expected[wrong[0]])} (not an SD-1.5-family {name})")
        module.load_state_dict({k: state_dict[k] for k in expected}, strict=True, assign=True)
        replaced.append(name)
    if not replaced:
        raise BenchError(f"{folder}: no unet/, vae/ or text_encoder/ weights ({', '.join(DIFFUSERS_WEIGHT_NAMES)})")
    return replaced


def overlay_any_backbone(modules: dict[str, torch.nn.Module], configs: CapHumanConfigs | None, path: str | Path) -> list[str]:
    """A backbone in either format: a diffusers folder, or one LDM single file (`.safetensors` / `.ckpt`)."""
    if Path(path).is_dir():
        return overlay_diffusers_backbone(modules, path)
    return overlay_backbone(modules, configs, path)


def overlay_vae(vae: AutoencoderKL, path: str | Path) -> None:
    """Load a standalone LDM VAE file (keys without `first_stage_model.`, e.g. vae-ft-mse-840000-ema-pruned)."""
    state_dict = {k: v for k, v in load_checkpoint_file(path).items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    config = dict(vae.config)
    converted = strict_convert(
        "vae", state_dict, lambda src: convert_ldm_vae_checkpoint(src, config), _expected_shapes(vae), str(path)
    )
    vae.load_state_dict(converted, strict=True)


def load_caphuman_components(
    ckpt_path: str | Path,
    hparams: dict | None = None,
    backbone_path: str | Path | None = None,
    vae_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Everything `CapHumanPipeline` needs, plus `image_encoder` (CLIP vision, for the identity encoder).

    `hparams` defaults to the SD-1.5 release (`SD15_HPARAMS`); components it has no section for (e.g. the
    tiny conformance variant has no VAE / CLIP) are neither built nor expected in the checkpoint.
    """
    from accelerate import init_empty_weights

    configs = caphuman_configs(hparams)
    with init_empty_weights():
        modules = build_components(configs)
    converted = convert_caphuman_state_dict(load_checkpoint_file(ckpt_path), configs, modules, label=str(ckpt_path))
    load_converted(modules, converted, assign=True)
    if backbone_path is not None:
        overlay_any_backbone(modules, configs, backbone_path)
    if vae_path is not None:
        if "vae" not in modules:
            raise BenchError(f"{vae_path}: a VAE file was given but hparams has no 'vae' section")
        overlay_vae(modules["vae"], vae_path)
    modules = {name: m.to(device=device, dtype=dtype).eval() for name, m in modules.items()}
    modules["scheduler"] = DDIMScheduler(**configs.scheduler)
    modules["tokenizer"] = clip_tokenizer(configs.hparams["conditioning"].get("num_text_tokens", 77))
    return modules
