"""FLAME landmarks of the target head (render/landmarks.py): DECA's embedding file, projection into the
head render's frame, InsightFace's 5 keypoints and ControlNet's openpose face drawing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.errors import BenchError
from caphuman_bench.render.head_condition import HeadConditionRenderer, neutral_identity_code
from caphuman_bench.render.landmarks import (
    HeadLandmarks,
    LandmarkEmbedding,
    draw_openpose_face,
    five_keypoints,
    surface_points,
    to_pixels,
)

SIZE = 96


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return Benchmark.load()


@pytest.fixture(scope="module")
def renderer() -> HeadConditionRenderer:
    return HeadConditionRenderer.synthetic("cpu")


@pytest.fixture(scope="module")
def landmarks(renderer) -> HeadLandmarks:
    return HeadLandmarks.synthetic(renderer)


def _points(landmarks, bench, condition_id: str, mode: str = "position,pose") -> np.ndarray:
    return landmarks.of_condition(neutral_identity_code(), bench.conditions[condition_id], mode, SIZE)


def test_yaw_left_landmarks_lie_left_of_yaw_right(landmarks, bench):
    for left, right in (("yaw-l45", "yaw-r45"), ("yaw-l20", "yaw-r20")):
        lk, rk = five_keypoints(_points(landmarks, bench, left)), five_keypoints(_points(landmarks, bench, right))
        assert np.all(lk[:, 0] < rk[:, 0] - 2)  # every keypoint, by more than 2 px
        np.testing.assert_allclose(lk[:, 1], rk[:, 1], atol=1.5)  # a yaw moves them sideways only


def test_landmarks_land_on_the_rendered_head(renderer, landmarks, bench):
    """Every landmark falls on the render's silhouette (within a pixel: silhouette-edge points may sit
    between pixel centres), for every condition of the spec, with the renderer's own mixing."""
    code = neutral_identity_code()
    for condition in bench.conditions.values():
        render = renderer.render(code, condition, "all", SIZE)
        points = landmarks.of_target(render.target, SIZE)
        head = binary_dilation(render.mask[0] > 0, iterations=1)
        assert all(head[int(y), int(x)] for x, y in points), condition.id


def test_frontal_face_layout_and_insightface_order(landmarks, bench):
    left_eye, right_eye, nose, mouth_left, mouth_right = five_keypoints(_points(landmarks, bench, "frontal"))
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < nose[0] < mouth_right[0]
    assert left_eye[1] < nose[1] < mouth_left[1]  # image y runs down: eyes, then nose, then mouth
    centre = SIZE / 2  # frontal condition: cam tx = 0, so the face is symmetric about the image centre
    assert nose[0] == pytest.approx(centre, abs=0.5)
    assert left_eye[0] + right_eye[0] == pytest.approx(2 * centre, abs=0.5)


def test_open_jaw_moves_only_the_lower_face(landmarks, bench):
    closed, open_ = _points(landmarks, bench, "frontal", "all"), _points(landmarks, bench, "jaw-open", "all")
    assert open_[57, 1] > closed[57, 1] + 1  # lower lip goes down
    np.testing.assert_allclose(open_[36:48], closed[36:48], atol=0.5)  # eyes stay


def test_landmarks_turned_away_from_the_camera_are_marked(landmarks, bench):
    assert landmarks.facing_camera(landmarks_target(bench, "frontal")).all()
    turned = landmarks.facing_camera(landmarks_target(bench, "yaw-l45"))
    assert not turned[0] and turned[16]  # the image-left end of the jaw line turns away, the other end towards us
    assert turned[48:68].all() and turned[27:48].mean() > 0.8  # the mouth stays in view, nearly all of nose and eyes


def landmarks_target(bench, condition_id: str) -> dict:
    from caphuman_bench.render.head_condition import mix_coefficients

    return mix_coefficients(neutral_identity_code(), bench.conditions[condition_id].coefficients(), "position,pose")


def test_barycentric_mix_and_orthographic_pixels_known_answer():
    vertices = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    faces = torch.tensor([[0, 1, 2]])
    embedding = LandmarkEmbedding(np.zeros(68, dtype=np.int64), np.tile(np.float32([0.5, 0.25, 0.25]), (68, 1)))
    points = surface_points(vertices, faces, embedding)
    np.testing.assert_allclose(points[0, 0].numpy(), [0.25, 0.25, 0.0])
    # DECA's batch_orth_proj: x' = s (X + tx), y' = -s (Y + ty); pixel = (x' + 1) · size / 2
    pixels = to_pixels(torch.tensor([[[0.1, 0.2, 0.0]]]), torch.tensor([[2.0, 0.1, -0.1]]), 100)
    np.testing.assert_allclose(pixels[0, 0].numpy(), [(2 * 0.2 + 1) * 50, (-2 * 0.1 + 1) * 50], rtol=1e-6)


def _deca_style_file(path, faces, bary):
    """A file laid out like DECA's data/landmark_embedding.npy: np.save of a dict whose dynamic fields
    are torch tensors (pickled through torch._utils / torch.storage)."""
    np.save(path, {
        "static_lmk_faces_idx": faces[17:], "static_lmk_bary_coords": bary[17:],
        "dynamic_lmk_faces_idx": torch.zeros(79, 17, dtype=torch.long),
        "dynamic_lmk_bary_coords": torch.zeros(79, 17, 3),
        "full_lmk_faces_idx": faces[None], "full_lmk_bary_coords": bary[None],
    }, allow_pickle=True)


def test_reads_deca_embedding_file_and_matches_synthetic(tmp_path, renderer, landmarks):
    synthetic = LandmarkEmbedding.synthetic()
    path = tmp_path / "landmark_embedding.npy"
    _deca_style_file(path, synthetic.faces, synthetic.bary)
    loaded = LandmarkEmbedding.from_file(path)
    np.testing.assert_array_equal(loaded.faces, synthetic.faces)
    np.testing.assert_allclose(loaded.bary, synthetic.bary)
    np.savez(tmp_path / "embedding.npz", full_lmk_faces_idx=synthetic.faces, full_lmk_bary_coords=synthetic.bary)
    np.testing.assert_array_equal(LandmarkEmbedding.from_file(tmp_path / "embedding.npz").faces, synthetic.faces)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_embedding_file_never_runs_code_and_bad_files_name_themselves(tmp_path, renderer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, {"full_lmk_faces_idx": np.zeros(68, dtype=np.int64), "x": _Exploit()}, allow_pickle=True)
    with pytest.raises(BenchError, match=r"landmark_embedding\.npy.*refused.*posix.system|landmark_embedding\.npy.*refused.*os.system"):
        LandmarkEmbedding.from_file(path)
    assert not (tmp_path / "pwned").exists()

    np.save(path, np.zeros(3))
    with pytest.raises(BenchError, match="landmark_embedding.npy"):
        LandmarkEmbedding.from_file(path)
    with pytest.raises(BenchError, match="not found"):
        LandmarkEmbedding.from_file(tmp_path / "nothing.npy")
    np.save(path, {"full_lmk_faces_idx": np.zeros(68, dtype=np.int64)}, allow_pickle=True)
    with pytest.raises(BenchError, match="full_lmk_bary_coords"):
        LandmarkEmbedding.from_file(path)
    too_far = LandmarkEmbedding(np.full(68, 10**7, dtype=np.int64), np.ones((68, 3), np.float32) / 3)
    with pytest.raises(BenchError, match="outside the mesh"):
        HeadLandmarks(renderer, too_far)


def test_openpose_face_drawing_follows_controlnet():
    """ControlNet 1.1's draw_facepose: white filled circles of radius 3 at int(x), int(y) on black; 70
    points (68 + both pupils); a point whose integer x or y is 0 or below skipped (`x > eps and y > eps`)."""
    points = np.stack([np.linspace(40, 460, 68), np.full(68, 200.0)], 1)
    points[5] = (-1.0, 100.0)
    points[6] = (0.7, 120.0)  # int(x) == 0: the annotator skips it
    points[7] = (90.0, 0.2)
    image = np.asarray(draw_openpose_face(points, 512))
    assert image.shape == (512, 512, 3) and set(np.unique(image)) == {0, 255}
    cv2 = pytest.importorskip("cv2")
    expected = np.zeros((512, 512, 3), np.uint8)
    for x, y in [*points, points[36:42].mean(0), points[42:48].mean(0)]:
        if int(x) > 0.01 and int(y) > 0.01:
            cv2.circle(expected, (int(x), int(y)), 3, (255, 255, 255), thickness=-1)
    np.testing.assert_array_equal(image, expected)
    assert image[120, 0].max() == 0 and image[0, 90].max() == 0
    assert np.asarray(draw_openpose_face(points / 8, 64)).max() == 255  # radius scales down to 1 at 64 px
    hidden = np.ones(68, dtype=bool)
    hidden[36] = False  # one point of the right eye hidden: it and the right pupil are not drawn
    partial = np.asarray(draw_openpose_face(points, 512, visible=hidden))
    x, y = points[36].astype(int)
    assert partial[y, x].max() == 0 and image[y, x].max() == 255
    assert (partial > 0).sum() < (image > 0).sum()


def test_five_keypoints_rejects_wrong_shape():
    with pytest.raises(BenchError, match="68, 2"):
        five_keypoints(np.zeros((5, 2)))
