"""The metric interface: torchmetrics `Metric`s that also return one row per image.

Each metric family subclasses `BenchMetric`, is decorated with `@register_metric`, and implements
`measure(items) -> list[ItemScore]`. `update` records those rows (for `scores.parquet`) and adds
them into sum-reducible states, so `compute()` gives the same aggregate on one process or after a
`torch.distributed` reduction (torchmetrics syncs the states once, in `compute`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torchmetrics import Metric

from caphuman_bench.atomic import atomic_write, read_cached
from caphuman_bench.registry import MetricInfo


@dataclass
class ScoreItem:
    """One generated image and everything a metric may compare it with, read from the run directory."""

    task_id: str
    identity_id: str
    prompt_id: str
    condition_id: str
    sample: int
    image: Image.Image | None  # RGB, or None when it could not be read (see image_error)
    reference: Image.Image  # the identity's reference photo, RGB
    prompt: str  # the prompt with its subject placeholder filled by the neutral phrase
    subject_prompt: str = ""  # the prompt with the identity's own subject phrase ("a man ..."), FastComposer's CLIP text
    image_error: str | None = None
    reference_sha256: str = ""  # of the reference photo's pixels: keys the per-identity feature cache
    target: dict[str, np.ndarray] | None = None  # head-control target coefficients (shape, exp, pose, cam, light)
    references: tuple[Image.Image, ...] = ()  # every photo of a `references` split's "<id>@k" (k > 1); else empty
    siblings: tuple[tuple[str, str, Path], ...] = ()  # (task id, head condition, image) of the other finished samples of this identity and prompt
    # The reconstructor that read the photos behind `target` (run.json params 'reconstructor'), None when no
    # photo was read (the condition's own parameters, the tiny setting's neutral code), and the parts of
    # `target` it read from the reference photo (`render.head_condition.reference_parts`).
    target_reconstructor: str | None = None
    target_from_reference: tuple[str, ...] = ()


@dataclass
class ItemScore:
    """The values one metric family gives one image. NaN marks a value that was not scored."""

    values: dict[str, float]
    status: str = "ok"  # ok | no_face | unreadable | error
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreContext:
    """Run-wide settings shared by all metrics of a scoring pass."""

    device: str = "cpu"
    cache_dir: Path | None = None  # <run>/cache/metrics: reference-side features, once per identity
    options: dict[str, Any] = field(default_factory=dict)  # e.g. no_face=zero|skip, clip_model=ViT-L-14
    weights: dict[str, Path] = field(default_factory=dict)  # resolved manifest id -> path
    prompts: list[str] = field(default_factory=list)  # the benchmark's prompt set, placeholder filled


# Scoring options that choose which families run, not how one family scores: no family's own options
# (its signature, its scoring.json entry) carry them.
FAMILY_OPTIONS = ("head_reconstructors",)


class BenchMetric(Metric):
    """Base for metric families. Subclasses set nothing but `measure` (and optionally `__init__`)."""

    full_state_update = False
    metric_name: ClassVar[str]
    info: ClassVar[MetricInfo]

    def __init__(self, context: ScoreContext | None = None) -> None:
        super().__init__()
        self.context = context or ScoreContext()
        self.value_names = list(self.info.higher_is_better)
        k = len(self.value_names)
        self.add_state("value_sum", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("value_sumsq", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("value_count", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("items_seen", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("items_ok", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.last_rows: list[ItemScore] = []
        self._reference_memo: dict[str, Any] = {}

    # -- what a subclass implements -------------------------------------------------------------
    @classmethod
    def required_weights(cls, options: dict[str, Any]) -> tuple[str, ...]:
        """Manifest ids this metric needs under these scoring options (default: the registered ones)."""
        return cls.info.weights

    @classmethod
    def families(cls, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Family name → the options its instance scores with. One family by default; a metric scored
        by several models at once (head_control by several reconstructors) gives one per model, named
        `registry.variant_name(metric, model)`."""
        return {cls.metric_name: {k: v for k, v in options.items() if k not in FAMILY_OPTIONS}}

    @classmethod
    def named_families(cls, options: dict[str, Any]) -> list[str]:
        """Families these options name explicitly (never skipped for missing weights, as a --metrics name)."""
        return []

    @classmethod
    def family_convention(cls, family: str) -> dict[str, Any]:
        """The convention results.json records for one of this metric's families."""
        return dict(getattr(cls, "convention", {}) or {})

    def measure(self, items: list[ScoreItem]) -> list[ItemScore]:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What scoring.json records about this family beside its numerics (e.g. the model it scored with)."""
        return {}

    def numerics(self) -> dict[str, Any]:
        """Where and in what dtype the family computes (scoring.json `numerics`): the context's device
        in float32, unless a family says otherwise (CLIP where its protocol prescribes fp16, recognisers
        that run on the host or under onnxruntime)."""
        return {"device": self.context.device, "dtype": "float32"}

    # -- torchmetrics protocol ------------------------------------------------------------------
    def update(self, items: list[ScoreItem]) -> None:
        """Score a batch. Unreadable images get status `unreadable` here, so `measure` sees only images."""
        readable = [item for item in items if item.image is not None]
        measured = iter(self.measure(readable) if readable else [])
        rows = [next(measured) if item.image is not None else
                ItemScore({name: math.nan for name in self.value_names}, "unreadable", item.image_error or "unreadable image")
                for item in items]
        if next(measured, None) is not None or len(rows) != len(items):
            raise RuntimeError(f"{self.metric_name}: measure returned a wrong number of rows")
        add_sum = torch.zeros_like(self.value_sum)
        add_sq = torch.zeros_like(self.value_sum)
        add_n = torch.zeros_like(self.value_sum)
        for row in rows:
            for i, name in enumerate(self.value_names):
                v = row.values.get(name, math.nan)
                if v is not None and not math.isnan(v):
                    add_sum[i] += v
                    add_sq[i] += v * v
                    add_n[i] += 1
        self.value_sum += add_sum
        self.value_sumsq += add_sq
        self.value_count += add_n
        self.items_seen += len(rows)
        self.items_ok += sum(r.status == "ok" for r in rows)
        self.last_rows = rows

    def compute(self) -> dict[str, dict[str, float]]:
        out = {}
        for i, name in enumerate(self.value_names):
            n = float(self.value_count[i])
            mean = float(self.value_sum[i] / n) if n else math.nan
            var = float(self.value_sumsq[i] / n - mean * mean) if n > 1 else math.nan
            std = math.sqrt(max(var, 0.0) * n / (n - 1)) if n > 1 else math.nan
            out[name] = {"mean": mean, "std": std, "n": int(n)}
        out["_items"] = {"seen": int(self.items_seen), "ok": int(self.items_ok)}
        return out

    # -- helpers shared by families -------------------------------------------------------------
    @property
    def device_name(self) -> str:
        return self.context.device

    def option(self, key: str, default: Any) -> Any:
        return self.context.options.get(key, default)

    def reference_features(self, identity_id: str, image: Image.Image, compute, reference_sha256: str = "") -> Any:
        """Features of a reference photo, computed once per identity and cached under the run.

        `compute(image)` must return a numpy array (or None when it found nothing); the cache is
        an `.npy` file per metric, identity, photo and weights files, so a resumed or sharded scoring
        pass reuses it and a replaced photo or weights file never does.
        """
        files = sorted((wid, str(p), Path(p).stat().st_size) for wid, p in self.context.weights.items() if Path(p).exists())
        key = hashlib.sha256(repr((reference_sha256, files, sorted(self.context.options.items(), key=str))).encode()).hexdigest()[:16]
        memo_key = (identity_id, key)
        if memo_key in self._reference_memo:
            return self._reference_memo[memo_key]
        path = None
        if self.context.cache_dir is not None:
            path = Path(self.context.cache_dir) / self.metric_name / f"{identity_id}.{key}.npy"
            stored = read_cached(path, lambda p: np.load(p, allow_pickle=False))
            if stored is not None:
                value = None if stored.size == 0 else stored
                self._reference_memo[memo_key] = value
                return value
        value = compute(image)
        if path is not None:
            stored = np.zeros(0) if value is None else np.asarray(value)
            atomic_write(path, lambda fh: np.save(fh, stored))
        self._reference_memo[memo_key] = value
        return value
