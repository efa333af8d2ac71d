"""Does the InstantID port compute what the authors' pipeline computes? Checked on stored reference vectors.

A reference directory (layout of `tests/data/instantid/`, its README names the authors' commit) holds a
tiny SDXL diffusers folder `sdxl/`, IdentityNet's `ControlNetModel/`, `ip-adapter.safetensors` (the two
dicts of `ip-adapter.bin` under `image_proj.` / `ip_adapter.`), `cases.json` + `cases.safetensors`
(inputs, and what the authors' `StableDiffusionXLInstantIDPipeline` handed to IdentityNet, the UNet and
the scheduler at each step) and `draw_kps_*.png` (the authors' `draw_kps`). The port is loaded from those
files by the method's own loader and called as the adapter calls it; forward hooks record the same
tensors on its side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from caphuman_bench.conformance import register_conformance
from caphuman_bench.conformance.base import ConformanceReport, ConformanceRow, compare, required
from caphuman_bench.errors import BenchError
from caphuman_bench.pipelines.pipeline_instantid import (
    StableDiffusionXLInstantIDPipeline,
    draw_keypoints,
    load_instantid_pipeline,
)

# max |port - reference| / max |reference| (float32 on the CPU); drawings must be identical
RELATIVE_TOLERANCE = 1e-4
BATCH_CASE = "both_prompts_batched"


def build_reference_pipeline(reference_dir: Path, device: str = "cpu") -> StableDiffusionXLInstantIDPipeline:
    flat = load_file(str(required(reference_dir, "ip-adapter.safetensors")))
    ip_adapter = {part: {key.removeprefix(f"{part}."): value for key, value in flat.items() if key.startswith(f"{part}.")}
                  for part in ("image_proj", "ip_adapter")}
    pipe = load_instantid_pipeline(required(reference_dir, "sdxl"), required(reference_dir, "ControlNetModel"), ip_adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class CallRecorder:
    """What the pipeline hands to IdentityNet, the UNet's image projection and the scheduler (forward hooks,
    as the vectors' generator records the authors' pipeline)."""

    def __init__(self, pipe: StableDiffusionXLInstantIDPipeline):
        self.controlnet: list[dict] = []
        self.unet: list[dict] = []
        self.image_tokens: list[torch.Tensor] = []
        self.steps: list[dict] = []
        self._pipe, self._step = pipe, pipe.scheduler.step
        self._handles = [
            pipe.controlnet.register_forward_pre_hook(lambda m, a, kw: self.controlnet.append(dict(kw)), with_kwargs=True),
            pipe.controlnet.register_forward_hook(lambda m, a, kw, out: self.controlnet[-1].update(out=out), with_kwargs=True),
            pipe.unet.register_forward_pre_hook(lambda m, a, kw: self.unet.append(dict(kw)), with_kwargs=True),
            pipe.unet.encoder_hid_proj.register_forward_hook(lambda m, a, out: self.image_tokens.append(out[0].flatten(1, 2))),
        ]

        def recording_step(model_output, timestep, sample, *args, **kwargs):
            result = self._step(model_output, timestep, sample, *args, **kwargs)
            self.steps.append({"noise_pred": model_output, "t": timestep, "sample": sample, "prev": result[0]})
            return result

        pipe.scheduler.step = recording_step

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        del self._pipe.scheduler.step  # back to the class's method

    def outputs(self) -> dict[str, torch.Tensor]:
        """The names of `cases.json`'s outputs: conditioning of the first step, then every step."""
        control, unet = self.controlnet[0], self.unet[0]
        down, mid = control["out"]
        return {
            "prompt_embeds": unet["encoder_hidden_states"],
            "image_tokens": self.image_tokens[0],
            "controlnet_context": control["encoder_hidden_states"],
            "pooled_prompt_embeds": unet["added_cond_kwargs"]["text_embeds"],
            "add_time_ids": unet["added_cond_kwargs"]["time_ids"],
            "control_image": control["controlnet_cond"],
            "timesteps": torch.stack([torch.as_tensor(s["t"], dtype=torch.float32) for s in self.steps]),
            "latents": torch.stack([self.steps[0]["sample"]] + [s["prev"] for s in self.steps]),
            "noise_pred": torch.stack([s["noise_pred"] for s in self.steps]),
            **{f"controlnet_down_{k:02d}": r for k, r in enumerate(down)},
            "controlnet_mid": mid,
        }


def _run_port(pipe, cases: list[dict], meta: dict, tensors: dict, device: str) -> dict[str, torch.Tensor]:
    """The port called as the adapter calls it: one prompt, keypoint image and generator per image."""
    settings = meta["settings"]
    recorder = CallRecorder(pipe)
    try:
        pipe([c["prompt"] for c in cases],
             image=[Image.fromarray(tensors["inputs/keypoint_image"].numpy())] * len(cases),
             face_embedding=tensors["inputs/face_embedding"].to(device),
             negative_prompt=[c["negative_prompt"] for c in cases], height=meta["size"], width=meta["size"],
             num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
             controlnet_conditioning_scale=settings["controlnet_conditioning_scale"],
             ip_adapter_scale=settings["ip_adapter_scale"],
             generator=[torch.Generator().manual_seed(c["seed"]) for c in cases], output_type="np")
        return recorder.outputs()
    finally:
        recorder.close()


def _check_case(pipe, case, meta, tensors, device) -> list[ConformanceRow]:
    port = _run_port(pipe, [case], meta, tensors, device)
    return [compare(case["name"], output, port[output], tensors[key], RELATIVE_TOLERANCE, relative=True)
            for output, key in case["outputs"].items()]


def _check_batch(pipe, cases, meta, tensors, device) -> list[ConformanceRow]:
    """Both prompts in one call of the port against the authors' one call per prompt (theirs takes one
    prompt a call); the guided noise and the latents of each image must be those of its own call."""
    port = _run_port(pipe, cases, meta, tensors, device)
    rows = []
    for output, dim in (("noise_pred", 1), ("latents", 1), ("prompt_embeds", 0), ("image_tokens", 0)):
        if dim == 1:
            reference = torch.cat([tensors[c["outputs"][output]] for c in cases], dim=1)
        else:  # [uncond, cond] per call; the batch is [uncond of each prompt, cond of each prompt]
            halves = [tensors[c["outputs"][output]].chunk(2) for c in cases]
            reference = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        rows.append(compare(BATCH_CASE, output, port[output], reference, RELATIVE_TOLERANCE, relative=True))
    return rows


def _check_drawing(reference_dir: Path, name: str, spec: dict) -> ConformanceRow:
    reference = torch.from_numpy(np.asarray(Image.open(required(reference_dir, f"{name}.png")).convert("RGB")).astype(np.int16))
    port = torch.from_numpy(np.asarray(draw_keypoints(np.array(spec["keypoints"]), spec["width"], spec["height"])).astype(np.int16))
    return compare(name, "rgb", port, reference, 0.0)


@register_conformance("instantid", vectors="instantid")
def run_conformance(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    """Every case (or those named in `only`): each prompt's call, both prompts batched, the drawings."""
    reference_dir = Path(reference_dir)
    meta = json.loads(required(reference_dir, "cases.json").read_text())
    tensors = load_file(str(required(reference_dir, "cases.safetensors")))
    names = [c["name"] for c in meta["cases"]] + [BATCH_CASE] + list(meta["draw_kps"])
    if only is not None and set(only) - set(names):
        raise BenchError(f"{reference_dir / 'cases.json'}: no case named {sorted(set(only) - set(names))}")
    selected = [name for name in names if only is None or name in only]
    report = ConformanceReport(reference_dir, meta.get("variant", reference_dir.name))
    pipe = build_reference_pipeline(reference_dir, device) if set(selected) - set(meta["draw_kps"]) else None
    for case in meta["cases"]:
        if case["name"] in selected:
            report.rows += _check_case(pipe, case, meta, tensors, device)
    if BATCH_CASE in selected:
        report.rows += _check_batch(pipe, meta["cases"], meta, tensors, device)
    report.rows += [_check_drawing(reference_dir, name, spec) for name, spec in meta["draw_kps"].items() if name in selected]
    return report
