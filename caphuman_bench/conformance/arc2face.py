"""Do the `arc2face` and `arc2face_controlnet` adapters compute what Arc2Face's own code computes?

The vectors (`tests/data/arc2face/`, README there: foivospar/Arc2Face commit, environment, generator) hold
tiny random models in the released layouts (`models/arc2face`, `models/encoder`, `models/controlnet`, an
SD-1.5-shaped `sd15/`) and what the authors' code made with them: `project_face_embs` prompt embeddings,
3 DPM-Solver steps with guidance as README "Usage" and gradio_demo/app_controlnet.py call the pipeline
(UNet inputs and outputs, ControlNet input tensor and residuals, latents, decoded images), and
`image_align` outputs. The check loads those folders through the adapter's own loader (`_load_pipeline`),
builds the pipeline call with the adapter's `pipeline_call` (card defaults: guidance, ControlNet scale),
and compares. What it cannot take from the authors' run: the ArcFace embedding (stored, put in the
adapter's per-identity cache), the head render (the ControlNet image comes from stored normals through
`normals_to_arc2face_image`), and the initial noise (stored, passed as `latents`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from caphuman_bench.cards import get_card
from caphuman_bench.conformance import register_conformance
from caphuman_bench.conformance.base import ConformanceReport, ConformanceRow, compare, required
from caphuman_bench.errors import BenchError
from caphuman_bench.methods.arc2face import normals_to_arc2face_image
from caphuman_bench.methods.base import GenerationRequest, MethodContext
from caphuman_bench.models.arc2face import arc2face_prompt_embeds
from caphuman_bench.registry import get_method

TOLERANCE = 1e-4  # relative (max |port - reference| / max |reference|), float32 on CPU
PIXELS = 0.0  # uint8 images (the ControlNet image, FFHQ alignment): equal


def _weights(reference_dir: Path) -> dict[str, Path]:
    folders = {"stable_diffusion_v1_5": "sd15/model_index.json", "arc2face_unet": "models/arc2face",
               "arc2face_encoder": "models/encoder", "arc2face_controlnet": "models/controlnet"}
    return {weights_id: required(reference_dir, path) for weights_id, path in folders.items()}


def _adapter(reference_dir: Path, card_name: str, case: dict, embedding: torch.Tensor, device: str):
    """The card's adapter on the vectors' folders, float32, with the stored ArcFace embedding as identity "id"."""
    card = get_card(card_name)
    params = card.resolve_params(None, {"num_inference_steps": case["steps"], "height": case["height"], "width": case["width"]})
    method = get_method(card.adapter)(card, params, MethodContext(device=device, weights=_weights(reference_dir)))
    method.device, method.dtype = torch.device(device), torch.float32
    method.pipe = method._load_pipeline().to(device)
    method.pipe.set_progress_bar_config(disable=True)
    method._embeddings = {"id": embedding[None]}
    return method


def _requests(case: dict) -> list[GenerationRequest]:
    """One request per image of the authors' `num_images_per_prompt`, all of the stored identity."""
    return [GenerationRequest(task_id=f"conformance-{k}", identity_id="id", prompt="", subject="", reference=None,
                              condition=None, generator=torch.Generator().manual_seed(k), height=case["height"],
                              width=case["width"]) for k in range(case["images_per_prompt"])]


def _denoise(method, case: dict, tensors: dict, prefix: str, device: str) -> list[ConformanceRow]:
    """The adapter's pipeline call from the stored initial latents; UNet, ControlNet and step outputs recorded."""
    record: dict = {"unet_sample": [], "unet_timestep": [], "unet_out": [], "latents": []}

    def unet_hook(module, args, kwargs, output):
        record["unet_sample"].append(args[0])
        record["unet_timestep"].append(torch.as_tensor(args[1]).reshape(-1)[:1])
        record.setdefault("unet_context", kwargs["encoder_hidden_states"])
        record["unet_out"].append(output[0])

    def controlnet_hook(module, args, kwargs, output):
        record.setdefault("controlnet_cond", kwargs["controlnet_cond"])
        record.setdefault("controlnet_down", list(output[0]))
        record.setdefault("controlnet_mid", output[1])

    def on_step_end(pipe, step, timestep, step_tensors):
        record["latents"].append(step_tensors["latents"].clone())
        return step_tensors

    call = method.pipeline_call(_requests(case))
    call.pop("generator")  # the stored x_T replaces the draw
    hooks = [method.pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)]
    if "controlnet_down" in case:
        hooks.append(method.pipe.controlnet.register_forward_hook(controlnet_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            images = method.pipe(**call, latents=tensors[f"{prefix}/x_T"].to(device), output_type="np",
                                 callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"]).images
    finally:
        for hook in hooks:
            hook.remove()
    timesteps = method.pipe.scheduler.timesteps.tolist()
    if timesteps != case["timesteps"]:
        raise BenchError(f"{prefix}: scheduler timesteps {timesteps} != the authors' {case['timesteps']}")
    name = f"denoise_{case['steps']}steps_cfg{case['guidance_scale']:g}"
    half = len(record["unet_context"]) // 2  # classifier-free guidance: [unconditional, conditional]
    pairs = [("prompt_embeds", call["prompt_embeds"][:1], "prompt_embeds", lambda t: t[case["identity"] : case["identity"] + 1]),
             ("negative_prompt_embeds", record["unet_context"][:1], "negative_prompt_embeds", None),
             ("unet_context_conditional", record["unet_context"][half:half + 1], "prompt_embeds",
              lambda t: t[case["identity"] : case["identity"] + 1])]
    pairs += [(key, torch.stack(record[key]), key, None) for key in ("unet_sample", "unet_timestep", "unet_out", "latents")]
    pairs.append(("image", torch.from_numpy(np.asarray(images)), "image", None))
    if "controlnet_down" in case:
        pairs += [("controlnet_cond", record["controlnet_cond"], "controlnet_cond", None),
                  ("controlnet_mid", record["controlnet_mid"], "controlnet_mid", None)]
        if len(record["controlnet_down"]) != case["controlnet_down"]:
            raise BenchError(f"{prefix}: ControlNet gives {len(record['controlnet_down'])} residuals, the authors' {case['controlnet_down']}")
        pairs += [(f"controlnet_down_{k:02d}", port, f"controlnet_down_{k:02d}", None)
                  for k, port in enumerate(record["controlnet_down"])]
    rows = []
    for output, port, key, select in pairs:
        reference = tensors[f"{prefix}/{key}"]
        rows.append(compare(name, output, port, select(reference) if select else reference, TOLERANCE, relative=True))
    return rows


def _load(reference_dir: Path) -> tuple[dict, dict]:
    cases = json.loads(required(reference_dir, "cases.json").read_text())
    return cases, load_file(str(required(reference_dir, "cases.safetensors")))


def _selected(names: list[str], only: list[str] | None, reference_dir: Path) -> list[str]:
    if only is None:
        return names
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise BenchError(f"{reference_dir / 'cases.json'}: no case named {unknown} (known: {', '.join(names)})")
    return [name for name in names if name in only]


@register_conformance("arc2face", vectors="arc2face")
def run_arc2face(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    """`project_face_embs` on a batch of two identities (the authors' code takes one per call), and README
    "Usage"'s pipeline call: 3 steps, guidance 3.0, two images of one identity."""
    reference_dir = Path(reference_dir)
    cases, tensors = _load(reference_dir)
    case = cases["arc2face"]
    method = _adapter(reference_dir, "arc2face", case, tensors["arc2face/id_embeddings"][case["identity"]], device)
    report = ConformanceReport(reference_dir, "arc2face (tiny random weights)")
    for name in _selected(["prompt_embeds_two_identities", "denoise"], only, reference_dir):
        if name == "denoise":
            report.rows += _denoise(method, case, tensors, "arc2face", device)
        else:
            port = arc2face_prompt_embeds(method.pipe.text_encoder, method.pipe.tokenizer, tensors["arc2face/id_embeddings"].to(device))
            report.rows.append(compare(name, "prompt_embeds", port, tensors["arc2face/prompt_embeds"], TOLERANCE, relative=True))
    return report


@register_conformance("arc2face_controlnet", vectors="arc2face")
def run_arc2face_controlnet(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    """The pose demo: normals → ControlNet image, the pipeline call with it (3 steps, guidance 3.0, two images),
    and `image_align` (FFHQ alignment) of a CelebA-sized photo (padding) and a large one (shrink)."""
    from caphuman_bench.faces.ffhq_align import ffhq_align

    reference_dir = Path(reference_dir)
    cases, tensors = _load(reference_dir)
    case, prefix = cases["arc2face_controlnet"], "arc2face_controlnet"
    aligns = {f"ffhq_align_{c['name']}": c for c in cases["align"]}
    names = _selected(["control_image", "denoise", *aligns], only, reference_dir)
    report = ConformanceReport(reference_dir, "arc2face_controlnet (tiny random weights)")
    control_image = normals_to_arc2face_image(tensors[f"{prefix}/normals"].numpy())
    for name in names:
        if name == "control_image":
            port = torch.from_numpy(np.asarray(control_image).copy())
            report.rows.append(compare(name, "control_image", port, tensors[f"{prefix}/control_image"], PIXELS))
        elif name == "denoise":
            method = _adapter(reference_dir, prefix, case, tensors[f"{prefix}/id_embeddings"][case["identity"]], device)
            method.control_image = lambda request: control_image  # the stored normals stand for the head render
            report.rows += _denoise(method, case, tensors, prefix, device)
        else:
            align = aligns[name]
            photo = Image.fromarray(tensors[f"align/{align['name']}/photo"].numpy())
            port = torch.from_numpy(np.asarray(ffhq_align(photo, tensors[f"align/{align['name']}/landmarks"].numpy(),
                                                          align["output_size"])).copy())
            report.rows.append(compare(name, "aligned", port, tensors[f"align/{align['name']}/aligned"], PIXELS))
    return report
