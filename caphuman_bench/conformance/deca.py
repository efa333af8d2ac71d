"""Does the DECA port compute what the authors' DECA computes? Checked on stored reference vectors.

A reference directory (layout of `tests/data/deca/`, its README names the authors' commit) holds two
photos and four cases, each photo cropped from its 68 landmarks (`kpt68`, DECA's FAN path) and from a
detector box (`bbox`, the scoring pass's MTCNN path); per case `case_<name>.safetensors`: the authors'
`TestData` crop and the codes of the authors' `DECA.encode` (E_flame, then `decompose_code`).
The weights are not stored: `deca_state_dict(seed)` rebuilds them (their sha256 is checked).

Checked: DECA's crop as this package makes it (`landmark_square` or `box_square`, then `deca_crops`)
against the authors' crop; the weights written as a `deca_model.tar` and loaded the way a run loads them
(`DecaReconstructor.from_weights`), then the codes of all stored crops (one batch) against the authors'
(one crop a call), group by group.
"""

from __future__ import annotations

import json
import tempfile
from collections import OrderedDict
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
from caphuman_bench.conformance.emoca import weights_sha256
from caphuman_bench.errors import BenchError
from caphuman_bench.models.deca_encoder import (
    DecaEncoder,
    DecaReconstructor,
    DecaSquare,
    box_square,
    deca_crops,
    landmark_square,
)
from caphuman_bench.models.emoca import seeded_tensor

# crops: max |port - reference| (pixel values in [0, 1]); codes: that over max |reference| (float32, CPU)
CROP_TOLERANCE = 1e-6
RELATIVE_TOLERANCE = 1e-4
CROP_CHECK, CODES_CHECK = "crop", "codes"


def deca_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """DECA's `E_flame` tensors (`ResnetEncoder(outsize=236)` names, in order), drawn by EMOCA's
    hash-based `seeded_tensor`: the same numbers wherever the generator or this check runs."""
    with torch.device("meta"):
        layout = DecaEncoder().state_dict()
    return OrderedDict((key, seeded_tensor(seed, key, tuple(value.shape), value.dtype)) for key, value in layout.items())


def write_deca_model(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A `deca_model.tar` as DECA's `_create_model` reads it: `E_flame`, `E_detail`, `D_detail` (the last
    two empty: DECA's `copy_state_dict` skips what is missing and encoding does not use them)."""
    torch.save({"E_flame": OrderedDict(state), "E_detail": {}, "D_detail": {}}, path)
    return path


def case_square(case: dict) -> DecaSquare:
    """The square this package crops for a case: from its 68 landmarks or from its detector box."""
    if case["kind"] == "kpt68":
        return landmark_square(np.asarray(case["landmarks"], dtype=np.float64))
    if case["kind"] == "bbox":
        return box_square(case["box"])
    raise BenchError(f"case {case['name']!r}: kind {case['kind']!r} is not 'kpt68' or 'bbox'")


def _check_crops(reference_dir: Path, cases: list[dict], tensors: dict) -> list[ConformanceRow]:
    photos = [Image.open(required(reference_dir, case["image"])).convert("RGB") for case in cases]
    port = deca_crops(photos, [case_square(case) for case in cases])
    return [compare(case["name"], CROP_CHECK, port[i], tensors[case["name"]]["crop"], CROP_TOLERANCE)
            for i, case in enumerate(cases)]


def _check_codes(meta: dict, tensors: dict, scratch: Path, device: str) -> list[ConformanceRow]:
    state = deca_state_dict(meta["seed"])
    if weights_sha256(state) != meta["weights_sha256"]:
        raise BenchError("conformance deca: the regenerated weights differ from those the vectors were made with "
                         "(sha256 mismatch): deca_state_dict or seeded_tensor changed")
    path = write_deca_model(scratch / "deca_model.tar", state)
    reconstructor = DecaReconstructor.from_weights({"deca_model": path}, device)
    cases = meta["cases"]
    codes = reconstructor.encode_crops(torch.stack([tensors[case["name"]]["crop"] for case in cases]))
    rows = []
    for i, case in enumerate(cases):
        for authors_key, group in meta["outputs"].items():
            reference = tensors[case["name"]][authors_key][0]
            rows.append(compare(case["name"], group, torch.from_numpy(codes[i][group]), reference,
                                RELATIVE_TOLERANCE, relative=True))
    return rows


@register_conformance("deca", vectors="deca")
def run_conformance(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    """The crops, then the codes (or those named in `only`: 'crop', 'codes'); the encoder runs on `device`
    (the tolerance is set for float32 on the CPU; the crops are made on the CPU)."""
    reference_dir = Path(reference_dir)
    meta = json.loads(required(reference_dir, "cases.json").read_text())
    names = [CROP_CHECK, CODES_CHECK]
    if only is not None and set(only) - set(names):
        raise BenchError(f"{reference_dir / 'cases.json'}: no check named {sorted(set(only) - set(names))} (known: {names})")
    tensors = {case["name"]: load_file(str(required(reference_dir, case["tensors"]))) for case in meta["cases"]}
    report = ConformanceReport(reference_dir, meta.get("variant", reference_dir.name))
    if only is None or CROP_CHECK in only:
        report.rows += _check_crops(reference_dir, meta["cases"], tensors)
    if only is None or CODES_CHECK in only:
        # a fresh folder per run: load_deca_encoder caches by path
        with tempfile.TemporaryDirectory(prefix="deca_conformance_") as scratch:
            report.rows += _check_codes(meta, tensors, Path(scratch), device)
    return report
