"""`faces.detection.mtcnn_detect` resizes the second and third MTCNN stages' crops by size group; it
must return exactly what facenet-pytorch's `MTCNN.detect(..., landmarks=True)` returns."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.faces.detection import face_detector, mtcnn_detect


def _photos(size: int) -> list[Image.Image]:
    bench = Benchmark.load("benchmark_data/humaniphc")
    astronaut, hopper = bench.reference_image("nasa-astronaut"), bench.reference_image("grace-hopper")
    pair = Image.new("RGB", (2 * size, size))
    pair.paste(astronaut.resize((size, size)), (0, 0))
    pair.paste(ImageOps.mirror(hopper).resize((size, size)), (size, 0))
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(hopper.resize((size, size)), dtype=np.float64) + rng.normal(0, 12, (size, size, 3)), 0, 255)
    return [astronaut.resize((size, size)), hopper.resize((size, size)), pair.resize((size, size)),
            Image.fromarray(noisy.astype(np.uint8)), astronaut.crop((100, 60, 400, 360)).resize((size, size)),
            Image.new("RGB", (size, size), (128, 128, 128))]


@pytest.mark.parametrize("size", [160, 320])
def test_grouped_crops_give_facenet_pytorchs_detections_bit_for_bit(size):
    detector = face_detector("cpu")
    images = _photos(size)
    boxes, probs, points = detector.detect(images, landmarks=True)
    ours = mtcnn_detect(detector, images)
    assert sum(b is not None for b in boxes) >= 4  # faces found, and the blank image without one
    for (b, p, pts), (ob, op, opts) in zip(zip(boxes, probs, points), ours):
        if b is None:
            assert ob is None and op is None and opts is None
            continue
        assert np.array_equal(np.asarray(b, dtype=np.float32), ob)
        assert np.array_equal(np.asarray(p, dtype=np.float32), op)
        assert np.array_equal(np.asarray(pts, dtype=np.float32), opts)
    assert ours[2][0].shape[0] >= 2  # the two-face picture: both faces
