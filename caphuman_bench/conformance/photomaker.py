"""Does the PhotoMaker port (v1: `photomaker`, v2: `photomaker_v2`) compute what the authors' pipeline does?

The reference directory (`tests/data/photomaker/`, README there: the authors' commit, how the vectors were
made) holds a tiny SDXL (`sdxl_tiny.safetensors`, `hparams.json`), the tiny checkpoints in the official
layout (`photomaker-v1.safetensors` / `photomaker-v2.safetensors`: `id_encoder.*` + `lora_weights.*`, the
form the authors' `load_photomaker_adapter` reads) and, per case, what the authors' pipeline fed its modules
and got back: the trigger-word tokenization (class token repeated, mask), the ID images' pixel values, the
ID tokens, the prompt embedding before and after fusion, and per denoising step the UNet's inputs (text or
fused embedding, pooled embedding, time ids, latents) and outputs with classifier-free guidance, across the
start-merge step. The port runs the same cases through `PhotoMakerStableDiffusionXLPipeline` with the
checkpoint loaded by its own loaders (ID-encoder key map, LoRA fused into the UNet).
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

TOLERANCE = 1e-4  # max |port - reference| / max |reference|, float32 on CPU
EXACT = ("class_expanded_ids", "text_only_ids", "class_tokens_mask", "unet_timestep")
TOKENIZERS = ("tokenizer", "tokenizer_2")


def _text_encoders(hparams: dict, tensors: dict[str, torch.Tensor], label: str) -> dict:
    """The two CLIP text encoders, their token tables rebuilt from the stored rows (zero elsewhere)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = {}
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        encoder = cls(CLIPTextConfig(**hparams["text_encoders"][name]))
        prefix = f"{name}."
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix) and ".token_embedding." not in k}
        table = torch.zeros_like(encoder.get_input_embeddings().weight)
        table[tensors[f"{name}.token_embedding.ids"]] = tensors[f"{name}.token_embedding.rows"].float()
        state["text_model.embeddings.token_embedding.weight"] = table
        if not any(key.startswith("text_model.") for key in encoder.state_dict()):  # transformers 5 drops the wrapper
            state = {key.removeprefix("text_model."): value for key, value in state.items()}
        result = encoder.load_state_dict(state, strict=False)
        if result.unexpected_keys or [k for k in result.missing_keys if not k.endswith("position_ids")]:
            raise BenchError(f"{label}: {name} does not match hparams.json (missing {result.missing_keys[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
        encoders[name] = encoder.eval()
    return encoders


def build_reference_pipeline(reference_dir: Path, version: str, device: str = "cpu"):
    """The port at the vectors' sizes: tiny SDXL from `sdxl_tiny.safetensors`, the ID encoder and LoRA from
    `photomaker-<version>.safetensors` through the port's own loaders."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from caphuman_bench.loaders.convert_caphuman import clip_tokenizer
    from caphuman_bench.models.photomaker import load_photomaker_id_encoder
    from caphuman_bench.pipelines.pipeline_photomaker import PhotoMakerStableDiffusionXLPipeline, id_image_processor
    from caphuman_bench.pipelines.tiny import tiny_vae

    hparams = json.loads(required(reference_dir, "hparams.json").read_text())
    sdxl_path = required(reference_dir, "sdxl_tiny.safetensors")
    sdxl = load_file(str(sdxl_path))
    unet = UNet2DConditionModel(**hparams["unet"])
    unet.load_state_dict({k.removeprefix("unet."): v.float() for k, v in sdxl.items() if k.startswith("unet.")})
    tokenizers = {}
    for name in TOKENIZERS:
        tokenizers[name] = clip_tokenizer(77)
        tokenizers[name].pad_token = hparams["tokenizer_pad_tokens"][name]  # SDXL's second tokenizer pads with "!"
    checkpoint_path = required(reference_dir, f"photomaker-{version}.safetensors")
    checkpoint = load_file(str(checkpoint_path))
    parts = {part: {k.removeprefix(f"{part}."): v.float() for k, v in checkpoint.items() if k.startswith(f"{part}.")}
             for part in ("id_encoder", "lora_weights")}
    id_encoder = load_photomaker_id_encoder(parts["id_encoder"], version, str(checkpoint_path), hparams["embed_dim"],
                                            hparams["vision"], hparams["perceiver_dim_head"])
    pipe = PhotoMakerStableDiffusionXLPipeline(
        vae=tiny_vae().eval(),  # never run: the cases stop at the latents
        unet=unet.eval(), scheduler=EulerDiscreteScheduler(**hparams["scheduler"]), id_encoder=id_encoder,
        feature_extractor=id_image_processor(hparams["id_image_processor"]["size"]),
        trigger_word=hparams["trigger_word"], **tokenizers, **_text_encoders(hparams, sdxl, str(sdxl_path)))
    pipe.load_photomaker_lora(parts["lora_weights"])
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class _Recorder:
    """What the port feeds its modules and gets back, in the order of the reference's fields."""

    def __init__(self, pipe) -> None:
        self.fields: dict[str, list[torch.Tensor]] = {}
        self.text_ids: dict[str, list[torch.Tensor]] = {name: [] for name in TOKENIZERS}
        scheduler_step = pipe.scheduler.step

        def step(*args, **kwargs):
            out = scheduler_step(*args, **kwargs)
            self.add("latents_after_step", out[0])
            return out

        pipe.scheduler.step = step
        self.restore = lambda: delattr(pipe.scheduler, "step")
        self.handles = [
            pipe.text_encoder.register_forward_pre_hook(lambda m, a: self.text_ids["tokenizer"].append(a[0])),
            pipe.text_encoder_2.register_forward_pre_hook(lambda m, a: self.text_ids["tokenizer_2"].append(a[0])),
            pipe.id_encoder.register_forward_pre_hook(self._id_in),
            pipe.id_encoder.register_forward_hook(lambda m, a, out: self.add("prompt_embeds_fused", out)),
            pipe.id_encoder.fuse_module.register_forward_pre_hook(lambda m, a: self.add("id_tokens", a[1])),
            pipe.unet.register_forward_pre_hook(self._unet_in, with_kwargs=True),
            pipe.unet.register_forward_hook(lambda m, a, out: self.add("unet_noise_pred", out[0])),
        ]

    def add(self, field: str, value: torch.Tensor) -> None:
        self.fields.setdefault(field, []).append(value.detach().clone())

    def _id_in(self, module, args) -> None:
        self.add("id_pixel_values", args[0])
        self.add("prompt_embeds_with_class_tokens", args[1])
        self.add("class_tokens_mask", args[2].to(torch.int64))

    def _unet_in(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.add("unet_sample", sample)
        self.add("unet_timestep", torch.as_tensor(timestep).float().reshape(1))
        self.add("unet_encoder_hidden_states", kwargs["encoder_hidden_states"])
        self.add("unet_text_embeds", kwargs["added_cond_kwargs"]["text_embeds"])
        self.add("unet_time_ids", kwargs["added_cond_kwargs"]["time_ids"])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.restore()

    def outputs(self) -> dict[str, torch.Tensor]:
        """Per field one tensor: single calls as they are, per-step fields stacked over the steps."""
        out = {field: values[0] if len(values) == 1 and not field.startswith(("unet_", "latents_")) else torch.stack(values)
               for field, values in self.fields.items()}
        for name, calls in self.text_ids.items():
            # first call: the trigger-word branch; second: the text-only prompt (then the negative prompt)
            out[f"{name}_class_expanded_ids"], out[f"{name}_text_only_ids"] = calls[0][0], calls[1][0]
        return out


def _run_case(pipe, case: dict, tensors: dict[str, torch.Tensor], device: str, batch: int = 1) -> dict[str, torch.Tensor]:
    """The case through the port; with `batch` > 1 the same prompt `batch` times in one call (the adapter
    batches an identity's prompts; the authors' pipeline takes one prompt), every row to match the reference."""
    images = [Image.fromarray(tensors[f"inputs/{name}"].numpy()) for name in case["id_images"]]
    id_embeds = (tensors["inputs/arcface_id_embeds"][case["arcface_id_embeds_rows"]]
                 if case["arcface_id_embeds_rows"] is not None else None)
    negative = [case["negative_prompt"]] * batch if case["negative_prompt"] is not None else None
    recorder = _Recorder(pipe)
    try:
        result = pipe([case["prompt"]] * batch, input_id_images=images, id_embeds=id_embeds,
                      start_merge_step=case["start_merge_step"], negative_prompt=negative,
                      guidance_scale=case["guidance_scale"], num_inference_steps=case["num_inference_steps"],
                      height=case["height"], width=case["width"],
                      latents=tensors[case["x_T"]].to(device).repeat(batch, 1, 1, 1), output_type="latent")
    finally:
        recorder.close()
    return {**recorder.outputs(), "final_latents": result.images}


def _compare_batch(case: dict, pipe, tensors: dict[str, torch.Tensor], device: str) -> list[ConformanceRow]:
    port = _run_case(pipe, case, tensors, device, batch=2)
    return [compare(case["name"], f"batch2_row{row}_{field}", port[field][row:row + 1], tensors[case["tensors"][field]],
                    TOLERANCE, relative=True)
            for field in ("prompt_embeds_fused", "final_latents") for row in range(2)]


def _compare_case(case: dict, port: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[ConformanceRow]:
    rows = []
    for field, key in case["tensors"].items():
        if field.endswith("_prompt_ids"):  # the authors' tokenization with the trigger's id: an input, not an output
            continue
        if field not in port:
            raise BenchError(f"case {case['name']!r}: the port produced no {field!r}")
        exact = field.endswith(EXACT)
        rows.append(compare(case["name"], field, port[field].float(), tensors[key].float(),
                            0.0 if exact else TOLERANCE, relative=not exact))
    return rows


def run_photomaker_conformance(reference_dir: Path, version: str, device: str = "cpu",
                               only: list[str] | None = None) -> ConformanceReport:
    reference_dir = Path(reference_dir)
    meta = json.loads(required(reference_dir, "cases.json").read_text())
    cases = [case for case in meta["cases"] if case["version"] == version]
    selected = [case for case in cases if only is None or case["name"] in only]
    if only is not None and len(selected) != len(set(only)):
        raise BenchError(f"{reference_dir / 'cases.json'}: no {version} case named {sorted(set(only) - {c['name'] for c in selected})}")
    if not selected:
        raise BenchError(f"{reference_dir / 'cases.json'}: no PhotoMaker {version} cases")
    tensors = load_file(str(required(reference_dir, "cases.safetensors")))
    pipe = build_reference_pipeline(reference_dir, version, device)
    report = ConformanceReport(reference_dir, f"PhotoMaker {version}, authors' code ({meta['authors_repo']} "
                                              f"{meta.get('authors_commit', '?')[:7]})")
    with torch.no_grad():
        for case in selected:
            report.rows += _compare_case(case, _run_case(pipe, case, tensors, device), tensors)
        report.rows += _compare_batch(selected[0], pipe, tensors, device)
    return report


@register_conformance("photomaker", vectors="photomaker")
def run_v1(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    return run_photomaker_conformance(reference_dir, "v1", device, only)


@register_conformance("photomaker_v2", vectors="photomaker")
def run_v2(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    return run_photomaker_conformance(reference_dir, "v2", device, only)
