"""MediaPipe head-pose cross-check on real public-domain photos shipped with scikit-image (offline).

`skimage.data.camera()` (CC0, Lav Varshney) shows a man with his head turned about 48° towards image
right; `skimage.data.astronaut()` (NASA, public domain) is near frontal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation
from skimage import data

from caphuman_bench.benchmark import axis_angle_to_euler
from caphuman_bench.metrics.base import ScoreItem
from caphuman_bench.metrics.pose_mediapipe import (
    FaceMeshReader,
    PoseMediaPipe,
    face_frame_rotation,
    generated_rotation,
)


def euler(rotation: np.ndarray) -> tuple[float, float, float]:
    return axis_angle_to_euler(Rotation.from_matrix(rotation).as_rotvec())


@pytest.fixture(scope="module")
def reader():
    reader = FaceMeshReader()
    yield reader
    reader.close()


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def test_turned_head_and_its_mirror_read_opposite_yaws(reader):
    photo = Image.fromarray(data.camera()).convert("RGB")
    yaw, pitch, _ = euler(face_frame_rotation(reader.landmarks(photo)))
    mirror_yaw, mirror_pitch, _ = euler(face_frame_rotation(reader.landmarks(photo.transpose(Image.FLIP_LEFT_RIGHT))))
    assert yaw > 30  # the cameraman faces image right: positive yaw in the FLAME convention
    assert mirror_yaw < -30
    assert abs(yaw + mirror_yaw) <= 3  # equal magnitude, opposite sign
    assert abs(pitch - mirror_pitch) <= 3  # mirroring leaves the pitch alone


@pytest.mark.parametrize("degrees", [20, -20])
def test_in_plane_rotation_reads_back_as_roll(reader, astronaut, degrees):
    reference = reader.landmarks(astronaut)
    # PIL rotates counter-clockwise for positive angles: positive roll in the FLAME convention.
    rotated = reader.landmarks(astronaut.rotate(degrees, resample=Image.BILINEAR, expand=True))
    motion = generated_rotation(reference, rotated) @ face_frame_rotation(reference).T
    yaw, pitch, roll = euler(motion)
    assert roll == pytest.approx(degrees, abs=3)
    assert abs(yaw) < 3 and abs(pitch) < 3


def test_metric_end_to_end(astronaut):
    metric = PoseMediaPipe()
    reference_rotation = face_frame_rotation(metric.reader.landmarks(astronaut))
    roll20 = Rotation.from_euler("z", 20, degrees=True).as_matrix()
    yaw30 = Rotation.from_euler("y", 30, degrees=True).as_matrix()

    def item(image, rotation, **kw):
        pose = np.concatenate([Rotation.from_matrix(rotation).as_rotvec(), np.zeros(3)])
        return ScoreItem("t", "astronaut", "p", "c", 0, image, astronaut, "a person", target={"pose": pose}, **kw)

    items = [
        item(astronaut, reference_rotation),  # the reference itself, target = its own pose
        item(astronaut, yaw30 @ reference_rotation),  # same image, target turned by 30° yaw
        item(astronaut.rotate(20, resample=Image.BILINEAR, expand=True), roll20 @ reference_rotation),
        item(Image.new("RGB", (256, 256), (200, 200, 200)), reference_rotation),
        item(None, reference_rotation, image_error="unreadable image (OSError: truncated)"),
    ]
    metric.update(items)
    rows = metric.last_rows
    assert [r.status for r in rows] == ["ok", "ok", "ok", "no_face", "unreadable"]
    assert rows[0].values["mp_pose_error_deg"] == pytest.approx(0, abs=1e-5)
    assert rows[1].values["mp_pose_error_deg"] == pytest.approx(30, abs=1e-5)
    assert rows[2].values["mp_roll_error_deg"] < 3 and rows[2].values["mp_yaw_error_deg"] < 3
    assert all(math.isnan(v) for r in rows[3:] for v in r.values.values())
    aggregate = metric.compute()
    assert aggregate["mp_pose_error_deg"]["n"] == 3
    assert aggregate["_items"] == {"seen": 5, "ok": 3}
