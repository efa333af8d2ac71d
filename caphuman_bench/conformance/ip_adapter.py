"""Do the IP-Adapter rows compute what tencent-ailab/IP-Adapter computes? Checked on stored vectors.

`tests/data/ip_adapter/` (its README names the commit and the generator) holds a tiny random UNet,
ControlNet and CLIP vision tower (diffusers / transformers folders), IP-Adapter weights in the official
file layout, and per case what the authors' `generate` produced from fixed prompt embeddings, ArcFace
embedding, face image, ControlNet image and initial latents: the image tokens, the context the
ControlNet's cross-attention reads, the UNet's noise prediction and the latents of every DDIM step.

Each card's adapter runs here as in a run, on those weights: its own `load` (the tiny path, with the
pipeline built from the vectors), its identity embedding code and `extra_pipeline_inputs`; only the
text encoder is bypassed (the prompt embeddings are inputs) and the latents start from the stored ones.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from caphuman_bench.cards import get_card
from caphuman_bench.conformance import register_conformance
from caphuman_bench.conformance.base import (
    ConformanceReport,
    ConformanceRow,
    compare,
    required,
)
from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import MethodContext
from caphuman_bench.registry import get_method

TOLERANCE = 1e-4  # max |port - reference| / max |reference|, float32 on the CPU
CARD_CASES = {
    "ip_adapter_faceid": "faceid",
    "ip_adapter_faceid_controlnet_head": "faceid_controlnet",
    "ip_adapter_faceid_plusv2": "plusv2",
    "ip_adapter_faceid_plusv2_controlnet_head": "plusv2_controlnet",
    "ip_adapter_controlnet": "plus_face_controlnet",
}
IDENTITY = "vectors"
# the card parameter each of the authors' generate keywords is set by
CARD_PARAMS = {"scale": "ip_adapter_scale", "s_scale": "shortcut_scale", "guidance_scale": "guidance_scale",
               "controlnet_conditioning_scale": "controlnet_conditioning_scale"}


def read_adapter_weights(path: Path) -> dict:
    """The official layout as the authors' loader reads a .safetensors file ({"image_proj", "ip_adapter"}), in float32."""
    state_dict: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            part, _, name = key.partition(".")
            if part not in state_dict:
                raise BenchError(f"{path}: key {key!r} is neither image_proj.* nor ip_adapter.*")
            state_dict[part][name] = f.get_tensor(key).float()
    return state_dict


def vectors_pipeline(reference_dir: Path, adapter_weights: str, controlnet: bool, image_encoder: bool):
    """diffusers' SD-1.5 (+ ControlNet) pipeline on the vectors' UNet / ControlNet / CLIP tower, adapter loaded
    by `load_ip_adapter` as the cards' adapters load theirs; no VAE or text encoder (latents and embeddings in)."""
    from diffusers import (
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    meta = json.loads(required(reference_dir, "cases.json").read_text())
    parts = dict(
        vae=None, text_encoder=None, tokenizer=None, safety_checker=None, requires_safety_checker=False,
        unet=UNet2DConditionModel.from_pretrained(required(reference_dir, "unet"), local_files_only=True),
        scheduler=DDIMScheduler(**meta["scheduler"]), feature_extractor=CLIPImageProcessor(),  # IP-Adapter's own
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(required(reference_dir, "image_encoder"),
                                                                    local_files_only=True) if image_encoder else None,
    )
    if controlnet:
        net = ControlNetModel.from_pretrained(required(reference_dir, "controlnet"), local_files_only=True)
        pipe = StableDiffusionControlNetPipeline(controlnet=net, **parts)
    else:
        pipe = StableDiffusionPipeline(**parts)
    pipe.load_ip_adapter(read_adapter_weights(required(reference_dir, adapter_weights)), subfolder="", weight_name="",
                         image_encoder_folder=None, low_cpu_mem_usage=False)
    return pipe


def vectors_adapter(card_name: str, case: dict, reference_dir: Path, workdir: Path, overrides: dict | None = None):
    """The card's adapter, loaded on the vectors' networks (its tiny path with the pipeline swapped)."""
    card = get_card(card_name)
    base = get_method(card.adapter)
    params = base.validated_params(card, "smoke", {"dtype": "float32", **(overrides or {})})
    for keyword, value in case["generate"].items():
        name = CARD_PARAMS.get(keyword)
        if name is not None and value is not None and float(params[name]) != float(value):
            raise BenchError(f"{card_name}: parameter {name!r} is {params[name]}, the vectors were made with {value}")
    plus = case["name"].startswith(("plusv2", "plus_face"))
    pipe = vectors_pipeline(reference_dir, case["adapter_weights"], case["controlnet"], image_encoder=plus)

    class OnVectors(base):
        def build_tiny_pipeline(self):
            self.reference_faces = None  # identities are added from the stored embedding, not detected
            return pipe

    adapter = OnVectors(card, params, MethodContext(device="cpu", workdir=workdir))
    adapter.load()
    return adapter


def _image(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray(tensor.permute(1, 2, 0).numpy())


@torch.no_grad()
def check_card(reference_dir: Path, card_name: str, overrides: dict | None = None) -> list[ConformanceRow]:
    """One card's case: its adapter's image tokens, ControlNet context, noise predictions and latents against the authors'."""
    reference_dir = Path(reference_dir)
    meta = json.loads(required(reference_dir, "cases.json").read_text())
    cases = {c["name"]: c for c in meta["cases"]}
    name = CARD_CASES[card_name]
    if name not in cases:
        raise BenchError(f"{reference_dir / 'cases.json'}: no case {name!r} (for {card_name})")
    case, tensors = cases[name], load_file(str(required(reference_dir, "cases.safetensors")))
    settings = case["generate"]
    n = int(settings["num_samples"])
    face = _image(tensors["face_image"])
    with tempfile.TemporaryDirectory() as workdir:
        adapter = vectors_adapter(card_name, case, reference_dir, Path(workdir), overrides)
        pipe = adapter.pipe
        requests = [SimpleNamespace(identity_id=IDENTITY, references=[face])] * n
        if name == "plus_face_controlnet":
            inputs = adapter.identity_inputs(requests[0], guided=True)
        else:
            crops = [face] if adapter.variant == "plusv2" else None
            adapter.add_identity(IDENTITY, [tensors["faceid_embeds"][0].numpy()], crops)
            inputs = adapter.extra_pipeline_inputs(requests, guided=True)
        seen: dict[str, list] = {"tokens": [], "eps": [], "context": [], "latents": []}
        hooks = [pipe.unet.encoder_hid_proj.register_forward_hook(lambda m, a, out: seen["tokens"].append(out[0])),
                 pipe.unet.register_forward_hook(lambda m, a, out: seen["eps"].append(out[0]))]
        if case["controlnet"]:
            inputs["image"] = [_image(tensors["controlnet_image"])] * n
            inputs["controlnet_conditioning_scale"] = float(adapter.params["controlnet_conditioning_scale"])
            hooks.append(pipe.controlnet.register_forward_hook(
                lambda m, a, kw, out: seen["context"].append(kw["encoder_hidden_states"]), with_kwargs=True))

        def step_end(_pipe, _i, _t, kw):
            seen["latents"].append(kw["latents"])
            return kw

        try:
            samples = pipe(
                prompt_embeds=tensors["text"].repeat(n, 1, 1), negative_prompt_embeds=tensors["negative_text"].repeat(n, 1, 1),
                height=settings["height"], width=settings["width"], num_inference_steps=settings["num_inference_steps"],
                guidance_scale=float(adapter.params["guidance_scale"]), eta=float(adapter.params.get("eta", 0.0)),
                latents=tensors["x_T"].clone(), output_type="latent", callback_on_step_end=step_end, **inputs,
            ).images
        finally:
            for hook in hooks:
                hook.remove()
    tokens = seen["tokens"][0].flatten(1, 2)  # [unconditional × n, conditional × n, tokens, width]
    port = {"uncond_image_tokens": tokens[:1], "image_tokens": tokens[n : n + 1], "eps": torch.stack(seen["eps"]),
            "latents": torch.stack(seen["latents"]), "samples": samples}
    if case["controlnet"]:
        port["controlnet_context"] = seen["context"][0]
    missing = sorted(set(case["outputs"]) - set(port))
    if missing:
        raise BenchError(f"{reference_dir / 'cases.json'}: case {name!r} stores outputs the check does not know: {missing}")
    return [_compare(name, output, port[output], tensors[f"{name}/{output}"]) for output in case["outputs"]]


def _compare(case: str, output: str, port: torch.Tensor, reference: torch.Tensor) -> ConformanceRow:
    """A failing row, not an error, when the shapes differ (a ControlNet given 77 tokens where the authors' reads 81)."""
    if tuple(port.shape) != tuple(reference.shape):
        label = f"{output} (shape {list(port.shape)}, authors' {list(reference.shape)})"
        return ConformanceRow(case, label, math.inf, math.inf, TOLERANCE, relative=True)
    return compare(case, output, port, reference, TOLERANCE, relative=True)


def _register(card_name: str) -> None:
    @register_conformance(card_name, vectors="ip_adapter")
    def run(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
        if device != "cpu":
            raise BenchError(f"{card_name}: the IP-Adapter vectors are checked on the CPU in float32 (got device {device!r})")
        if only is not None and CARD_CASES[card_name] not in only:
            raise BenchError(f"{card_name}: its vectors hold case {CARD_CASES[card_name]!r} only, not {sorted(only)}")
        report = ConformanceReport(Path(reference_dir), f"tencent-ailab/IP-Adapter, case {CARD_CASES[card_name]}")
        report.rows = check_card(Path(reference_dir), card_name)
        return report


for _card in CARD_CASES:
    _register(_card)
