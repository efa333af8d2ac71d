"""A synthetic FLAME-format head, generated in code, for tests and the smoke preset (no FLAME files
can be shipped: they need registration).

Same fields, shapes conventions and dtypes as FLAME 2020's `generic_model.pkl` (5 joints, 400
shape+expression components with expressions from index 300, 36 pose correctives, sparse
J_regressor, FLAME's kintree), but a small head-like closed mesh: a latitude/longitude ellipsoid
with nose, eye sockets, ears and a narrower jaw. Blendshapes and texture components are smooth
random fields. `write_synthetic_flame` writes the three files the way the real ones are written
(the pickle at protocol 2 with `chumpy.ch.Ch` and `scipy.sparse.csc.csc_matrix` class paths), so the
loaders in `flame_io` see what they would see on a user's machine.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse import csc_matrix

from caphuman_bench.render.flame_io import TextureSpace, UVLayout

HEAD_RADII = np.array([0.075, 0.105, 0.092])  # metres: half width, half height, half depth
EYE_CENTRES = np.array([[0.031, 0.022], [-0.031, 0.022]])  # (x, y) of the subject's left, right eye
MOUTH_Y = -0.05


def _synthetic_landmarks_xy() -> np.ndarray:
    """The 68 iBUG landmarks of the synthetic face as frontal (x, y) in metres, in iBUG order (x < 0 is
    the subject's right = the image's left), laid on its features: eyes at EYE_CENTRES, nose tip at the
    nose bump, mouth at MOUTH_Y, jaw along the lower face."""
    angles = np.linspace(-np.pi / 2, np.pi / 2, 17)
    jaw = np.c_[0.066 * np.sin(angles), 0.01 - 0.085 * np.cos(angles)]
    brow_x = np.linspace(-0.016, 0.016, 5)
    (lx, ly), (rx, ry) = EYE_CENTRES  # subject's left (x > 0), right
    brows = [np.c_[rx + brow_x, np.full(5, ry + 0.018)], np.c_[lx + brow_x, np.full(5, ly + 0.018)]]
    nose = [np.c_[np.zeros(4), np.linspace(0.025, -0.005, 4)], np.c_[np.linspace(-0.012, 0.012, 5), np.full(5, -0.018)]]
    # each eye from its outer corner (right eye) / inner corner (left eye), over the top, back along the bottom
    ring = np.array([[-0.011, 0], [-0.004, 0.004], [0.004, 0.004], [0.011, 0], [0.004, -0.004], [-0.004, -0.004]])
    eyes = [ring + (rx, ry), ring + (lx, ly)]
    outer = [[-0.022, 0], [-0.014, 0.006], [-0.006, 0.008], [0, 0.007], [0.006, 0.008], [0.014, 0.006],
             [0.022, 0], [0.014, -0.007], [0.006, -0.009], [0, -0.010], [-0.006, -0.009], [-0.014, -0.007]]
    inner = [[-0.016, 0], [-0.006, 0.003], [0, 0.003], [0.006, 0.003], [0.016, 0], [0.006, -0.003], [0, -0.003],
             [-0.006, -0.003]]
    lips = [np.array(outer) + (0, MOUTH_Y), np.array(inner) + (0, MOUTH_Y)]
    return np.concatenate([jaw, *brows, *nose, *eyes, *lips])


def frontal_embedding(vertices: np.ndarray, faces: np.ndarray, points_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lift frontal (x, y) points onto the front of a mesh: for each, the nearest-to-camera (largest z)
    face whose (x, y) projection contains it, and its barycentric weights there → (faces [N], bary [N, 3])."""
    corners = vertices[faces]  # [F, 3, 3]
    a, b, c = corners[:, 0, :2], corners[:, 1, :2], corners[:, 2, :2]
    det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    ok = np.abs(det) > 1e-12
    out_faces, out_bary = [], []
    for point in points_xy:
        d = point - a
        with np.errstate(divide="ignore", invalid="ignore"):
            w1 = (d[:, 0] * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * d[:, 1]) / det
            w2 = ((b[:, 0] - a[:, 0]) * d[:, 1] - d[:, 0] * (b[:, 1] - a[:, 1])) / det
        weights = np.stack([1 - w1 - w2, w1, w2], 1)
        inside = ok & np.all(weights >= -1e-9, axis=1)
        if not inside.any():
            raise ValueError(f"point {point.tolist()} is not in front of the mesh")
        depth = np.where(inside, np.einsum("fk,fk->f", weights, corners[:, :, 2]), -np.inf)
        face = int(np.argmax(depth))
        out_faces.append(face)
        out_bary.append(weights[face])
    return np.array(out_faces, dtype=np.int64), np.array(out_bary, dtype=np.float32)


@dataclass
class SyntheticFlame:
    model: dict  # FLAME fields, plain numpy (shapedirs as an array, J_regressor as a csc_matrix)
    texture_mean: np.ndarray  # [side*side*3] 0–255, BGR, like FLAME_texture.npz 'mean'
    texture_dirs: np.ndarray  # [side*side*3, n] like 'tex_dir'
    uv: UVLayout

    def flame_arrays(self) -> dict[str, np.ndarray]:
        """The model as the loader returns it (all dense numpy)."""
        return {k: (v.toarray() if isinstance(v, csc_matrix) else v) for k, v in self.model.items()}

    def landmark_embedding(self) -> tuple[np.ndarray, np.ndarray]:
        """The 68 landmarks' (faces [68], barycentrics [68, 3]) on this mesh, as DECA's
        `full_lmk_faces_idx` / `full_lmk_bary_coords` place them on FLAME's."""
        return frontal_embedding(self.model["v_template"], self.model["f"].astype(np.int64), _synthetic_landmarks_xy())

    def texture_space(self, n_tex: int = 50) -> TextureSpace:
        side = int(round((self.texture_mean.size / 3) ** 0.5))
        return TextureSpace((self.texture_mean / 255.0).astype(np.float32),
                            (self.texture_dirs[:, :n_tex] / 255.0).astype(np.float32), side)


def _direction(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Unit vector at polar angle θ from +y and azimuth φ, with φ = 0 (the texture seam) at the back."""
    return np.stack([-np.sin(theta) * np.sin(phi), np.cos(theta), -np.sin(theta) * np.cos(phi)], -1)


def _sphere_grid(n_lat: int, n_lon: int):
    """Unit directions, faces and uv of a latitude-longitude sphere around the y axis."""
    theta = np.pi * np.arange(1, n_lat) / n_lat
    phi = 2 * np.pi * np.arange(n_lon) / n_lon
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = _direction(t, p).reshape(-1, 3)
    dirs = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]])
    south = len(dirs) - 1

    def vid(i, j):  # ring i in 0..n_lat-2, column j (wraps)
        return 1 + i * n_lon + j % n_lon

    # Texture coordinates: ring vertices get n_lon + 1 columns (the seam is duplicated), poles one per face.
    def tid(i, j):
        return i * (n_lon + 1) + j

    n_ring_uv = (n_lat - 1) * (n_lon + 1)
    ring_u, ring_v = np.meshgrid(np.arange(n_lon + 1) / n_lon, 1 - theta / np.pi)  # [n_lat-1, n_lon+1]
    uv = [np.stack([ring_u, ring_v], -1).reshape(-1, 2)]
    uv.append(np.stack([(np.arange(n_lon) + 0.5) / n_lon, np.ones(n_lon)], -1))  # north pole, one per face
    uv.append(np.stack([(np.arange(n_lon) + 0.5) / n_lon, np.zeros(n_lon)], -1))  # south pole
    faces, uv_faces = [], []
    for j in range(n_lon):
        faces.append([0, vid(0, j), vid(0, j + 1)])
        uv_faces.append([n_ring_uv + j, tid(0, j), tid(0, j + 1)])
        last = n_lat - 2
        faces.append([south, vid(last, j + 1), vid(last, j)])
        uv_faces.append([n_ring_uv + n_lon + j, tid(last, j + 1), tid(last, j)])
        for i in range(n_lat - 2):
            faces += [[vid(i, j), vid(i + 1, j), vid(i + 1, j + 1)], [vid(i, j), vid(i + 1, j + 1), vid(i, j + 1)]]
            uv_faces += [[tid(i, j), tid(i + 1, j), tid(i + 1, j + 1)], [tid(i, j), tid(i + 1, j + 1), tid(i, j + 1)]]
    return dirs, np.array(faces), np.concatenate(uv), np.array(uv_faces)


def _gauss(points: np.ndarray, centre, sigma: float) -> np.ndarray:
    return np.exp(-((points - np.asarray(centre)) ** 2).sum(-1) / (2 * sigma**2))


def _head_surface(dirs: np.ndarray) -> np.ndarray:
    """Directions → points of a head-like surface (radial displacements of an ellipsoid)."""
    base = dirs * HEAD_RADII
    x, y, z = base.T
    front = np.clip(dirs[:, 2], 0, None)
    lower = np.clip(-y / HEAD_RADII[1], 0, None)
    radial = np.ones(len(dirs))
    radial *= 1 - 0.18 * lower**2 * (1 - 0.5 * front)  # narrower jaw and neck
    radial += front * 0.28 * _gauss(np.c_[x / 0.6, y], (0, -0.005), 0.022)  # nose
    for ex, ey in EYE_CENTRES:
        radial -= front * 0.09 * _gauss(np.c_[x, y], (ex, ey), 0.011)  # eye sockets
    radial += 0.12 * np.abs(dirs[:, 0]) ** 8 * _gauss(np.c_[y, z], (0.0, -0.01), 0.02)  # ears
    radial += front * 0.05 * _gauss(np.c_[x, y], (0, 0.04), 0.025)  # brow
    return base * radial[:, None]


def _smooth_fields(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random smooth scalar fields over `points` [N, 3] → [N, count] (unit-ish amplitude)."""
    p = points / HEAD_RADII
    features = np.concatenate([np.ones((len(p), 1)), p, p**2, p[:, [0]] * p[:, [1]], p[:, [1]] * p[:, [2]],
                               np.sin(3 * p), np.cos(3 * p)], axis=1)
    return features @ rng.normal(size=(features.shape[1], count)) / np.sqrt(features.shape[1])


def _skinning(vertices: np.ndarray) -> np.ndarray:
    """[V, 5] weights: root (neck base), neck (head), jaw (below the mouth, front), left eye, right eye."""
    x, y, z = vertices.T
    root = 1 / (1 + np.exp((y + 0.085) / 0.006))
    jaw = (1 / (1 + np.exp((y - MOUTH_Y + 0.004) / 0.004))) * (1 / (1 + np.exp(-(z - 0.01) / 0.01))) * (1 - root)
    eyes = [_gauss(np.c_[x, y], centre, 0.006) * (z > 0.03) for centre in EYE_CENTRES]
    weights = np.stack([root, np.zeros_like(x), jaw, *eyes], 1)
    weights[:, 1] = np.clip(1 - weights.sum(1), 0, None)
    return weights / weights.sum(1, keepdims=True)


def _joint_regressor(vertices: np.ndarray, n_lat: int, n_lon: int) -> csc_matrix:
    """Each joint = mean of a vertex set: rings (root, neck, jaw) or the 4 vertices nearest an eye."""
    rows = []
    ring_of = lambda i: 1 + i * n_lon + np.arange(n_lon)  # noqa: E731 — ring i's vertex ids
    for ring in (n_lat - 4, n_lat - 7, int(n_lat * 0.62)):
        rows.append(ring_of(ring))
    for ex, ey in EYE_CENTRES:
        d = (vertices[:, 0] - ex) ** 2 + (vertices[:, 1] - ey) ** 2 + 10 * (vertices[:, 2] < 0)
        rows.append(np.argsort(d)[:4])
    dense = np.zeros((len(rows), len(vertices)))
    for j, ids in enumerate(rows):
        dense[j, ids] = 1 / len(ids)
    return csc_matrix(dense)


def _texture(side: int, n_components: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A skin-coloured UV texture with hair, brows, eyes and lips (0–255, stored BGR like FLAME's)."""
    v, u = np.meshgrid(1 - (np.arange(side) + 0.5) / side, (np.arange(side) + 0.5) / side, indexing="ij")
    theta, phi = np.pi * (1 - v), 2 * np.pi * u
    p = _head_surface(_direction(theta, phi).reshape(-1, 3))
    x, y, z = p.T
    rgb = np.tile([224.0, 172.0, 140.0], (len(p), 1))
    hair = (y > 0.07 - 0.05 * np.clip(-z / 0.09, 0, 1)) | ((z < -0.03) & (y > -0.04))
    rgb[hair] = [70, 45, 30]
    for ex, ey in EYE_CENTRES:
        brow = (np.abs(y - ey - 0.018) < 0.004) & (np.abs(x - ex) < 0.016) & (z > 0)
        eye = _gauss(np.c_[x, y], (ex, ey), 0.006) * (z > 0)
        rgb[brow] = [60, 40, 30]
        rgb = rgb * (1 - eye[:, None]) + np.array([240, 240, 235]) * eye[:, None]
        iris = _gauss(np.c_[x, y], (ex, ey), 0.0025) * (z > 0)
        rgb = rgb * (1 - iris[:, None]) + np.array([60, 80, 110]) * iris[:, None]
    lips = _gauss(np.c_[x / 2.2, y], (0, MOUTH_Y), 0.006) * (z > 0)
    rgb = rgb * (1 - lips[:, None]) + np.array([180, 80, 80]) * lips[:, None]
    bgr = rgb[:, ::-1].reshape(-1)
    fields = _smooth_fields(np.repeat(p, 3, axis=0), n_components, rng)
    return bgr, 12.0 * fields


def synthetic_flame(seed: int = 0, n_lat: int = 32, n_lon: int = 48, texture_side: int = 64) -> SyntheticFlame:
    """A FLAME-format head with about n_lat·n_lon vertices (default ≈1.5k vertices, ≈3k faces)."""
    rng = np.random.default_rng(seed)
    dirs, faces, uv, uv_faces = _sphere_grid(n_lat, n_lon)
    template = _head_surface(dirs)
    n_verts = len(template)
    normal = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)

    shape_fields = 0.004 * _smooth_fields(template, 300, rng)
    exp_region = np.clip(template[:, 2] / HEAD_RADII[2], 0, 1) * np.exp(-((template[:, 1] - MOUTH_Y) / 0.04) ** 2)
    exp_fields = 0.006 * _smooth_fields(template, 100, rng) * exp_region[:, None]
    shapedirs = np.concatenate([shape_fields, exp_fields], 1)[:, None, :] * normal[:, :, None]  # [V, 3, 400]

    pose_region = np.exp(-((template[:, 1] + 0.08) / 0.03) ** 2) + exp_region
    posedirs = 0.002 * rng.normal(size=(n_verts, 3, 36)) * pose_region[:, None, None]
    weights = _skinning(template)
    regressor = _joint_regressor(template, n_lat, n_lon)
    model = {
        "f": faces.astype(np.uint32),
        "v_template": template,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": regressor,
        "J": regressor @ template,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": weights,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    mean, dirs_tex = _texture(texture_side, 60, rng)
    return SyntheticFlame(model, mean, dirs_tex, UVLayout(uv.astype(np.float32), uv_faces.astype(np.int64)))


class _Ch:
    """Written as `chumpy.ch.Ch` with state {'x': array}, which is how chumpy pickles a plain array."""

    def __init__(self, x: np.ndarray):
        self.x = x


class _FlamePickler(pickle._Pickler):
    """Names the stand-in and scipy's matrix by the module paths of FLAME's Python-2 era file."""

    GLOBALS = {_Ch: b"chumpy.ch\nCh\n", csc_matrix: b"scipy.sparse.csc\ncsc_matrix\n"}

    def save_global(self, obj, name=None):
        if obj in self.GLOBALS:
            self.write(pickle.GLOBAL + self.GLOBALS[obj])
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def flame_pickle_bytes(model: dict) -> bytes:
    buffer = io.BytesIO()
    _FlamePickler(buffer, protocol=2).dump({**model, "shapedirs": _Ch(model["shapedirs"])})
    return buffer.getvalue()


def write_synthetic_flame(folder: str | Path, seed: int = 0, **sizes) -> tuple[Path, Path, Path]:
    """Write generic_model.pkl, FLAME_texture.npz and head_template.obj; return their paths.

    `sizes` (n_lat, n_lon, texture_side) go to `synthetic_flame`, e.g. FLAME's own size for speed runs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head = synthetic_flame(seed, **sizes)
    flame_path, texture_path, template_path = (folder / n for n in ("generic_model.pkl", "FLAME_texture.npz", "head_template.obj"))
    flame_path.write_bytes(flame_pickle_bytes(head.model))
    np.savez(texture_path, mean=head.texture_mean[None], tex_dir=head.texture_dirs[None])
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in head.model["v_template"]]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in head.uv.uv]
    lines += ["f " + " ".join(f"{a + 1}/{b + 1}" for a, b in zip(f, t)) for f, t in zip(head.model["f"], head.uv.uv_faces)]
    template_path.write_text("\n".join(lines) + "\n")
    return flame_path, texture_path, template_path
