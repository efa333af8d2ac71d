"""ArcFace alignment equals insightface's `norm_crop` pixel for pixel (known-answer crops made by
insightface's own `face_align.py`: tests/data/arcface_norm_crop/README.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from caphuman_bench.faces.arcface import ARCFACE_SIZE, ARCFACE_TEMPLATE, arcface_align
from tests.conftest import DATA

VECTORS = DATA / "arcface_norm_crop"
CASES = json.loads((VECTORS / "cases.json").read_text())
STORED = load_file(str(VECTORS / "vectors.safetensors"))
CROPS = [(case, size) for case in CASES for size in case["sizes"]]


def _inputs(case) -> tuple[Image.Image, np.ndarray]:
    return Image.fromarray(STORED[f"image.{case['image']}"]), STORED[f"case{case['case']}.landmarks"]


@pytest.mark.parametrize(("case", "size"), CROPS, ids=[f"case{c['case']}-{s}" for c, s in CROPS])
def test_crop_equals_insightface_norm_crop(case, size):
    image, landmarks = _inputs(case)
    assert landmarks.dtype == np.dtype(case["landmarks_dtype"])
    np.testing.assert_array_equal(arcface_align(image, landmarks, size), STORED[f"case{case['case']}.crop{size}"])


def _skimage_crop(image: Image.Image, landmarks: np.ndarray, size: int) -> np.ndarray:
    """The crop before: the same transform (float64), scikit-image's bilinear `warp` instead of OpenCV's."""
    from skimage.transform import SimilarityTransform, warp

    template = ARCFACE_TEMPLATE.astype(np.float64) * size / ARCFACE_SIZE
    transform = SimilarityTransform.from_estimate(landmarks.astype(np.float64), template)
    warped = warp(np.asarray(image), transform.inverse, output_shape=(size, size), order=1, preserve_range=True)
    return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


def test_the_skimage_warp_fails_the_check():
    """The vectors tell the two warps apart: scikit-image's interpolation misses insightface's crop."""
    for case in CASES:
        image, landmarks = _inputs(case)
        expected = STORED[f"case{case['case']}.crop112"].astype(int)
        difference = np.abs(_skimage_crop(image, landmarks, 112).astype(int) - expected)
        assert difference.max() >= 2 and (difference > 0).mean() > 0.05
