"""Triangle rasterization: per-pixel face index, barycentric coordinates and depth.

pytorch3d's `rasterize_meshes` (what DECA and CapHuman use) is taken when it is importable. PyPI has
no Linux build of pytorch3d at all and a source build takes over half an hour on two cores, so
otherwise a vectorised torch rasterizer of our own does the same job: every (triangle, pixel) pair
inside the triangle's pixel bounding box is enumerated at once (in chunks), tested with
barycentric coordinates (affine in the pixel position, precomputed per triangle), and the nearest
one per pixel wins a z-buffer reduction. It runs on CPU or CUDA, with a batch of meshes sharing
one face list. A FLAME-sized head (≈10k triangles) at 512 × 512 takes under a second on two CPU
cores.

Screen convention (DECA's image space): x to the right and y downwards, both in [-1, 1] across the
image; pixel i's centre is at -1 + (2i + 1) / size; smaller z is nearer the camera. Barycentrics
are screen-space (orthographic rendering, as DECA's `perspective_correct=False`). No back-face
culling, as in DECA. Ties in depth go to the lower face index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_PAIRS_PER_CHUNK = 1 << 21  # (triangle, pixel) candidates tested at once: bounds memory (~0.2 GB)
EDGE_TOLERANCE = 1e-5  # a pixel centre on a shared edge belongs to both triangles, never to neither


@dataclass
class Fragments:
    face: torch.Tensor  # [B, H, W] long, index into the face list, -1 where no triangle covers the pixel
    bary: torch.Tensor  # [B, H, W, 3] barycentric weights of the face's three vertices (0 where uncovered)
    depth: torch.Tensor  # [B, H, W] interpolated z (+inf where uncovered)

    @property
    def mask(self) -> torch.Tensor:
        return self.face >= 0


def _pytorch3d_rasterize():
    try:
        from pytorch3d.renderer.mesh import rasterize_meshes
        from pytorch3d.structures import Meshes
    except ImportError:
        return None
    return rasterize_meshes, Meshes


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, height: int, width: int | None = None,
              use_pytorch3d: bool | None = None) -> Fragments:
    """vertices [B, V, 3] in screen space (see module docstring), faces [F, 3] → Fragments.

    `use_pytorch3d=None` takes pytorch3d when importable; False forces the torch rasterizer.
    """
    width = width or height
    found = _pytorch3d_rasterize() if use_pytorch3d is not False else None
    if use_pytorch3d and found is None:
        raise ImportError("pytorch3d is not installed")
    if found is not None and height == width:
        return _rasterize_pytorch3d(vertices, faces, height, *found)
    return _rasterize_torch(vertices, faces, height, width)


def _rasterize_pytorch3d(vertices, faces, size, rasterize_meshes, Meshes) -> Fragments:
    """pytorch3d's NDC has +x left and +y up (DECA negates x, y before calling it); z is shifted by
    +10 as DECA does, because pytorch3d drops faces behind z = 0."""
    batch, n_faces = vertices.shape[0], faces.shape[0]
    p3d = torch.cat([-vertices[..., :2], vertices[..., 2:] + 10.0], dim=-1).float()
    meshes = Meshes(verts=list(p3d), faces=[faces.long()] * batch)
    pix_to_face, zbuf, bary, _ = rasterize_meshes(meshes, image_size=size, blur_radius=0.0, faces_per_pixel=1,
                                                  bin_size=None, max_faces_per_bin=None, perspective_correct=False)
    face = pix_to_face[..., 0]
    covered = face >= 0
    offset = torch.arange(batch, device=face.device).view(-1, 1, 1) * n_faces  # packed → per-mesh index
    face = torch.where(covered, face - offset, face)
    depth = torch.where(covered, zbuf[..., 0] - 10.0, torch.full_like(zbuf[..., 0], float("inf")))
    return Fragments(face, bary[..., 0, :] * covered[..., None], depth)


def _rasterize_torch(vertices: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> Fragments:
    device = vertices.device
    batch, n_faces = vertices.shape[0], faces.shape[0]
    # Continuous pixel coordinates: pixel centres at integers.
    px = (vertices[..., 0].float() + 1) * width / 2 - 0.5
    py = (vertices[..., 1].float() + 1) * height / 2 - 0.5
    pz = vertices[..., 2].float()
    tri = torch.stack([px, py, pz], dim=-1)[:, faces]  # [B, F, 3 vertices, 3 coords]
    tri = tri.reshape(batch * n_faces, 3, 3)

    x0 = tri[:, :, 0].amin(1).ceil().clamp(0, width).long()
    x1 = tri[:, :, 0].amax(1).floor().clamp(-1, width - 1).long()
    y0 = tri[:, :, 1].amin(1).ceil().clamp(0, height).long()
    y1 = tri[:, :, 1].amax(1).floor().clamp(-1, height - 1).long()
    box_w, box_h = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    planes, valid = _linear_forms(tri)
    pairs = box_w * box_h * valid
    live = torch.nonzero(pairs > 0).squeeze(1)

    best_depth = torch.full((batch * height * width,), float("inf"), device=device)
    best_face = torch.full((batch * height * width,), -1, dtype=torch.long, device=device)
    for chunk in _chunks_by_total(live, pairs[live], MAX_PAIRS_PER_CHUNK):
        counts = pairs[chunk]
        owner = torch.repeat_interleave(chunk, counts)  # triangle (over batch × faces) of each candidate
        start = torch.cumsum(counts, 0) - counts
        local = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(start, counts)
        row = torch.div(local, box_w[owner], rounding_mode="floor")
        cx = x0[owner] + local - row * box_w[owner]
        cy = y0[owner] + row
        w0, w1, depth = _evaluate(planes[owner], cx, cy).unbind(1)
        inside = (w0 >= -EDGE_TOLERANCE) & (w1 >= -EDGE_TOLERANCE) & (w0 + w1 <= 1 + EDGE_TOLERANCE)
        owner, depth = owner[inside], depth[inside]
        b = torch.div(owner, n_faces, rounding_mode="floor")
        pixel = (b * height + cy[inside]) * width + cx[inside]
        chunk_depth = torch.full_like(best_depth, float("inf")).scatter_reduce(0, pixel, depth, "amin")
        winner = depth == chunk_depth[pixel]
        chunk_face = torch.full_like(best_face, torch.iinfo(torch.long).max)
        chunk_face = chunk_face.scatter_reduce(0, pixel[winner], owner[winner] % n_faces, "amin")
        better = chunk_depth < best_depth
        best_depth = torch.where(better, chunk_depth, best_depth)
        best_face = torch.where(better, chunk_face, best_face)

    face = best_face.view(batch, height, width)
    covered = face >= 0
    bary = torch.zeros(batch, height, width, 3, device=device)
    if covered.any():
        b_idx, y_idx, x_idx = torch.nonzero(covered, as_tuple=True)
        w0, w1, _ = _evaluate(planes[b_idx * n_faces + face[covered]], x_idx, y_idx).unbind(1)
        bary[covered] = torch.stack([w0, w1, 1 - w0 - w1], dim=1)
    return Fragments(face, bary, best_depth.view(batch, height, width))


def _linear_forms(tri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per triangle [T, 3 vertices, (x, y, z)]: the affine maps (x, y) → (w0, w1, z) as [T, 3, 3]
    rows (a, b, c) of a·x + b·y + c, and whether the triangle has a non-zero screen area."""
    ones = torch.ones_like(tri[:, :, :1])
    corners = torch.cat([tri[:, :, :2], ones], dim=2)  # rows (x_k, y_k, 1)
    area2 = torch.linalg.det(corners.double())
    valid = area2.abs() > 1e-9
    safe = torch.where(valid[:, None, None], corners.double(), torch.eye(3, dtype=torch.float64, device=tri.device))
    # Barycentric weights are the solution of corners^T · w = (x, y, 1): w = inv(corners^T) · (x, y, 1).
    to_bary = torch.linalg.inv(safe.transpose(1, 2))  # [T, 3 weights, 3 (x, y, 1)]
    depth = torch.einsum("tk,tkj->tj", tri[:, :, 2].double(), to_bary)  # z = Σ w_k z_k, affine in (x, y)
    forms = torch.stack([to_bary[:, 0], to_bary[:, 1], depth], dim=1).float()
    return forms, valid


def _evaluate(forms: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """forms [N, 3, 3] at pixel (x, y) [N] → [N, 3] (w0, w1, z)."""
    return forms[:, :, 0] * x[:, None] + forms[:, :, 1] * y[:, None] + forms[:, :, 2]


def _chunks_by_total(items: torch.Tensor, sizes: torch.Tensor, limit: int):
    """Split `items` into consecutive runs whose `sizes` sum to at most `limit` (a single larger item
    forms its own run)."""
    ends = torch.cumsum(sizes, 0)
    start = 0
    while start < items.numel():
        used = int(ends[start - 1]) if start else 0
        stop = max(int(torch.searchsorted(ends, used + limit, right=True)), start + 1)
        yield items[start:stop]
        start = stop


def interpolate(fragments: Fragments, face_attributes: torch.Tensor) -> torch.Tensor:
    """Per-face-vertex attributes [B, F, 3, D] → image [B, D, H, W] (zero where uncovered)."""
    batch, height, width = fragments.face.shape
    n_faces, dim = face_attributes.shape[1], face_attributes.shape[-1]
    index = fragments.face.clamp(min=0) + torch.arange(batch, device=fragments.face.device).view(-1, 1, 1) * n_faces
    corners = face_attributes.reshape(batch * n_faces, 3, dim)[index.view(-1)].view(batch, height, width, 3, dim)
    values = (fragments.bary[..., None] * corners).sum(dim=3)
    values = values * fragments.mask[..., None]
    return values.permute(0, 3, 1, 2)
