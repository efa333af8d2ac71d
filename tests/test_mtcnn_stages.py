"""`faces.detection.mtcnn_detect` makes the second and third MTCNN stages' crops all at once from a
summed-area table; the crops must equal facenet-pytorch's per-box area resizes to an ulp, and the
detections its `MTCNN.detect(..., landmarks=True)` to float tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.faces.detection import _box_crops, face_detector, mtcnn_detect, summed_area_table


def _photos(size: int) -> list[Image.Image]:
    bench = Benchmark.load(None)
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
def test_detections_match_facenet_pytorchs(size):
    detector = face_detector("cpu")
    images = _photos(size)
    boxes, probs, points = detector.detect(images, landmarks=True)
    ours = mtcnn_detect(detector, images)
    assert sum(b is not None for b in boxes) >= 4  # faces found, and the blank image without one
    for (b, p, pts), (ob, op, opts) in zip(zip(boxes, probs, points), ours):
        if b is None:
            assert ob is None and op is None and opts is None
            continue
        assert ob.shape == np.asarray(b).shape
        np.testing.assert_allclose(ob, np.asarray(b, dtype=np.float32), atol=1e-2)  # pixels
        np.testing.assert_allclose(op, np.asarray(p, dtype=np.float32), atol=1e-5)
        np.testing.assert_allclose(opts, np.asarray(pts, dtype=np.float32), atol=1e-2)
    assert ours[2][0].shape[0] >= 2  # the two-face picture: both faces


def test_box_crops_equal_facenet_pytorchs_per_box_resize():
    """Shrinking, enlarging (boxes under 24 px), boxes cut by the image border and empty boxes."""
    from facenet_pytorch.models.utils.detect_face import imresample, pad

    rng = np.random.default_rng(1)
    pixels = torch.as_tensor(rng.integers(0, 256, (2, 70, 90, 3), dtype=np.uint8))
    imgs = pixels.permute(0, 3, 1, 2).float()
    boxes = torch.tensor([[5, 7, 60, 62], [-10, -4, 30, 36], [70, 40, 130, 100], [10, 10, 19, 19],
                          [1, 1, 90, 70], [40.7, 20.2, 52.9, 33.1], [95, 5, 120, 30], [3, 2, 88, 69]], dtype=torch.float32)
    image_inds = torch.tensor([0, 0, 1, 1, 0, 1, 1, 1])
    padded = pad(boxes.clone(), 90, 70)
    for size in (24, 48):
        expected = [imresample(imgs[image_inds[k], :, padded[0][k] - 1 : padded[1][k], padded[2][k] - 1 : padded[3][k]]
                               .unsqueeze(0), (size, size)) for k in range(len(boxes))
                    if padded[1][k] > padded[0][k] - 1 and padded[3][k] > padded[2][k] - 1]
        expected = (torch.cat(expected) - 127.5) * 0.0078125
        ours = _box_crops(summed_area_table(pixels.permute(0, 3, 1, 2)), image_inds, padded, size)
        assert ours.shape == expected.shape == (7, 3, size, size)  # the box right of the image has no pixels
        torch.testing.assert_close(ours, expected, rtol=0, atol=2e-7)
