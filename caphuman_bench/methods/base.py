"""The method interface: a card + resolved parameters in, one PIL image per generation request out.

An adapter never reads the run directory itself except through `workdir` (its own cache folder),
and never decides seeds: every request carries its own `torch.Generator`, so an image depends only
on its task, never on batch size, shard or order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from caphuman_bench.benchmark import HeadCondition
from caphuman_bench.cards import MethodCard


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


@dataclass
class MethodContext:
    """What the generate stage hands an adapter."""

    device: str = "cpu"
    workdir: Path | None = None  # <run>/cache/method: per-run pre-computation (reference codes, renders)
    weights: dict[str, Path] = field(default_factory=dict)  # resolved manifest id -> local path


class MethodAdapter:
    """Base for method adapters; subclasses are registered with `@register_method(name)`."""

    adapter_name: ClassVar[str]

    def __init__(self, card: MethodCard, params: dict[str, Any], context: MethodContext) -> None:
        self.card = card
        self.params = params
        self.context = context

    @classmethod
    def required_weights(cls, card: MethodCard, params: dict[str, Any]) -> list[str]:
        """Manifest ids that must be present before any work starts (default: the card's list)."""
        return [] if params.get("tiny") else list(card.weights)

    def load(self) -> None:
        """Build or load the models once, before the first `generate` call."""

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        raise NotImplementedError

    def head_target(self, identity_id: str, reference: Image.Image, condition: HeadCondition) -> dict[str, np.ndarray] | None:
        """The head-control target this method was steered to (shape, exp, pose, cam, light), if it knows it.

        The generate stage stores it under `<run>/targets/` so the head-control metric compares with
        exactly what the method was asked for (e.g. after CapHuman's coefficient mixing). Methods
        without head control return None; scoring then takes the condition's own parameters.
        """
        return None
