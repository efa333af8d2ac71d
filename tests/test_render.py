"""Analytic checks of the DECA-convention renderer (normals, coverage, SH shading, camera)."""

import numpy as np
import pytest
import torch

from caphuman_bench.benchmark import HeadCondition
from caphuman_bench.render.head_condition import (
    HeadConditionRenderer,
    neutral_identity_code,
)
from caphuman_bench.render.renderer import (
    SH_CONSTANTS,
    MeshRenderer,
    orthographic_projection,
)


def _renderer_for(faces: np.ndarray) -> MeshRenderer:
    """A renderer whose UVs all point at the texture centre (the albedo is then the centre colour)."""
    faces = torch.as_tensor(faces, dtype=torch.long)
    return MeshRenderer(faces, torch.full((1, 2), 0.5), torch.zeros_like(faces))


def _render(vertices, faces, cam, light=None, albedo=0.5, size=256):
    light = torch.zeros(1, 9, 3) if light is None else torch.as_tensor(light, dtype=torch.float32)[None]
    albedo_map = torch.full((1, 3, 8, 8), float(albedo))
    verts = torch.as_tensor(vertices, dtype=torch.float32)[None]
    return _renderer_for(faces)(verts, torch.tensor([cam], dtype=torch.float32), albedo_map, light, size)


def _sphere(subdivisions=5):
    """Unit sphere from a subdivided octahedron (outward-facing triangles)."""
    verts = [np.array(v, float) for v in [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]]
    faces = [(0, 2, 4), (2, 1, 4), (1, 3, 4), (3, 0, 4), (2, 0, 5), (1, 2, 5), (3, 1, 5), (0, 3, 5)]
    for _ in range(subdivisions):
        midpoint, new_faces = {}, []

        def mid(a, b):
            key = (min(a, b), max(a, b))
            if key not in midpoint:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                midpoint[key] = len(verts) - 1
            return midpoint[key]

        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new_faces += [(a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca)]
        faces = new_faces
    return np.array(verts), np.array(faces)


def _pixel_world_xy(size, cam):
    """World (X, Y) seen by each pixel centre under DECA's orthographic camera."""
    s, tx, ty = cam
    centres = -1 + (2 * np.arange(size) + 1) / size
    x_img, y_img = np.meshgrid(centres, centres)
    return x_img / s - tx, -y_img / s - ty


def test_plane_facing_camera_has_normal_plus_z():
    vertices = np.array([[-0.5, -0.4, 0.1], [0.5, -0.4, 0.1], [0.5, 0.4, 0.1], [-0.5, 0.4, 0.1]])
    out = _render(vertices, [[0, 1, 2], [0, 2, 3]], cam=(1.2, 0.1, 0.0))
    mask = out.mask[0, 0].bool()
    assert mask.sum() > 0.25 * mask.numel()
    normals = out.normal[0].permute(1, 2, 0)[mask]
    torch.testing.assert_close(normals, torch.tensor([0.0, 0.0, 1.0]).expand_as(normals), atol=1e-6, rtol=0)
    assert out.normal[0][:, ~mask].abs().max() == 0


@pytest.fixture(scope="module")
def sphere_render():
    vertices, faces = _sphere()
    radius, cam, size = 0.8, (1.1, 0.05, -0.1), 256
    return _render(vertices * radius, faces, cam, size=size), radius, cam, size


def test_sphere_normals_match_analytic(sphere_render):
    out, radius, cam, size = sphere_render
    mask = out.mask[0, 0].bool().numpy()
    x, y = _pixel_world_xy(size, cam)
    z = np.sqrt(np.clip(radius**2 - x**2 - y**2, 0, None))
    analytic = np.stack([x, y, z], -1)[mask]
    rendered = out.normal[0].permute(1, 2, 0).numpy()[mask]
    cosine = (analytic * rendered).sum(1) / np.linalg.norm(analytic, axis=1) / np.linalg.norm(rendered, axis=1)
    mean_error_deg = np.degrees(np.arccos(np.clip(cosine, -1, 1))).mean()
    assert mean_error_deg < 1.0


def test_coverage_equals_projected_area(sphere_render):
    out, radius, cam, size = sphere_render
    radius_px = radius * cam[0] * size / 2
    covered = out.mask.sum().item()
    assert abs(covered - np.pi * radius_px**2) <= 2 * radius_px  # within one pixel row of the disk


def test_constant_albedo_under_dc_light_is_constant():
    vertices, faces = _sphere(3)
    dc = np.array([1.0, 2.0, 3.0])
    light = np.zeros((9, 3))
    light[0] = dc
    out = _render(vertices * 0.7, faces, (1.0, 0.0, 0.0), light=light, albedo=0.6)
    mask = out.mask[0, 0].bool()
    values = out.rendered[0][:, mask]
    expected = torch.tensor(0.6 * dc * SH_CONSTANTS[0], dtype=torch.float32)[:, None]
    torch.testing.assert_close(values, expected.expand_as(values), atol=1e-6, rtol=1e-6)
    assert out.rendered[0][:, ~mask].abs().max() == 0


def test_zero_pose_identity_camera_leaves_template_where_camera_says():
    renderer = HeadConditionRenderer.synthetic(device="cpu", seed=0)
    template = renderer.flame.v_template
    zero = renderer.flame(torch.zeros(1, 100), torch.zeros(1, 50), torch.zeros(1, 6))
    torch.testing.assert_close(zero[0], template, atol=1e-7, rtol=0)
    screen = orthographic_projection(zero, torch.tensor([[1.0, 0.0, 0.0]]))[0]
    torch.testing.assert_close(screen, zero[0] * torch.tensor([1.0, -1.0, -1.0]), atol=0, rtol=0)

    cam, size = np.array([6.0, 0.01, -0.02]), 512
    condition = HeadCondition("straight", "", 0.0, 0.0, 0.0, np.zeros(6), np.zeros(50), cam, neutral_identity_code()["light"])
    render = renderer.render(neutral_identity_code(), condition, mode="all", size=size)
    rows, cols = np.nonzero(render.mask[0])
    v = template.numpy().astype(np.float64)
    col = (cam[0] * (v[:, 0] + cam[1]) + 1) * size / 2 - 0.5  # pixel centres at integers
    row = (-cam[0] * (v[:, 1] + cam[2]) + 1) * size / 2 - 0.5
    assert abs(cols.min() - col.min()) <= 1 and abs(cols.max() - col.max()) <= 1
    assert abs(rows.min() - row.min()) <= 1 and abs(rows.max() - row.max()) <= 1
    assert render.hint.shape == (9, size, size) and render.hint.dtype == np.float32
