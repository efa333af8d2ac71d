"""Does `FastComposerPipeline` compute what the official FastComposer code computes? Checked on stored vectors.

A reference directory (layout of `tests/data/fastcomposer/`, its README names the authors' commit) holds
`hparams.json` (the tiny variant's constructor arguments), `state_dict.safetensors` (a `FastComposerModel`
state dict: the official checkpoint's key names, read by `loaders/convert_fastcomposer.py`, except that the
text token table keeps only the rows the cases look up; see `official_state_dict`), and
`cases.safetensors` + `cases.json`: per case the prompt, the reference photo, the start latents, and what
the official call computed: token ids and image-token mask, subject pixels, object embedding, text
embeddings before and after the postfuse MLP, and each denoising step's guided noise and latents.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from caphuman_bench.conformance import register_conformance
from caphuman_bench.conformance.base import ConformanceReport, ConformanceRow, compare, required
from caphuman_bench.errors import BenchError
from caphuman_bench.loaders.convert_caphuman import load_checkpoint_file
from caphuman_bench.loaders.convert_fastcomposer import fastcomposer_components
from caphuman_bench.pipelines.pipeline_fastcomposer import (
    TRIGGER_WORD,
    FastComposerPipeline,
    subject_pixel_values,
    subject_token_ids,
)

TOLERANCE = 1e-4  # max |port - reference| / max |reference|, float32 on CPU (issue 21)
TOKENS = 0.0  # token ids, the image-token index and mask, the timesteps: exact
TOKEN_TABLE = "text_encoder.embeddings.token_embedding"


def official_state_dict(path: Path, hparams: dict) -> dict[str, torch.Tensor]:
    """The authors' `FastComposerModel.state_dict()` as stored: its 49408-row text token table (1.6 MB of
    the file) is kept as the rows the cases look up (`<table>.rows` at `<table>.ids`) and rebuilt here with
    zeros elsewhere. No checked output reads another row (tests/data/fastcomposer/README.md)."""
    state = load_checkpoint_file(path)
    if f"{TOKEN_TABLE}.rows" not in state or f"{TOKEN_TABLE}.ids" not in state:
        raise BenchError(f"{path}: no {TOKEN_TABLE}.rows and .ids (the token table's rows the cases use)")
    rows, ids = state.pop(f"{TOKEN_TABLE}.rows"), state.pop(f"{TOKEN_TABLE}.ids")
    table = rows.new_zeros(hparams["text_encoder"]["vocab_size"], rows.shape[1])
    table[ids] = rows
    state[f"{TOKEN_TABLE}.weight"] = table
    return state


def _reference(tensors: dict[str, torch.Tensor], case: dict, output: str) -> torch.Tensor:
    key = case["tensors"].get(output)
    if key not in tensors:
        raise BenchError(f"cases.safetensors: tensor {output!r} of case {case['name']!r} is missing")
    return tensors[key]


def _recorded_steps(pipe: FastComposerPipeline) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Make the scheduler log (timestep, guided noise, next latents) of each step into the returned list."""
    steps, step = [], pipe.scheduler.step

    def recorded(model_output, timestep, sample, **kwargs):
        out = step(model_output, timestep, sample, **kwargs)
        steps.append((int(timestep), model_output, out.prev_sample))
        return out

    pipe.scheduler.step = recorded
    return steps


@torch.no_grad()
def _check_case(pipe: FastComposerPipeline, case: dict, call: dict, tensors: dict, device: str) -> list[ConformanceRow]:
    name, prompt = case["name"], case["prompt"]

    def check(output: str, port: torch.Tensor, tolerance: float = TOLERANCE) -> ConformanceRow:
        return compare(name, output, port, _reference(tensors, case, output), tolerance, relative=tolerance > 0)

    image = Image.fromarray(_reference(tensors, case, "reference_image").numpy())
    ids, index = subject_token_ids(pipe.trigger_tokenizer, pipe.tokenizer.pad_token_id, prompt)
    text_ids = pipe.tokenizer(prompt.replace(TRIGGER_WORD, ""), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    negative, text, subject, mask = pipe.encode_prompt([prompt], [""], torch.device(device))
    pixels = subject_pixel_values(image, call["object_resolution"], pipe.image_encoder.config.image_size)[None]
    object_embeds = pipe.encode_subject([image], call["object_resolution"], torch.device(device), torch.float32)
    rows = [
        check("subject_input_ids", torch.tensor([ids]), TOKENS),
        compare(name, "image_token_index", torch.tensor([index]), torch.tensor([case["image_token_index"]]), TOKENS),
        check("image_token_mask", mask.long(), TOKENS),
        check("text_input_ids", text_ids, TOKENS),
        check("object_pixel_values", pixels),
        check("object_embeds", object_embeds),
        check("negative_embeds", negative),
        check("text_embeds", text),
        check("subject_embeds", subject),
        check("augmented_embeds", pipe.postfuse_module(subject, object_embeds, mask)),
    ]
    steps = _recorded_steps(pipe)
    try:
        latents = pipe([prompt], [image], negative_prompt="", height=call["height"], width=call["width"],
                       num_inference_steps=call["num_inference_steps"], guidance_scale=call["guidance_scale"],
                       alpha=case["alpha"], object_resolution=call["object_resolution"],
                       latents=_reference(tensors, case, "x_T").to(device), output_type="latent").images
    finally:
        del pipe.scheduler.step  # the class's own method again
    rows += [
        compare(name, "timesteps", torch.tensor([t for t, _, _ in steps]), torch.tensor(case["timesteps"]), TOKENS),
        check("noise_pred", torch.stack([noise for _, noise, _ in steps])),
        check("step_latents", torch.stack([x for _, _, x in steps])),
        check("latents", latents),
    ]
    return rows


@register_conformance("fastcomposer", vectors="fastcomposer")
def run_conformance(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    """Every case (or those named in `only`) through the port, from the official state dict; one row per output."""
    reference_dir = Path(reference_dir)
    hparams = json.loads(required(reference_dir, "hparams.json").read_text())
    cases = json.loads(required(reference_dir, "cases.json").read_text())
    tensors = load_file(str(required(reference_dir, "cases.safetensors")))
    weights = required(reference_dir, "state_dict.safetensors")
    components = fastcomposer_components(official_state_dict(weights, hparams), device=device, dtype=torch.float32,
                                         hparams=hparams, label=str(weights))
    pipe = FastComposerPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    selected = [case for case in cases["cases"] if only is None or case["name"] in only]
    if only is not None and len(selected) != len(set(only)):
        raise BenchError(f"{reference_dir / 'cases.json'}: no case named {sorted(set(only) - {c['name'] for c in selected})}")
    report = ConformanceReport(reference_dir, cases.get("variant", reference_dir.name))
    for case in selected:
        report.rows += _check_case(pipe, case, cases["call"], tensors, device)
    return report
