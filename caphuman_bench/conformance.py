"""Does the diffusers port compute the official CapHuman function? Checked on stored reference vectors.

A reference directory holds `hparams.json` (the variant's sizes), `state_dict.safetensors` (official key
names), `cases.safetensors` + `cases.json` (inputs, outputs, intermediates of official `apply_model` calls
and of a full DDIM run with guidance); layout as `tests/data/caphuman_tiny/` (its README describes it).
Everything is read from the files, so any variant in that layout works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

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


@dataclass
class ConformanceRow:
    case: str
    output: str
    max_abs: float
    max_rel: float  # max_abs / max |reference|
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.tolerance


@dataclass
class ConformanceReport:
    reference_dir: Path
    variant: str
    rows: list[ConformanceRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    def failures(self) -> list[ConformanceRow]:
        return [row for row in self.rows if not row.passed]


def _compare(case: str, output: str, port: torch.Tensor, reference: torch.Tensor, tolerance: float) -> ConformanceRow:
    if tuple(port.shape) != tuple(reference.shape):
        raise BenchError(f"case {case!r}: {output} has shape {list(port.shape)}, reference {list(reference.shape)}")
    diff = (port.detach().double().cpu() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return ConformanceRow(case, output, diff, diff / scale if scale > 0 else diff, tolerance)


def build_reference_pipeline(reference_dir: Path, device: str = "cpu") -> CapHumanPipeline:
    """UNet + CapFace of the variant, loaded strictly from `state_dict.safetensors` (no VAE / text encoder)."""
    hparams = json.loads(_required(reference_dir, "hparams.json").read_text())
    configs = caphuman_configs(hparams)
    modules = build_components(configs, ("unet", "capface"))
    state_dict = load_checkpoint_file(_required(reference_dir, "state_dict.safetensors"))
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


def _required(reference_dir: Path, name: str) -> Path:
    path = Path(reference_dir) / name
    if not path.exists():
        raise BenchError(f"{path}: missing (a conformance reference directory needs {name})")
    return path


def _tensor(tensors: dict[str, torch.Tensor], name: str, case: str, device: str) -> torch.Tensor:
    if name not in tensors:
        raise BenchError(f"cases.safetensors: tensor {name!r} named by case {case!r} is missing")
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
        _compare(name, "eps", out.eps, tensors[case["outputs"]["eps"]], tol),
        _compare(name, "mask", out.mask, tensors[case["outputs"]["mask"]], tol),
    ]
    inter = case.get("intermediates", {})
    if "control_context" in inter:
        rows.append(_compare(name, "control_context", out.control_context, tensors[inter["control_context"]], tol))
    residuals = inter.get("control_residuals")
    if isinstance(residuals, list):  # a string says "not stored for this case"
        if len(residuals) != len(out.control_residuals):
            raise BenchError(f"case {name!r}: {len(residuals)} reference residuals, port has {len(out.control_residuals)}")
        rows += [
            _compare(name, f"control_residual_{k:02d}", port, tensors[key], tol)
            for k, (port, key) in enumerate(zip(out.control_residuals, residuals))
        ]
    masks = inter.get("hard_masks_in_call_order")
    if isinstance(masks, list):
        if len(masks) != len(out.hard_masks):
            raise BenchError(f"case {name!r}: {len(masks)} reference hard masks, port gates {len(out.hard_masks)} times")
        rows += [
            _compare(name, f"hard_mask_call_{k:02d}", port, tensors[key], TOLERANCES["hard_mask"])
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
        _compare(name, "ddim_alphas", port_alphas, torch.tensor(case["ddim_alphas"]), TOLERANCES["ddim_schedule"]),
        _compare(name, "ddim_alphas_prev", port_prev, torch.tensor(case["ddim_alphas_prev"]), TOLERANCES["ddim_schedule"]),
        _compare(name, "samples", result.images, tensors[case["outputs"]["samples"]], tol),
    ]
    inter = case.get("intermediates", {})
    if "x_inter" in inter:
        rows.append(_compare(name, "x_inter", torch.stack(x_inter), tensors[inter["x_inter"]], tol))
    if "pred_x0" in inter:
        rows.append(_compare(name, "pred_x0", torch.stack(pred_x0), tensors[inter["pred_x0"]], tol))
    return rows


def run_conformance(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    """Run every case (or the cases named in `only`) through the port; max abs / rel error per output."""
    reference_dir = Path(reference_dir)
    cases = json.loads(_required(reference_dir, "cases.json").read_text())
    tensors = load_file(str(_required(reference_dir, "cases.safetensors")))
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


def conformance_command(reference: Path, device: str = "cpu") -> int:
    """Print the report as a table; exit code 0 when every output is within tolerance, else 1."""
    from rich.console import Console
    from rich.table import Table

    report = run_conformance(reference, device)
    table = Table(title=f"CapHuman conformance: {report.variant} ({report.reference_dir})")
    for column in ("case", "output", "max abs", "max rel", "tolerance", "result"):
        table.add_column(column, justify="right" if column.startswith(("max", "tol")) else "left")
    for row in report.rows:
        verdict = "[green]pass[/green]" if row.passed else "[red]FAIL[/red]"
        table.add_row(row.case, row.output, f"{row.max_abs:.3g}", f"{row.max_rel:.3g}", f"{row.tolerance:g}", verdict)
    console = Console(width=max(Console().width, 110))  # full case names even when piped
    console.print(table)
    failed = report.failures()
    console.print(f"{len(report.rows) - len(failed)} passed, {len(failed)} failed")
    return 0 if report.passed else 1
