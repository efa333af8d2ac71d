"""The FLAME head model as a torch layer, with DECA's conventions.

FLAME (Li et al. 2017): template + shape and expression blendshapes + pose-corrective blendshapes,
then linear blend skinning over 5 joints (global/root, neck, jaw, left eye, right eye). DECA drives
it with 100 shape and 50 expression coefficients (`shapedirs[..., :100]` and
`shapedirs[..., 300:350]` of FLAME 2020) and a 6-vector pose: global axis-angle (3) and jaw
axis-angle (3); neck and eyes stay at zero (decalib/models/FLAME.py).

Coordinates: metres, x to the subject's left (image right), y up, z towards the camera.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from caphuman_bench.errors import BenchError
from caphuman_bench.render.flame_io import TextureSpace, load_flame_pickle

N_JOINTS = 5  # root, neck, jaw, left eye, right eye
FLAME_N_SHAPE_TOTAL = 300  # expression components start here in FLAME 2020's shapedirs


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, [..., 3] → [..., 3, 3].

    Like DECA's `batch_rodrigues`, the angle is the norm of (rotvec + 1e-8), so a zero vector maps
    to the identity exactly and small angles stay differentiable.
    """
    angle = torch.linalg.vector_norm(rotvec + 1e-8, dim=-1, keepdim=True)
    axis = rotvec / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*rotvec.shape[:-1], 3, 3)
    sin, cos = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + sin * skew + (1 - cos) * (skew @ skew)


def _rigid_transforms(rotations: torch.Tensor, joints: torch.Tensor, parents: list[int]) -> torch.Tensor:
    """World transforms of each joint relative to its rest position, [B, J, 4, 4].

    Joint j's local transform rotates about its rest location; chaining them along the kinematic
    tree and subtracting the rotated rest location gives the transform to apply to a vertex.
    """
    batch = rotations.shape[0]
    local_offsets = joints.clone()
    local_offsets[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = torch.zeros(batch, len(parents), 4, 4, dtype=joints.dtype, device=joints.device)
    local[:, :, :3, :3] = rotations
    local[:, :, :3, 3] = local_offsets
    local[:, :, 3, 3] = 1.0
    chain = [local[:, 0]]
    for j in range(1, len(parents)):
        chain.append(chain[parents[j]] @ local[:, j])
    world = torch.stack(chain, dim=1)
    rest = torch.einsum("bjik,bjk->bji", world[:, :, :3, :3], joints)
    world = world.clone()
    world[:, :, :3, 3] = world[:, :, :3, 3] - rest
    return world


class FLAME(nn.Module):
    """Vertices [B, V, 3] from DECA's shape [B, 100], expression [B, 50] and pose [B, 6] coefficients."""

    def __init__(self, model: dict[str, np.ndarray], n_shape: int = 100, n_exp: int = 50, source: str = "FLAME model"):
        super().__init__()
        v_template = np.asarray(model["v_template"], dtype=np.float32)
        n_verts = v_template.shape[0]
        expected = {
            "v_template": (n_verts, 3),
            "weights": (n_verts, N_JOINTS),
            "J_regressor": (N_JOINTS, n_verts),
            "kintree_table": (2, N_JOINTS),
            "posedirs": (n_verts, 3, 9 * (N_JOINTS - 1)),
        }
        for key, shape in expected.items():
            if tuple(np.shape(model[key])) != shape:
                raise BenchError(f"{source}: field {key!r} has shape {np.shape(model[key])}, expected {shape}")
        shapedirs = np.asarray(model["shapedirs"], dtype=np.float32)
        if shapedirs.ndim != 3 or shapedirs.shape[:2] != (n_verts, 3) or shapedirs.shape[2] < FLAME_N_SHAPE_TOTAL + n_exp:
            raise BenchError(
                f"{source}: field 'shapedirs' has shape {shapedirs.shape}, expected ({n_verts}, 3, ≥{FLAME_N_SHAPE_TOTAL + n_exp}) "
                f"(FLAME 2020: 300 shape then 100 expression components)"
            )
        faces = np.asarray(model["f"]).astype(np.int64)
        if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= n_verts:
            raise BenchError(f"{source}: field 'f' must be [F, 3] vertex indices below {n_verts}")
        parents = [int(p) for p in np.asarray(model["kintree_table"])[0]]
        parents[0] = -1  # FLAME stores the root's parent as 2**32 - 1
        if any(not 0 <= parents[j] < j for j in range(1, N_JOINTS)):
            raise BenchError(f"{source}: field 'kintree_table' must list each joint's parent before it")

        self.n_shape, self.n_exp, self.parents = n_shape, n_exp, parents
        blend = np.concatenate([shapedirs[:, :, :n_shape], shapedirs[:, :, FLAME_N_SHAPE_TOTAL:FLAME_N_SHAPE_TOTAL + n_exp]], axis=2)
        posedirs = np.asarray(model["posedirs"], dtype=np.float32).reshape(-1, 9 * (N_JOINTS - 1)).T
        self.register_buffer("v_template", torch.from_numpy(v_template))
        self.register_buffer("faces", torch.from_numpy(faces))
        self.register_buffer("shapedirs", torch.from_numpy(np.ascontiguousarray(blend)))  # [V, 3, n_shape + n_exp]
        self.register_buffer("posedirs", torch.from_numpy(np.ascontiguousarray(posedirs)))  # [36, V*3]
        self.register_buffer("J_regressor", torch.from_numpy(np.asarray(model["J_regressor"], dtype=np.float32)))
        self.register_buffer("lbs_weights", torch.from_numpy(np.asarray(model["weights"], dtype=np.float32)))

    @classmethod
    def from_file(cls, path: str | os.PathLike, n_shape: int = 100, n_exp: int = 50) -> "FLAME":
        return cls(load_flame_pickle(path), n_shape, n_exp, source=str(path))

    def forward(self, shape: torch.Tensor, exp: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        batch = shape.shape[0]
        if shape.shape != (batch, self.n_shape) or exp.shape != (batch, self.n_exp) or pose.shape != (batch, 6):
            raise BenchError(
                f"FLAME input shapes shape{tuple(shape.shape)} exp{tuple(exp.shape)} pose{tuple(pose.shape)}; "
                f"expected [B, {self.n_shape}], [B, {self.n_exp}], [B, 6]"
            )
        betas = torch.cat([shape, exp], dim=1)
        v_shaped = self.v_template + torch.einsum("bl,vkl->bvk", betas, self.shapedirs)
        joints = torch.einsum("jv,bvk->bjk", self.J_regressor, v_shaped)

        zeros3 = torch.zeros(batch, 3, dtype=pose.dtype, device=pose.device)
        full_pose = torch.stack([pose[:, :3], zeros3, pose[:, 3:], zeros3, zeros3], dim=1)  # root, neck, jaw, eyes
        rotations = axis_angle_to_matrix(full_pose)  # [B, 5, 3, 3]
        eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
        pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)
        v_posed = v_shaped + (pose_feature @ self.posedirs).reshape(batch, -1, 3)

        transforms = _rigid_transforms(rotations, joints, self.parents)  # [B, J, 4, 4]
        per_vertex = torch.einsum("vj,bjik->bvik", self.lbs_weights, transforms)
        return torch.einsum("bvik,bvk->bvi", per_vertex[..., :3, :3], v_posed) + per_vertex[..., :3, 3]


class FlameTexture(nn.Module):
    """FLAME's albedo model as DECA's `FLAMETex`: mean + basis · tex, reshaped to the square texture,
    resized (nearest) to `uv_size`, BGR → RGB. Output [B, 3, uv_size, uv_size], about [0, 1]."""

    def __init__(self, space: TextureSpace, uv_size: int = 256):
        super().__init__()
        self.side, self.uv_size = space.side, uv_size
        self.register_buffer("mean", torch.from_numpy(space.mean))
        self.register_buffer("basis", torch.from_numpy(space.basis))

    @property
    def n_tex(self) -> int:
        return self.basis.shape[1]

    def forward(self, tex: torch.Tensor) -> torch.Tensor:
        flat = self.mean + tex @ self.basis.T  # [B, side*side*3]
        texture = flat.reshape(-1, self.side, self.side, 3).permute(0, 3, 1, 2)
        texture = nn.functional.interpolate(texture, size=(self.uv_size, self.uv_size), mode="nearest")
        return texture[:, [2, 1, 0]]
