"""DECA's coarse renderer (decalib/utils/renderer.py, `SRenderY.forward` with SH light): orthographic
camera, interpolated world-space vertex normals, UV albedo, Lambertian shading from 9-band
spherical harmonics.

What CapHuman feeds its CapFace branch is exactly these three images (`normal_images`,
`albedo_images`, `rendered_images`), each multiplied by the coverage mask, nothing clamped or
rescaled: normals in [-1, 1], albedo about [0, 1], rendered = albedo × shading (can exceed 1 under
strong light, as in DECA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caphuman_bench.render.rasterizer import Fragments, interpolate, rasterize

# DECA's constant factors of the 9 SH basis functions (1, x, y, z, xy, xz, yz, x²−y², 3z²−1),
# which fold in the Lambertian convolution (π, 2π/3, π/4 per band).
SH_CONSTANTS = (
    1 / np.sqrt(4 * np.pi),
    (2 * np.pi / 3) * np.sqrt(3 / (4 * np.pi)),
    (2 * np.pi / 3) * np.sqrt(3 / (4 * np.pi)),
    (2 * np.pi / 3) * np.sqrt(3 / (4 * np.pi)),
    (np.pi / 4) * 3 * np.sqrt(5 / (12 * np.pi)),
    (np.pi / 4) * 3 * np.sqrt(5 / (12 * np.pi)),
    (np.pi / 4) * 3 * np.sqrt(5 / (12 * np.pi)),
    (np.pi / 4) * (3 / 2) * np.sqrt(5 / (12 * np.pi)),
    (np.pi / 4) * (1 / 2) * np.sqrt(5 / (4 * np.pi)),
)


def orthographic_projection(vertices: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """DECA's `batch_orth_proj` then its y/z flip: world [B, V, 3] → screen (x right, y down, z away
    from the camera), x' = s·(X + tx), y' = −s·(Y + ty), z' = −s·Z. cam [B, 3] = (s, tx, ty)."""
    scale, shift = cam[:, None, :1], cam[:, None, 1:]
    xy = scale * (vertices[..., :2] + shift)
    z = scale * vertices[..., 2:]
    return torch.cat([xy[..., :1], -xy[..., 1:], -z], dim=-1)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals [B, V, 3] (counter-clockwise faces seen from outside point out)."""
    corners = vertices[:, faces]  # [B, F, 3, 3]
    face_normals = torch.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0], dim=-1)
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals.index_add_(1, faces[:, k], face_normals)
    return F.normalize(normals, dim=-1, eps=1e-6)


def sh_shading(normal_images: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """DECA's `add_SHlight`: normals [B, 3, H, W], light [B, 9, 3] → shading [B, 3, H, W], unclamped."""
    x, y, z = normal_images.unbind(1)
    basis = torch.stack([torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1], dim=1)
    basis = basis * torch.tensor(SH_CONSTANTS, dtype=basis.dtype, device=basis.device)[None, :, None, None]
    return torch.einsum("bkhw,bkc->bchw", basis, light)


@dataclass
class RenderOutput:
    normal: torch.Tensor  # [B, 3, H, W] in [-1, 1], zero outside the mask
    albedo: torch.Tensor  # [B, 3, H, W]
    rendered: torch.Tensor  # [B, 3, H, W] albedo × SH shading
    mask: torch.Tensor  # [B, 1, H, W] float 0/1
    fragments: Fragments


class MeshRenderer(nn.Module):
    """Renders a mesh of fixed topology with a UV-mapped albedo texture."""

    def __init__(self, faces: torch.Tensor, uv: torch.Tensor, uv_faces: torch.Tensor):
        super().__init__()
        if uv_faces.shape != faces.shape:
            raise ValueError(f"uv faces {tuple(uv_faces.shape)} and mesh faces {tuple(faces.shape)} differ")
        grid_uv = torch.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2], dim=-1)  # v up → grid y down, as DECA
        self.register_buffer("faces", faces.long())
        self.register_buffer("face_uv", grid_uv[uv_faces.long()].float())  # [F, 3, 2]

    def forward(self, vertices: torch.Tensor, cam: torch.Tensor, albedo_map: torch.Tensor, light: torch.Tensor,
                size: int = 512, frame: torch.Tensor | None = None) -> RenderOutput:
        """vertices [B, V, 3] (world), cam [B, 3], albedo_map [B, 3, h, w], light [B, 9, 3].

        `frame` [B, 3, 3] (optional): an affine map of the projected x, y (DECA's crop frame, [-1, 1])
        into the output image's frame, as DECA's `decode(render_orig=True)` moves `trans_verts` through
        `transform_points` before rasterising; z is kept. Normals and shading use world space either way."""
        batch = vertices.shape[0]
        screen = orthographic_projection(vertices, cam)
        if frame is not None:
            frame = frame.to(screen.dtype)
            xy = torch.einsum("bij,bvj->bvi", frame[:, :2, :2], screen[..., :2]) + frame[:, None, :2, 2]
            screen = torch.cat([xy, screen[..., 2:]], dim=-1)
        fragments = rasterize(screen, self.faces, size)
        mask = fragments.mask[:, None].to(vertices.dtype)

        normals = vertex_normals(vertices, self.faces)[:, self.faces]  # [B, F, 3, 3]
        uv = self.face_uv.expand(batch, -1, -1, -1)
        normal_image = interpolate(fragments, normals)
        uv_image = interpolate(fragments, uv)
        albedo = F.grid_sample(albedo_map, uv_image.permute(0, 2, 3, 1), mode="bilinear", align_corners=False) * mask
        rendered = albedo * sh_shading(normal_image, light) * mask
        return RenderOutput(normal_image, albedo, rendered, mask, fragments)
