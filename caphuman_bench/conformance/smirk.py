"""Does the `smirk` reconstructor compute what SMIRK's own code computes? Checked on stored vectors.

`tests/data/smirk/` (README there names the authors' commit): seeded random weights in `SMIRK_em1.pt`'s
layout — rebuilt here from `weights_seed` and checked against `weights_digest` (3.7 M floats are not
committed) — two ready 224² crops, and two photos (regions of skimage's astronaut) with the MediaPipe
landmarks they were cropped from. For each, what the authors' `demo.py` path computed: the crop's
similarity and the uint8 crop (photos) and the encoder's six outputs. The weights reach the port through
the real loader (`SmirkReconstructor.from_weights`, strict) from a temporary `SMIRK_em1.pt`.
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

import caphuman_bench.models.smirk as smirk_model
from caphuman_bench.conformance import register_conformance
from caphuman_bench.conformance.base import ConformanceReport, ConformanceRow, compare, required
from caphuman_bench.errors import BenchError

TOLERANCE = 1e-4  # max |port - reference| / max |reference|, float32 on the CPU
CROP_TOLERANCE = 0.0  # grey levels: the same skimage warp and truncation give the same uint8 crop
TRANSFORM_TOLERANCE = 1e-12  # relative: the same float64 arithmetic


def _tensor(tensors: dict[str, torch.Tensor], case: str, name: str) -> torch.Tensor:
    key = f"{case}.{name}"
    if key not in tensors:
        raise BenchError(f"cases.safetensors: tensor {key!r} is missing")
    return tensors[key]


def _photo(case: dict) -> np.ndarray:
    """The case's photo, rebuilt from skimage's astronaut and checked against the stored digest."""
    from skimage import data

    y0, y1, x0, x1 = case["region"]
    pixels = np.ascontiguousarray(data.astronaut()[y0:y1, x0:x1])
    if hashlib.sha256(pixels.tobytes()).hexdigest() != case["photo_sha256"]:
        raise BenchError(f"case {case['name']!r}: skimage's astronaut region {case['region']} is not the photo the vectors were made from")
    return pixels


def _load_model(meta: dict, device: str) -> smirk_model.SmirkReconstructor:
    checkpoint = smirk_model.random_smirk_checkpoint(int(meta["weights_seed"]))
    if smirk_model.state_digest(checkpoint) != meta["weights_digest"]:
        raise BenchError(f"random_smirk_checkpoint({meta['weights_seed']}) no longer makes the weights the vectors were "
                         "made with (digest differs): regenerate tests/data/smirk")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "SMIRK_em1.pt"
        torch.save(checkpoint, path)
        return smirk_model.SmirkReconstructor.from_weights({"smirk": path}, device)


def _check_case(model: smirk_model.SmirkReconstructor, case: dict, outputs: list[str],
                tensors: dict[str, torch.Tensor]) -> list[ConformanceRow]:
    name, rows = case["name"], []
    if case["kind"] == "photo":
        landmarks = _tensor(tensors, name, "landmarks").numpy()
        transform = torch.from_numpy(smirk_model.crop_square(landmarks).tform)
        rows.append(compare(name, "tform", transform, _tensor(tensors, name, "tform"), TRANSFORM_TOLERANCE, relative=True))
        crop = smirk_model.smirk_crop(Image.fromarray(_photo(case)), landmarks)
        rows.append(compare(name, "crop", torch.from_numpy(crop).float(), _tensor(tensors, name, "crop").float(), CROP_TOLERANCE))
    else:
        crop = _tensor(tensors, name, "crop").numpy()
    port = model.outputs(smirk_model.crops_to_tensor([crop]))
    for output in outputs:
        rows.append(compare(name, output, port[output][0], _tensor(tensors, name, output), TOLERANCE, relative=True))
    return rows


@register_conformance("smirk", vectors="smirk")
def run_conformance(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    """Every case (or those named in `only`): crop transform, crop and outputs; one row each."""
    reference_dir = Path(reference_dir)
    meta = json.loads(required(reference_dir, "cases.json").read_text())
    tensors = load_file(str(required(reference_dir, "cases.safetensors")))
    selected = [case for case in meta["cases"] if only is None or case["name"] in only]
    if only is not None and len(selected) != len(set(only)):
        raise BenchError(f"{reference_dir / 'cases.json'}: no case named {sorted(set(only) - {c['name'] for c in selected})}")
    model = _load_model(meta, device)
    report = ConformanceReport(reference_dir, f"smirk {meta['commit'][:12]}, random weights (seed {meta['weights_seed']})")
    for case in selected:
        report.rows += _check_case(model, case, meta["outputs"], tensors)
    return report
