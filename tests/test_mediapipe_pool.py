"""MediaPipe in CPU worker processes gives the landmarks and scores of the in-process reader."""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import data

from caphuman_bench.metrics.base import ScoreContext, ScoreItem
from caphuman_bench.metrics.pose_mediapipe import FaceMeshPool, FaceMeshReader, PoseMediaPipe


def _images():
    astronaut = Image.fromarray(data.astronaut())
    return [astronaut, astronaut.rotate(12, resample=Image.BILINEAR), Image.fromarray(data.camera()).convert("RGB")]


def test_pool_landmarks_equal_in_process_landmarks():
    images = _images()
    reader = FaceMeshReader()
    inline = [reader.landmarks(image) for image in images]
    reader.close()
    pool = FaceMeshPool(2)
    try:
        pooled = pool.landmarks(images)
    finally:
        pool.close()
    assert all(a is not None for a in inline)
    for a, b in zip(inline, pooled):
        np.testing.assert_array_equal(a, b)


def test_metric_scores_equal_with_and_without_workers():
    images = _images()[:2]
    target = {"pose": np.zeros(6)}
    items = [ScoreItem(f"t{i}", "astronaut", "p", "c", 0, image, images[0], "ref", target=target) for i, image in enumerate(images)]
    rows = {}
    for workers in (1, 2):
        metric = PoseMediaPipe(ScoreContext(options={"mediapipe_workers": workers}))
        rows[workers] = metric.measure(items)
        if metric._pool is not None:
            metric._pool.close()
    assert [r.values for r in rows[1]] == [r.values for r in rows[2]]
    assert all(r.status == "ok" for r in rows[2])
