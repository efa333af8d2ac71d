"""Head-control arithmetic against direct numpy formulas (Rodrigues, trace formula, SVD Kabsch)."""

from __future__ import annotations

import numpy as np
import pytest

from caphuman_bench.benchmark import euler_to_axis_angle
from caphuman_bench.metrics.geometry import (
    RMSE_GROUPS,
    coefficient_rmse,
    euler_differences,
    geodesic_angle_deg,
    kabsch_rotation,
    pose_errors,
    wrap_degrees,
)


def rodrigues(rotvec: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(rotvec)
    if angle < 1e-12:
        return np.eye(3)
    k = rotvec / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def numpy_geodesic_deg(a: np.ndarray, b: np.ndarray) -> float:
    relative = rodrigues(a) @ rodrigues(b).T
    return float(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))))


def test_group_rmse_matches_numpy_mean_over_images():
    rng = np.random.default_rng(0)
    sizes = {"shape": (100,), "pose": (6,), "exp": (50,), "light": (9, 3)}
    generated = [{g: rng.normal(size=s) for g, s in sizes.items()} for _ in range(7)]
    target = [{g: rng.normal(size=s) * 0.5 for g, s in sizes.items()} for _ in range(7)]
    for group, d in RMSE_GROUPS.items():
        ours = np.mean([coefficient_rmse(a[group], b[group]) for a, b in zip(generated, target)])
        direct = np.mean([np.sqrt(np.sum((a[group] - b[group]) ** 2) / d) for a, b in zip(generated, target)])
        assert ours == pytest.approx(direct, rel=1e-12)
    assert coefficient_rmse(np.ones(27), np.ones((9, 3))) == 0.0
    with pytest.raises(ValueError, match="generated 100, target 50"):
        coefficient_rmse(np.zeros(100), np.zeros(50))


def test_geodesic_angle_matches_trace_formula():
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = rng.normal(size=3) * 0.8, rng.normal(size=3) * 0.8
        assert geodesic_angle_deg(a, b) == pytest.approx(numpy_geodesic_deg(a, b), abs=1e-6)
        assert geodesic_angle_deg(rodrigues(a), rodrigues(b)) == pytest.approx(numpy_geodesic_deg(a, b), abs=1e-6)


def test_known_30_degree_yaw():
    yaw30 = euler_to_axis_angle(30, 0, 0)
    np.testing.assert_allclose(yaw30, [0, np.radians(30), 0], atol=1e-12)  # about y (up)
    assert geodesic_angle_deg(yaw30, np.zeros(3)) == pytest.approx(30, abs=0.01)
    errors = pose_errors(yaw30, np.zeros(3))
    assert errors["pose_error_deg"] == pytest.approx(30, abs=0.01)
    assert errors["yaw_error_deg"] == pytest.approx(30, abs=0.01)
    assert errors["pitch_error_deg"] == pytest.approx(0, abs=1e-9)
    assert errors["roll_error_deg"] == pytest.approx(0, abs=1e-9)
    # Positive yaw carries the nose (+z, towards the camera) to +x (image right).
    assert (rodrigues(yaw30) @ [0, 0, 1])[0] > 0


@pytest.mark.parametrize("generated, target", [((20, -5, 3), (-10, 5, -2)), ((0, 25, 0), (0, 10, 0)), ((5, 0, 40), (5, 0, 10))])
def test_per_axis_differences(generated, target):
    differences = euler_differences(euler_to_axis_angle(*generated), euler_to_axis_angle(*target))
    for axis, g, t in zip(("yaw", "pitch", "roll"), generated, target):
        assert differences[axis] == pytest.approx(g - t, abs=1e-9)


def test_wrap_degrees():
    assert wrap_degrees(190) == pytest.approx(-170)
    assert wrap_degrees(-181) == pytest.approx(179)
    assert euler_differences(euler_to_axis_angle(170, 0, 0), euler_to_axis_angle(-170, 0, 0))["yaw"] == pytest.approx(-20)


def test_kabsch_recovers_rotation_and_matches_svd_solution():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(60, 3))
    rotation = rodrigues(np.array([0.3, -0.5, 0.2]))
    moved = 2.5 * points @ rotation.T + [4.0, -1.0, 7.0] + rng.normal(scale=0.01, size=points.shape)
    ours = kabsch_rotation(points, moved)
    # Textbook Kabsch: SVD of the cross-covariance with the reflection fix.
    p, q = points - points.mean(0), moved - moved.mean(0)
    u, _, vt = np.linalg.svd(p.T @ q)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    direct = vt.T @ np.diag([1, 1, d]) @ u.T
    np.testing.assert_allclose(ours, direct, atol=1e-9)
    assert geodesic_angle_deg(ours, rotation) < 0.05
