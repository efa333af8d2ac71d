"""68 landmarks for lists of images (faces/landmarks.py) and the random-weight 2DFAN-4 archive (models/fan.py,
benchmarks/make_random_weights.py): batched results equal one-image calls, for FAN and for dlib on the host pool."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.faces import landmarks
from caphuman_bench.faces.landmarks import (
    LandmarkDetector, dlib_landmarks, fan_crop_frame, load_fan,
)
from caphuman_bench.models.fan import FAN
from caphuman_bench.parallel import THREADS_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_random_weights as mrw  # noqa: E402


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """The two demo photos and a blank image (no face)."""
    bench = Benchmark.load()
    blank = Image.new("RGB", (200, 160), "white")
    return [bench.reference_image("nasa-astronaut"), bench.reference_image("grace-hopper"), blank]


@pytest.fixture(scope="module")
def tiny_fan_file(tmp_path_factory) -> Path:
    written = mrw.write_all(tmp_path_factory.mktemp("weights"), layout="tiny", only=["fan_2dfan4"])
    return written["fan_2dfan4"]


def test_fan_has_the_release_layout():
    """face_alignment's FAN(4): stem, 4 stacks of depth-4 hourglasses at 256 features, 68 heatmaps; their key names
    (HourGlass registers b1_l, b2_l per level downwards, b2_plus_1 at the bottom, then b3_1 … b3_4)."""
    with torch.device("meta"):
        net = FAN()
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 23_820_176  # ≈ 91 MB of float32, the release archive's size
    assert list(net.m0.state_dict())[0] == "b1_4.bn1.weight" and "m3.b2_plus_1.conv3.weight" in state
    assert state["l3.weight"].shape == (68, 256, 1, 1) and state["al2.weight"].shape == (256, 68, 1, 1)
    assert "bl3.weight" not in state and "al3.weight" not in state  # no link after the last stack
    assert state["conv4.downsample.2.weight"].shape == (256, 128, 1, 1)  # ConvBlock 128 → 256 projects its input


def test_random_weights_writer_gives_a_fan_archive_load_fan_reads(tiny_fan_file):
    net = load_fan(tiny_fan_file)
    with torch.no_grad():
        heatmaps = net(torch.rand(2, 3, 256, 256))
    assert heatmaps.shape == (2, 68, 64, 64) and torch.isfinite(heatmaps).all()


@pytest.mark.slow
def test_full_size_fan_archive(tmp_path):
    net = load_fan(mrw.write_all(tmp_path, only=["fan_2dfan4"])["fan_2dfan4"])
    assert sum(p.numel() for p in net.parameters()) == 23_820_176
    with torch.no_grad():
        heatmaps = net(torch.rand(2, 3, 256, 256))
    assert heatmaps.shape == (2, 68, 64, 64) and torch.isfinite(heatmaps).all()


def test_fan_batches_equal_one_image_calls(tiny_fan_file, photos, monkeypatch):
    monkeypatch.setattr(landmarks, "FAN_BATCH", 1)  # one face per forward pass, as one-image calls do
    detector = LandmarkDetector.create(tiny_fan_file)
    singles = [detector(photo) for photo in photos]
    monkeypatch.setattr(landmarks, "FAN_BATCH", 64)
    batch = detector.landmarks(photos)
    assert batch[2] is None and singles[2] is None  # the blank image: no MTCNN box, no points
    for points, single in zip(batch[:2], singles[:2]):
        np.testing.assert_array_equal(points, single)
    # every point maps back into the crop square around the box (200 · scale on a side)
    from caphuman_bench.faces.detection import detect_faces

    centre, scale = fan_crop_frame(detect_faces([photos[0]])[0].box)
    assert np.all(np.abs(batch[0] - centre) <= 100 * scale + 1)


def test_dlib_on_the_host_pool_equals_serial(photos, monkeypatch):
    threaded = dlib_landmarks(photos)
    monkeypatch.setenv(THREADS_ENV, "1")
    serial = dlib_landmarks(photos)
    assert serial[2] is None and threaded[2] is None
    for points, reference in zip(threaded[:2], serial[:2]):
        assert points.shape == (68, 2)
        np.testing.assert_array_equal(points, reference)
    assert LandmarkDetector.create(None).source == "dlib"


def test_head_control_crops_with_fan_landmarks(tiny_fan_file, photos):
    """Protocol fastcomposer with the FAN file present: the kpt68 crop comes from FAN, named in the rows."""
    from caphuman_bench.metrics.base import ScoreContext, ScoreItem
    from caphuman_bench.metrics.head_control import HeadControl
    from caphuman_bench.models.deca_encoder import DecaEncoder

    torch.manual_seed(0)
    context = ScoreContext(device="cpu", options={"protocol": "fastcomposer"}, weights={"fan_2dfan4": tiny_fan_file})
    metric = HeadControl(context, encoder=DecaEncoder().eval())
    goal = {"shape": np.zeros(100), "exp": np.zeros(50), "pose": np.zeros(6), "light": np.zeros((9, 3))}
    metric.update([ScoreItem("t", "astronaut", "p", "c", 0, photo, photos[0], "a person", target=goal) for photo in photos])
    rows = metric.last_rows
    assert [row.status for row in rows] == ["ok", "ok", "no_face"]
    assert all(row.extra["landmarks"] == "fan" and row.extra["crop"] == "kpt68" for row in rows)
