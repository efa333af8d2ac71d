"""The arithmetic of head control: coefficient RMSE per DECA group, rotation distances, Kabsch.

Kept apart from the metrics so it can be tested against direct numpy formulas. Rotations are
axis-angle vectors (DECA / FLAME global pose) or 3 × 3 matrices in the FLAME camera frame
(x right, y up, z towards the camera); Euler angles follow `caphuman_bench.benchmark`'s
`euler_to_axis_angle` convention (R = R_y(yaw) · R_x(pitch) · R_z(roll), degrees).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from caphuman_bench.benchmark import axis_angle_to_euler

# DECA coefficient groups the head-control metric compares, with their sizes (d_g).
RMSE_GROUPS: dict[str, int] = {"shape": 100, "pose": 6, "exp": 50, "light": 27}


def coefficient_rmse(generated: np.ndarray, target: np.ndarray) -> float:
    """sqrt(‖c_gen − c_target‖² / d) for one image; the metric averages this over images."""
    generated = np.asarray(generated, dtype=np.float64).reshape(-1)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    if generated.shape != target.shape:
        raise ValueError(f"coefficient sizes differ: generated {generated.size}, target {target.size}")
    return float(np.sqrt(np.mean((generated - target) ** 2)))


def as_rotation(rotation: np.ndarray | Rotation) -> Rotation:
    """An axis-angle vector [3] or a matrix [3, 3] as a scipy Rotation."""
    if isinstance(rotation, Rotation):
        return rotation
    rotation = np.asarray(rotation, dtype=np.float64)
    return Rotation.from_matrix(rotation) if rotation.shape == (3, 3) else Rotation.from_rotvec(rotation.reshape(3))


def geodesic_angle_deg(rotation_a, rotation_b) -> float:
    """Angle in degrees of the rotation taking b to a: |log(R_a R_bᵀ)|, in [0, 180]."""
    return float(np.degrees((as_rotation(rotation_a) * as_rotation(rotation_b).inv()).magnitude()))


def wrap_degrees(angle: float) -> float:
    """An angle difference folded into [-180, 180)."""
    return float((angle + 180.0) % 360.0 - 180.0)


def euler_differences(rotation_generated, rotation_target) -> dict[str, float]:
    """Signed yaw / pitch / roll differences (generated − target, degrees, wrapped)."""
    generated = axis_angle_to_euler(as_rotation(rotation_generated).as_rotvec())
    target = axis_angle_to_euler(as_rotation(rotation_target).as_rotvec())
    return {axis: wrap_degrees(g - t) for axis, g, t in zip(("yaw", "pitch", "roll"), generated, target)}


def pose_errors(rotation_generated, rotation_target) -> dict[str, float]:
    """The reported pose numbers: geodesic angle and absolute per-axis differences, degrees."""
    differences = euler_differences(rotation_generated, rotation_target)
    return {
        "pose_error_deg": geodesic_angle_deg(rotation_generated, rotation_target),
        **{f"{axis}_error_deg": abs(value) for axis, value in differences.items()},
    }


def kabsch_rotation(source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The rotation R [3, 3] that best maps centred `source` points onto centred `target` ones.

    Least squares over R of Σ w_i ‖(t_i − t̄) − R (s_i − s̄)‖² (Kabsch; solved by scipy's
    `Rotation.align_vectors`, an SVD). Uniform scale does not change the optimal R, so two
    faces of different sizes in the image align without a scale term.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 3:
        raise ValueError(f"need two [N, 3] point sets of equal size, got {source.shape} and {target.shape}")
    rotation, _ = Rotation.align_vectors(target - target.mean(0), source - source.mean(0), weights=weights)
    return rotation.as_matrix()
