"""The method interface: a card + resolved parameters in, one PIL image per generation request out.

An adapter never reads the run directory itself except through `workdir` (its own cache folder),
and never decides seeds: every request carries its own `torch.Generator`, so an image depends only
on its task, never on batch size, shard or order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from caphuman_bench.benchmark import Benchmark, HeadCondition
from caphuman_bench.errors import BenchError
from caphuman_bench.cards import COMMAND_LINE, MethodCard, ParamTypes
from caphuman_bench.pipelines.acceleration import (LEVERS_ENV, DIFFUSERS_FAST, Levers, accelerate_diffusers_pipeline, parse_lever_changes,
                                                   resolve_levers)


@dataclass
class GenerationRequest:
    task_id: str
    identity_id: str
    prompt: str  # subject placeholder filled with the identity's subject phrase ("a woman", ...)
    reference: Image.Image  # RGB reference photo of the identity
    condition: HeadCondition
    generator: torch.Generator
    height: int
    width: int
    subject: str = ""  # the identity's subject phrase as it stands in `prompt` ("a woman")
    # Every photo the method gets: [reference], or the first k of a `references` split's "<id>@k".
    # Methods that take several use them all (PhotoMaker, IP-Adapters by averaging); the others use `reference`.
    references: list[Image.Image] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.references:
            self.references = [self.reference]


def check_latent_size(params: dict[str, Any], where: str, *, square: bool = False, latents: str = "SD",
                      names: tuple[str, ...] = ("height", "width"), default: int = 512) -> None:
    """Image sides a latent diffusion model can make: positive multiples of 8 (its VAE's downscale), and
    equal when the head condition is rendered (square) for the method."""
    if square and int(params.get("height", default)) != int(params.get("width", default)):
        raise BenchError(f"{where}: the head condition is rendered square; parameters 'height' and 'width' must be equal")
    for name in names:
        value = int(params.get(name, default))
        if value <= 0 or value % 8:
            raise BenchError(f"{where}: parameter {name!r} must be a positive multiple of 8 ({latents} latents), got {value}")


def consecutive_batches(requests: list[GenerationRequest], batch_size: int, key=lambda r: r.identity_id):
    """Runs of at most `batch_size` consecutive requests with one `key` (by default one identity): what an
    adapter whose pipeline call holds one identity (one image embedding, one fine-tuned model) can batch."""
    batch: list[GenerationRequest] = []
    for request in requests:
        if batch and (len(batch) == max(1, batch_size) or key(request) != key(batch[0])):
            yield batch
            batch = []
        batch.append(request)
    if batch:
        yield batch


def with_trigger_word(request: GenerationRequest, trigger: str) -> str:
    """The prompt with `trigger` right after the identity's subject phrase: 'a photo of a woman img wearing
    a red hat'. FastComposer and PhotoMaker attach the reference to the word before their trigger."""
    at = request.prompt.find(request.subject) if request.subject else -1
    if at < 0:
        raise BenchError(f"prompt {request.prompt!r} does not contain the identity's subject phrase {request.subject!r}, "
                         f"after which the trigger word {trigger!r} goes")
    end = at + len(request.subject)
    return f"{request.prompt[:end]} {trigger}{request.prompt[end:]}"


@dataclass
class MethodContext:
    """What the generate stage hands an adapter."""

    device: str = "cpu"
    workdir: Path | None = None  # <run>/cache/method: per-run pre-computation (reference codes, renders)
    weights: dict[str, Path] = field(default_factory=dict)  # resolved manifest id -> local path
    artefacts: dict[str, dict] = field(default_factory=dict)  # identity -> its fine-tuned weights as planned (run.json)


TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class MethodAdapter:
    """Base for method adapters; subclasses are registered with `@register_method(name)`."""

    adapter_name: ClassVar[str]
    # Every parameter a card may set, and its type (an int is a fine float; a bool is no int).
    # The generate stage itself reads height, width and batch_size, so every adapter has them.
    param_types: ClassVar[ParamTypes] = {"height": int, "width": int, "batch_size": int}
    fast_levers: ClassVar[Levers] = DIFFUSERS_FAST  # this adapter's default on CUDA
    levers: Levers | None = None  # the levers `accelerate` applied, recorded in run.json by the generate stage

    def __init__(self, card: MethodCard, params: dict[str, Any], context: MethodContext) -> None:
        self.card = card
        self.params = params
        self.context = context

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        """Checks beyond types (choices, ranges, relations); raise BenchError naming `where`.
        Subclasses extend it (calling super); the generate stage runs it once before any work."""
        if "dtype" in params and str(params["dtype"]) not in TORCH_DTYPES:
            raise BenchError(f"{where}: parameter 'dtype' must be one of {', '.join(TORCH_DTYPES)}, got {params['dtype']!r}")
        try:  # the speed levers' switch is checked with the parameters: one error before any work
            parse_lever_changes(os.environ.get(LEVERS_ENV, ""))
        except ValueError as exc:
            raise BenchError(f"${LEVERS_ENV}: {exc}") from None

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The card's `dtype` on CUDA; float32 elsewhere (half precision on a CPU is slow and lossy)."""
        return TORCH_DTYPES[str(self.params.get("dtype", "float16"))] if device.type == "cuda" else torch.float32

    @classmethod
    def validated_params(cls, card: MethodCard, preset: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
        """The card's parameters with `preset` and the command-line `overrides`, checked before any run is planned.

        Checked layer by layer, so an error blames where the bad value came from: the card's
        `params`, one of its presets (every preset, whichever is chosen), or the command line.
        """
        card.check_param_types(cls.param_types, overrides)
        cls.check_params(dict(card.params), f"{card.path}: field 'params'")
        for name, values in card.presets.items():
            cls.check_params({**card.params, **values}, f"{card.path}: field 'presets.{name}'")
        params = card.resolve_params(preset, overrides)
        cls.check_params(params, COMMAND_LINE)
        return params

    @classmethod
    def required_weights(cls, card: MethodCard, params: dict[str, Any]) -> list[str]:
        """Manifest ids that must be present before any work starts (default: the card's list)."""
        return [] if params.get("tiny") else list(card.weights)

    @classmethod
    def artefacts(cls, card: MethodCard, params: dict[str, Any], bench: Benchmark, identity_ids: list[str],
                  runs_dir: Path) -> dict[str, dict]:
        """Files outside the weights manifest that the images depend on, checked when a run is planned:
        per identity, what an earlier command made (fine-tuned weights), or a user's file (CapHuman's
        `backbone` path): {key: {"path", "sha256", ...}}. Their hashes join the run's configuration hash,
        so new artefacts never reuse old images. Raise BenchError naming the command to run when one is
        missing. Default: none."""
        return {}

    def load(self) -> None:
        """Build or load the models once, before the first `generate` call."""

    def accelerate(self, pipe, **fixed):
        """The CUDA fast path for this adapter's stock diffusers pipeline: one call at the end of `load`.

        The levers come from the device (`fast_levers` on CUDA, eager elsewhere and for tiny models),
        then $CAPHUMAN_BENCH_LEVERS, e.g. "compile=off,fuse_qkv=0" (`acceleration.resolve_levers`); they
        change kernels, not the model, so they stay out of the run's configuration hash. `fixed` are
        levers this adapter cannot use (e.g. fuse_qkv=False where weights are swapped after loading)."""
        levers = resolve_levers(self.context.device, fast=self.fast_levers, tiny=bool(self.params.get("tiny")))
        self.levers = levers.with_(**fixed)
        return accelerate_diffusers_pipeline(pipe, self.levers)

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        raise NotImplementedError

    def head_target(self, identity_id: str, reference: Image.Image, condition: HeadCondition) -> dict[str, np.ndarray] | None:
        """The head-control target this method was steered to (shape, exp, pose, cam, light), if it knows it.

        The generate stage stores it under `<run>/targets/` so the head-control metric compares with
        exactly what the method was asked for (e.g. after CapHuman's coefficient mixing). Methods
        without head control return None; scoring then takes the condition's own parameters.
        """
        return None
