"""The head_control metric end to end: MTCNN box → DECA crop → random-weight E_flame → RMSE / angles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from facenet_pytorch import MTCNN
from PIL import Image
from skimage import data

from caphuman_bench.benchmark import euler_to_axis_angle
from caphuman_bench.metrics.base import ScoreContext, ScoreItem
from caphuman_bench.metrics.geometry import geodesic_angle_deg
from caphuman_bench.metrics.head_control import VALUE_NAMES, HeadControl
from caphuman_bench.models.deca_encoder import DecaEncoder, deca_crop, decompose
from caphuman_bench.registry import get_metric


@pytest.fixture(scope="module")
def encoder() -> DecaEncoder:
    torch.manual_seed(0)
    return DecaEncoder().eval()


def target(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pose = np.concatenate([euler_to_axis_angle(30, -5, 0), rng.normal(size=3) * 0.05])
    return {"shape": rng.normal(size=100), "exp": rng.normal(size=50), "pose": pose,
            "cam": np.array([8.0, 0.0, 0.0]), "light": rng.normal(size=(9, 3))}


def item(image, target_coefficients, **kw) -> ScoreItem:
    reference = Image.fromarray(data.astronaut())
    return ScoreItem("t", "astronaut", "p", "c", 0, image, reference, "a person", target=target_coefficients, **kw)


def test_registered_with_its_weights_and_directions():
    cls = get_metric("head_control")
    assert cls is HeadControl
    assert cls.info.weights == ("deca_model", "mtcnn")
    assert cls.info.higher_is_better == {name: False for name in VALUE_NAMES}
    assert cls.convention["paper_metric"] is True and "MTCNN" in cls.convention["detector"]["detector"]


def test_end_to_end_on_a_real_photo(encoder):
    photo = Image.fromarray(data.astronaut())
    goal = target(0)
    no_shape = {k: v for k, v in target(1).items() if k != "shape"}
    items = [
        item(photo, goal),
        item(Image.new("RGB", (300, 300), (255, 255, 255)), goal),  # blank: no face
        item(None, goal, image_error="unreadable image (OSError: truncated)"),
        item(photo, no_shape),
        item(photo, {**goal, "exp": np.zeros(10)}),  # a target of the wrong size
    ]
    metric = HeadControl(ScoreContext(device="cpu", options={"protocol": "caphuman-bench"}), encoder=encoder)  # MTCNN crop
    metric.update(items)
    rows = metric.last_rows
    assert [r.status for r in rows] == ["ok", "no_face", "unreadable", "ok", "error"]

    # Independent path: facenet-pytorch's MTCNN (most confident face), DECA crop, encoder, numpy.
    boxes, _ = MTCNN(select_largest=False).detect(photo)
    with torch.no_grad():
        code = {k: v[0].numpy() for k, v in decompose(encoder(deca_crop(photo, boxes[0])[None])).items()}
    values = rows[0].values
    for group, size in (("shape", 100), ("pose", 6), ("exp", 50), ("light", 27)):
        expected = np.sqrt(np.sum((code[group].reshape(-1) - goal[group].reshape(-1)) ** 2) / size)
        assert values[f"rmse_{group}"] == pytest.approx(expected, rel=1e-5)
    assert values["pose_error_deg"] == pytest.approx(geodesic_angle_deg(code["pose"][:3], goal["pose"][:3]), abs=1e-3)
    assert set(values) == set(VALUE_NAMES) and all(math.isfinite(v) for v in values.values())
    assert rows[0].extra["detector"] == "mtcnn" and rows[0].extra["n_faces"] == 1

    assert all(math.isnan(v) for v in rows[1].values.values()) and rows[1].reason == "MTCNN found no face"
    assert all(math.isnan(v) for v in rows[2].values.values())
    # no shape in the target: the reference photo's own DECA shape (the image is the reference here)
    assert rows[3].values["rmse_shape"] == pytest.approx(0.0, abs=1e-5) and rows[3].reason == ""
    assert math.isfinite(rows[3].values["pose_error_deg"])
    assert "exp" in rows[4].reason and "target 10" in rows[4].reason

    aggregate = metric.compute()
    assert aggregate["rmse_shape"]["n"] == 2 and aggregate["rmse_pose"]["n"] == 2
    assert aggregate["_items"] == {"seen": 5, "ok": 2}


def test_fastcomposer_protocol_crops_decas_default_kpt68(encoder):
    """The paper's columns crop as DECA's default (and CapHuman's) does: the kpt68 square of 68 landmarks,
    here from dlib's predictor (FAN's file is absent), named in the row."""
    from caphuman_bench.faces.landmarks import dlib_landmarks
    from caphuman_bench.models.deca_encoder import deca_crop_square, landmark_square

    photo = Image.fromarray(data.astronaut())
    goal = target(0)
    metric = HeadControl(ScoreContext(device="cpu", options={"protocol": "fastcomposer"}), encoder=encoder)
    metric.update([item(photo, goal)])
    (row,) = metric.last_rows
    assert row.status == "ok" and row.extra["crop"] == "kpt68" and row.extra["landmarks"] == "dlib"
    with torch.no_grad():
        crop = deca_crop_square(photo, landmark_square(dlib_landmarks([photo])[0]))
        code = {k: v[0].numpy() for k, v in decompose(encoder(crop[None])).items()}
    expected = np.sqrt(np.sum((code["pose"] - goal["pose"]) ** 2) / 6)
    assert row.values["rmse_pose"] == pytest.approx(expected, rel=1e-5)
