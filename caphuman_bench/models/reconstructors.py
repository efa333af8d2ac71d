"""FLAME reconstructors: the 3D face models that read pose, expression, shape and light from a photo.

A reconstructor enters the benchmark twice (issue 26, the paper's third open question): it makes the
head condition a head-aware method is steered by (the reference's code, a pose photo's code), and it
scores head control (`head_control`). Both take it by name from this registry, so a study can swap it in
either place: `deca` (DECA, the paper's), `emoca_v2` (EMOCA v2: DECA's coarse encoder plus its own
expression encoder, same FLAME), `smirk` (SMIRK, CVPR 2024, its own encoders).

Every reconstructor gives, per face, a dict of numpy arrays in FLAME's parameter groups:
`shape` (FLAME's first 100 shape components, the ones DECA estimates), `exp` (50), `pose` (6: global
rotation + jaw, axis-angle), `cam` (3: orthographic scale, tx, ty in its own crop) and, where it
estimates one, `light` ([9, 3] spherical harmonics). A group it does not estimate is absent, and scores
that need it are NaN with the reason named.

Preprocessing is the reconstructor's own: `crop == "deca"` means DECA's test-time square (the caller
finds it by DECA's rules, `kpt68` or `bbox`, and hands `encode_crops` the 224² crops in [0, 1]);
`crop == "own"` means the reconstructor finds and crops the face itself (`encode_images`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError

FLAME_GROUPS = ("shape", "exp", "pose", "cam", "light")
SHAPE_SIZE = 100  # DECA's n_shape; a reconstructor estimating more keeps FLAME's first 100 (ordered by variance)
CROP_KINDS = ("deca", "own")

RECONSTRUCTORS: dict[str, type["Reconstructor"]] = {}


@dataclass(frozen=True)
class ReconstructorInfo:
    """What the registry, the README and `run.json` say about a reconstructor before it is built."""

    name: str
    title: str  # e.g. "DECA (Feng et al., SIGGRAPH 2021)"
    weights: tuple[str, ...]  # manifest entries it loads
    crop: str  # "deca" (DECA's test-time square, 224², [0, 1]) | "own"
    groups: tuple[str, ...]  # FLAME groups it estimates
    source: str  # the authors' repository and commit its code follows
    licence: str


class Reconstructor(ABC):
    """One FLAME reconstructor, loaded; subclasses register with `@register_reconstructor`."""

    info: ClassVar[ReconstructorInfo]

    @classmethod
    @abstractmethod
    def from_weights(cls, paths: Mapping[str, Path], device: str | torch.device = "cpu") -> "Reconstructor":
        """Loaded from the resolved files of `info.weights` (their authors' release layout), strictly."""

    @classmethod
    @abstractmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu") -> "Reconstructor":
        """A small random-weight model with the same inputs and outputs, for smoke runs and tests."""

    def encode_crops(self, crops: torch.Tensor) -> list[dict[str, np.ndarray]]:
        """Codes of DECA-style crops [N, 3, 224, 224] in [0, 1] (only `info.crop == "deca"`)."""
        raise NotImplementedError(f"{self.info.name} crops the face itself: use encode_images")

    def encode_images(self, images: list[Image.Image]) -> list[dict[str, np.ndarray] | None]:
        """Codes of whole photos, None where no face is found (only `info.crop == "own"`)."""
        raise NotImplementedError(f"{self.info.name} takes DECA's crop: use encode_crops")

    def fingerprint(self) -> str:
        """What identifies this model's numbers in a cache key: the name and its weights' identity."""
        return self.info.name


def register_reconstructor(cls: type[Reconstructor]) -> type[Reconstructor]:
    """Class decorator: make a reconstructor reachable by `cls.info.name`."""
    name = cls.info.name
    if cls.info.crop not in CROP_KINDS:
        raise BenchError(f"reconstructor {name!r}: crop must be one of {', '.join(CROP_KINDS)}, not {cls.info.crop!r}")
    if name in RECONSTRUCTORS and RECONSTRUCTORS[name] is not cls:
        raise BenchError(f"reconstructor {name!r} registered twice ({RECONSTRUCTORS[name].__module__}, {cls.__module__})")
    RECONSTRUCTORS[name] = cls
    return cls


def _load_builtin() -> None:
    # The built-in reconstructors register themselves on import (their modules import this one).
    from caphuman_bench.models import deca_encoder, emoca, smirk  # noqa: F401


def reconstructor_class(name: str) -> type[Reconstructor]:
    """The registered reconstructor `name`; a one-line error listing the known ones otherwise."""
    _load_builtin()
    if name not in RECONSTRUCTORS:
        raise BenchError(f"unknown reconstructor {name!r}; known: {', '.join(sorted(RECONSTRUCTORS))}")
    return RECONSTRUCTORS[name]


def reconstructor_names() -> list[str]:
    _load_builtin()
    return sorted(RECONSTRUCTORS)


def checked_code(code: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """A reconstructor's code with FLAME's group sizes checked (shape cut to FLAME's first 100)."""
    sizes = {"exp": (50,), "pose": (6,), "cam": (3,), "light": (9, 3)}
    out = {}
    for group, value in code.items():
        value = np.asarray(value, dtype=np.float32)
        if group == "shape":
            if value.ndim != 1 or value.shape[0] < SHAPE_SIZE:
                raise BenchError(f"{source}: shape code of size {value.shape}, expected at least {SHAPE_SIZE}")
            value = value[:SHAPE_SIZE]
        elif group in sizes and value.shape != sizes[group]:
            raise BenchError(f"{source}: {group} code of shape {value.shape}, expected {sizes[group]}")
        out[group] = value
    return out


def _path(paths: Mapping[str, Path], entry: str, name: str) -> Path:
    if entry not in paths:
        raise BenchError(f"reconstructor {name}: weights {entry!r} not resolved")
    return Path(os.fspath(paths[entry]))
