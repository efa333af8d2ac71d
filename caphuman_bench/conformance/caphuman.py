"""Does the diffusers port compute the official CapHuman function? Checked on stored reference vectors.

A reference directory holds `hparams.json` (the variant's sizes), `state_dict.safetensors` (official key
names), `cases.npz` + `cases.json` (inputs, outputs, intermediates of official `apply_model` calls
and of a full DDIM run with guidance; compressed, as the hints' multiples of 1/255 take 40% of the raw
size); layout as `tests/data/caphuman_tiny/` (its README describes it).
Everything is read from the files, so any variant in that layout works.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from caphuman_bench.conformance import register_conformance
from caphuman_bench.conformance.base import ConformanceReport, ConformanceRow, compare, required
from caphuman_bench.errors import BenchError
from caphuman_bench.loaders.convert_caphuman import (
    build_components,
    caphuman_configs,
    convert_caphuman_state_dict,
    load_checkpoint_file,
    load_converted,
)
from caphuman_bench.pipelines.pipeline_caphuman import CapHumanPipeline

# max |port - reference| allowed (float32; README "Observed reproducibility")
TOLERANCES = {"apply_model": 1e-4, "hard_mask": 0.0, "ddim": 1e-3, "ddim_schedule": 1e-6}


def build_reference_pipeline(reference_dir: Path, device: str = "cpu") -> CapHumanPipeline:
    """UNet + CapFace of the variant, loaded strictly from `state_dict.safetensors` (no VAE / text encoder)."""
    hparams = json.loads(required(reference_dir, "hparams.json").read_text())
    configs = caphuman_configs(hparams)
    modules = build_components(configs, ("unet", "capface"))
    state_dict = load_checkpoint_file(required(reference_dir, "state_dict.safetensors"))
    load_converted(modules, convert_caphuman_state_dict(state_dict, configs, modules, label=str(reference_dir)))
    from diffusers import DDIMScheduler

    return CapHumanPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=modules["unet"].eval(),
        capface=modules["capface"].eval(),
        scheduler=DDIMScheduler(**configs.scheduler),
    ).to(device)


def _tensor(tensors: dict[str, torch.Tensor], name: str, case: str, device: str) -> torch.Tensor:
    if name not in tensors:
        raise BenchError(f"cases.npz: tensor {name!r} named by case {case!r} is missing")
    return tensors[name].to(device)


def _check_apply_model(pipe, case, tensors, device) -> list[ConformanceRow]:
    name, tol = case["name"], TOLERANCES["apply_model"]
    inputs = {role: _tensor(tensors, key, name, device) for role, key in case["inputs"].items()}
    t = _tensor(tensors, f"{name}/t", name, device)
    out = pipe.apply_model(
        inputs["x"], t, inputs["text_context"], inputs["hint"], inputs["image_tokens"], inputs["id_embedding"],
        tau=case["tau"],
    )
    rows = [
        compare(name, "eps", out.eps, tensors[case["outputs"]["eps"]], tol),
        compare(name, "mask", out.mask, tensors[case["outputs"]["mask"]], tol),
    ]
    inter = case.get("intermediates", {})
    if "control_context" in inter:
        rows.append(compare(name, "control_context", out.control_context, tensors[inter["control_context"]], tol))
    residuals = inter.get("control_residuals")
    if isinstance(residuals, list):  # a string says "not stored for this case"
        if len(residuals) != len(out.control_residuals):
            raise BenchError(f"case {name!r}: {len(residuals)} reference residuals, port has {len(out.control_residuals)}")
        rows += [
            compare(name, f"control_residual_{k:02d}", port, tensors[key], tol)
            for k, (port, key) in enumerate(zip(out.control_residuals, residuals))
        ]
    masks = inter.get("hard_masks_in_call_order")
    if isinstance(masks, list):
        if len(masks) != len(out.hard_masks):
            raise BenchError(f"case {name!r}: {len(masks)} reference hard masks, port gates {len(out.hard_masks)} times")
        rows += [
            compare(name, f"hard_mask_call_{k:02d}", port, tensors[key], TOLERANCES["hard_mask"])
            for k, (port, key) in enumerate(zip(out.hard_masks, masks))
        ]
    return rows


def _check_ddim(pipe, case, tensors, device) -> list[ConformanceRow]:
    name, tol = case["name"], TOLERANCES["ddim"]
    inputs = {role: _tensor(tensors, key, name, device) for role, key in case["inputs"].items()}
    x_inter, pred_x0 = [inputs["x_T"]], [inputs["x_T"]]  # index 0 is x_T in both, as the official sampler logs

    def record(_pipe, _step, _t, step_tensors):
        x_inter.append(step_tensors["latents"])
        pred_x0.append(step_tensors["pred_original_sample"])

    result = pipe(
        prompt_embeds=inputs["text_context"],
        negative_prompt_embeds=inputs["uncond_text_context"],
        condition_image=inputs["hint"],
        image_tokens=inputs["image_tokens"],
        id_embedding=inputs["id_embedding"],
        num_inference_steps=case["ddim_steps"],
        guidance_scale=case["guidance_scale"],
        eta=case["eta"],
        tau=case["tau"],
        latents=inputs["x_T"],
        output_type="latent",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
    )
    timesteps = pipe.scheduler.timesteps.tolist()
    if timesteps != case["ddim_timesteps"]:
        raise BenchError(f"case {name!r}: scheduler timesteps {timesteps} != reference {case['ddim_timesteps']}")
    alphas = pipe.scheduler.alphas_cumprod
    port_alphas = torch.stack([alphas[t] for t in reversed(timesteps)])
    prev = [t - pipe.scheduler.config.num_train_timesteps // case["ddim_steps"] for t in reversed(timesteps)]
    port_prev = torch.stack([alphas[p] if p >= 0 else pipe.scheduler.final_alpha_cumprod for p in prev])
    rows = [
        compare(name, "ddim_alphas", port_alphas, torch.tensor(case["ddim_alphas"]), TOLERANCES["ddim_schedule"]),
        compare(name, "ddim_alphas_prev", port_prev, torch.tensor(case["ddim_alphas_prev"]), TOLERANCES["ddim_schedule"]),
        compare(name, "samples", result.images, tensors[case["outputs"]["samples"]], tol),
    ]
    inter = case.get("intermediates", {})
    if "x_inter" in inter:
        rows.append(compare(name, "x_inter", torch.stack(x_inter), tensors[inter["x_inter"]], tol))
    if "pred_x0" in inter:
        rows.append(compare(name, "pred_x0", torch.stack(pred_x0), tensors[inter["pred_x0"]], tol))
    return rows


@register_conformance("caphuman", vectors="caphuman_tiny")
def run_conformance(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    """Run every case (or the cases named in `only`) through the port; max abs / rel error per output."""
    reference_dir = Path(reference_dir)
    cases = json.loads(required(reference_dir, "cases.json").read_text())
    with np.load(required(reference_dir, "cases.npz")) as stored:
        tensors = {name: torch.from_numpy(stored[name]) for name in stored.files}
    pipe = build_reference_pipeline(reference_dir, device)
    pipe.set_progress_bar_config(disable=True)
    report = ConformanceReport(reference_dir, cases.get("variant", reference_dir.name))
    checks = {"apply_model": _check_apply_model, "ddim": _check_ddim}
    selected = [case for case in cases["cases"] if only is None or case.get("name") in only]
    if only is not None and len(selected) != len(set(only)):
        raise BenchError(f"{reference_dir / 'cases.json'}: no case named {sorted(set(only) - {c.get('name') for c in selected})}")
    for case in selected:
        if case.get("kind") not in checks:
            raise BenchError(f"{reference_dir / 'cases.json'}: case {case.get('name')!r} has unknown kind {case.get('kind')!r}")
        report.rows += checks[case["kind"]](pipe, case, tensors, device)
    return report
