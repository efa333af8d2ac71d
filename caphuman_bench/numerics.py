"""The arithmetic a score is computed with: strict float32 for scoring, and how it is recorded.

PyTorch lets cuDNN convolutions run in TF32 by default (`torch.backends.cudnn.allow_tf32`), and a
process may have asked for TF32 matmuls or reduced-precision fp16 reductions for generation. On an
H100 TF32 moved every DECA value (`rmse_pose` by up to 1.2e-3, pose angles by 0.17°) and made rows
depend on the batch and on the shard (issue 25). `strict_float32()` turns all of that off for the
block and restores the process's settings after it, so generation keeps its fast path.

The settings are made through the legacy flags (`allow_tf32`, `set_float32_matmul_precision`), the
ones libraries read, and restored through them; where the process had set the newer `fp32_precision`
strings in a way the legacy flags cannot read back (PyTorch then refuses to read them), the strings
are restored instead.
"""

from __future__ import annotations

import contextlib

import torch

_PRECISION_FIELDS = (("cuda.matmul", "fp32_precision"), ("cudnn.conv", "fp32_precision"), ("cudnn.rnn", "fp32_precision"),
                     ("mkldnn.matmul", "fp32_precision"), ("mkldnn.conv", "fp32_precision"), ("mkldnn.rnn", "fp32_precision"))
_FLAGS = (("cuda.matmul", "allow_fp16_reduced_precision_reduction"), ("cuda.matmul", "allow_bf16_reduced_precision_reduction"),
          ("cudnn", "benchmark"), ("cudnn", "deterministic"))


def _owner(path: str):
    owner = torch.backends
    for part in path.split("."):
        owner = getattr(owner, part)
    return owner


def _read(fields) -> list[tuple[object, str, object]]:
    return [(owner, name, getattr(owner, name)) for owner, name in ((_owner(p), n) for p, n in fields) if hasattr(owner, name)]


def _legacy_tf32() -> tuple[str, bool, bool] | None:
    """(matmul precision, matmul TF32, cuDNN TF32) through the legacy flags; None where PyTorch refuses
    to read them (the process mixed the two interfaces)."""
    try:
        return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return None


def _set_legacy_tf32(precision: str, matmul: bool, cudnn: bool) -> None:
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def strict_float32():
    """float32 arithmetic as float32 inside the block: no TF32 in matmuls or cuDNN convolutions,
    `highest` matmul precision, no reduced-precision split-K reductions in fp16 / bf16 matmuls, and
    cuDNN's heuristic algorithm choice instead of its timing (`cudnn.benchmark`: a choice by timing
    may differ between processes), and only its deterministic algorithms (`cudnn.deterministic`: no
    atomics whose order varies from call to call). Everything is restored on exit, also after an exception."""
    legacy, precisions, flags = _legacy_tf32(), _read(_PRECISION_FIELDS), _read(_FLAGS)
    _set_legacy_tf32("highest", False, False)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        if legacy is not None:
            _set_legacy_tf32(*legacy)
        else:  # set through the new interface: put its strings back as they were
            for owner, name, value in precisions:
                setattr(owner, name, value)
        for owner, name, value in flags:
            setattr(owner, name, value)


def tf32_state() -> dict[str, bool | str]:
    """What PyTorch would do now: TF32 in matmuls, in cuDNN convolutions, and the matmul precision."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def device_label(device: str) -> str:
    """The device and, for a GPU, its model: 'cuda:0 (NVIDIA H100 80GB HBM3)', 'cpu'."""
    parsed = torch.device(device)
    if parsed.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(parsed)})"
    return str(device)


def device_kind(device: str) -> str:
    """'cuda' of 'cuda:1 (NVIDIA H100 80GB HBM3)', 'cpu' of 'cpu'."""
    return str(device).split(" ")[0].split(":")[0]


def precision_label(numerics: dict | None) -> str:
    """One comparable phrase for a family's recorded numerics, e.g. 'cuda float16, TF32 off';
    'unrecorded' for rows scored before scoring.json recorded them. Batch size and GPU model are
    left out: the scores must not depend on them (tests/test_scoring_invariance.py)."""
    if not numerics:
        return "unrecorded"
    tf32 = numerics.get("tf32") or {}
    on = [name for name in ("matmul", "cudnn") if tf32.get(name)]
    return f"{device_kind(numerics.get('device', '?'))} {numerics.get('dtype', '?')}, TF32 {'on (' + ', '.join(on) + ')' if on else 'off'}"
