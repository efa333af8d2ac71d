"""Does the EMOCA v2 port compute what the authors' ExpDECA computes? Checked on stored reference vectors.

A reference directory (layout of `tests/data/emoca_v2/`, its README names the authors' commit) holds two
photos (`<case>.png`, their 68 landmarks in `cases.json`), and per photo `case_<name>.safetensors`: the
authors' `TestData` crop of it and, for each expression head (what E_expression predicts besides the
expression: nothing, the jaw, the global rotation, both), the codes of the authors' `DecaModule.encode`.
The weights are not stored: `emoca.random_state_dict(seed, head)` rebuilds them (their sha256 is checked).

Checked: DECA's crop as this package makes it (`landmark_square` + `deca_crops`) against the authors'
crop; the release head's weights written in the release layout (`write_release`) and loaded the way a run
loads them (`EmocaReconstructor.from_weights`); the other heads built from the same weights in memory;
every head's codes of both crops (one batch) against the authors' (one photo a call).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from caphuman_bench.conformance import register_conformance
from caphuman_bench.conformance.base import (
    ConformanceReport,
    ConformanceRow,
    compare,
    required,
)
from caphuman_bench.errors import BenchError
from caphuman_bench.models.deca_encoder import deca_crops, landmark_square
from caphuman_bench.models.emoca import (
    WEIGHTS_ID,
    EmocaReconstructor,
    ExpressionHead,
    encoder_from_state_dict,
    random_state_dict,
    write_release,
)

# max |port - reference| / max |reference| (float32 on the CPU)
RELATIVE_TOLERANCE = 1e-4
CROP_CHECK = "crop"


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """What make_vectors.py stores of the weights it ran: names and bytes, in order."""
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(key.encode())
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _reconstructor(state: dict[str, torch.Tensor], head: ExpressionHead, release: bool, scratch: Path,
                   device: str) -> EmocaReconstructor:
    if release:
        folder = scratch / f"EMOCA_{head}"
        write_release(folder, state, head)
        return EmocaReconstructor.from_weights({WEIGHTS_ID: folder}, device)
    encoder = encoder_from_state_dict(state, head, f"random EMOCA ({head})").eval().to(device)
    return EmocaReconstructor(encoder, f"emoca_v2:conformance-{head}")


def _check_crops(reference_dir: Path, cases: list[dict], tensors: dict) -> list[ConformanceRow]:
    photos = [Image.open(required(reference_dir, case["image"])).convert("RGB") for case in cases]
    squares = [landmark_square(np.asarray(case["landmarks"], dtype=np.float64)) for case in cases]
    port = deca_crops(photos, squares)
    return [compare(case["name"], CROP_CHECK, port[i], tensors[case["name"]]["crop"], RELATIVE_TOLERANCE, relative=True)
            for i, case in enumerate(cases)]


def _check_head(name: str, spec: dict, release: bool, meta: dict, tensors: dict, scratch: Path,
                device: str) -> list[ConformanceRow]:
    head = ExpressionHead(global_pose=spec["global_pose"], jaw_pose=spec["jaw_pose"])
    state = random_state_dict(meta["seed"], head)
    if weights_sha256(state) != spec["weights_sha256"]:
        raise BenchError(f"conformance {name}: the regenerated weights differ from those the vectors were made with "
                         f"(sha256 mismatch): random_state_dict changed")
    reconstructor = _reconstructor(state, head, release, scratch, device)
    cases = meta["cases"]
    codes = reconstructor.encode_crops(torch.stack([tensors[case["name"]]["crop"] for case in cases]))
    rows = []
    for i, case in enumerate(cases):
        for authors_key, group in meta["outputs"].items():
            reference = tensors[case["name"]][f"{name}/{authors_key}"][0]
            rows.append(compare(f"{name}:{case['name']}", group, torch.from_numpy(codes[i][group]), reference,
                                RELATIVE_TOLERANCE, relative=True))
    return rows


@register_conformance("emoca_v2", vectors="emoca_v2")
def run_conformance(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    """The crops, then every head (or those named in `only`: 'crop', head names such as 'exp_jaw'); the
    encoders run on `device` (the tolerance is set for float32 on the CPU; the crops are made on the CPU)."""
    reference_dir = Path(reference_dir)
    meta = json.loads(required(reference_dir, "cases.json").read_text())
    names = [CROP_CHECK, *meta["heads"]]
    if only is not None and set(only) - set(names):
        raise BenchError(f"{reference_dir / 'cases.json'}: no check named {sorted(set(only) - set(names))} (known: {names})")
    selected = [name for name in names if only is None or name in only]
    tensors = {case["name"]: load_file(str(required(reference_dir, case["tensors"]))) for case in meta["cases"]}
    report = ConformanceReport(reference_dir, meta.get("variant", reference_dir.name))
    if CROP_CHECK in selected:
        report.rows += _check_crops(reference_dir, meta["cases"], tensors)
    with tempfile.TemporaryDirectory(prefix="emoca_conformance_") as scratch:
        for name, spec in meta["heads"].items():
            if name in selected:
                report.rows += _check_head(name, spec, name == meta["release_head"], meta, tensors, Path(scratch), device)
    return report
