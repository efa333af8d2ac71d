"""The 68 facial landmarks of a FLAME head, projected into the frame of its head render.

DECA (decalib/models/FLAME.py, `seletec_3d68` and the `landmarks3d` output of `forward`) places the
68 iBUG landmarks on the mesh by a fixed embedding: for landmark k, a face `full_lmk_faces_idx[k]`
of the FLAME topology and barycentric weights `full_lmk_bary_coords[k]` over its three vertices
(data/landmark_embedding.npy). A landmark moves with the posed vertices, so it follows pose and
expression. (DECA's *2D* landmarks swap the 17 jaw points for a pose-dependent "dynamic" contour
fitted to photos; we use the fixed 68, which stay the same surface points under any pose.)

Projection: the head renderer's own orthographic camera (`renderer.orthographic_projection`,
DECA's `batch_orth_proj` + y flip), then screen [-1, 1] → pixels. Pixel coordinates here put the
image's top-left *corner* at (0, 0) and pixel i's centre at i + 0.5, so `int(x)` is the pixel a
point falls in (the convention ControlNet's annotators draw with).

Also here, so every head-aware method shares them: `five_keypoints` (InsightFace's 5-point order)
and `draw_openpose_face` (ControlNet 1.1's openpose face image).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from caphuman_bench.benchmark import HeadCondition
from caphuman_bench.errors import BenchError
from caphuman_bench.render.flame_io import _FlameUnpickler
from caphuman_bench.render.renderer import orthographic_projection

N_LANDMARKS = 68
EMBEDDING_FIELDS = ("full_lmk_faces_idx", "full_lmk_bary_coords")

# iBUG 68 index groups (image-left = the subject's right).
JAW, RIGHT_BROW, LEFT_BROW = range(0, 17), range(17, 22), range(22, 27)
NOSE_BRIDGE, NOSE_BOTTOM = range(27, 31), range(31, 36)
RIGHT_EYE, LEFT_EYE = range(36, 42), range(42, 48)  # subject's right eye = the image's left eye
OUTER_LIPS, INNER_LIPS = range(48, 60), range(60, 68)
NOSE_TIP, MOUTH_LEFT_CORNER, MOUTH_RIGHT_CORNER = 30, 48, 54  # mouth corners as seen in the image


@dataclass(frozen=True)
class LandmarkEmbedding:
    """Where the 68 landmarks sit on the FLAME topology: a face index and barycentric weights each."""

    faces: np.ndarray  # [68] int64, index into the mesh's face list
    bary: np.ndarray  # [68, 3] float32, weights of that face's three vertices

    def check(self, n_faces: int, where: str) -> "LandmarkEmbedding":
        if self.faces.shape != (N_LANDMARKS,) or self.bary.shape != (N_LANDMARKS, 3):
            raise BenchError(f"{where}: landmark embedding needs {N_LANDMARKS} faces and [{N_LANDMARKS}, 3] barycentrics, "
                             f"got {self.faces.shape} and {self.bary.shape}")
        if self.faces.min() < 0 or self.faces.max() >= n_faces:
            raise BenchError(f"{where}: field 'full_lmk_faces_idx' indexes faces outside the mesh's {n_faces}")
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LandmarkEmbedding":
        """DECA's `landmark_embedding.npy`, or an .npz holding the two `full_lmk_*` arrays."""
        path = Path(path)
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as npz:
                    fields = {k: npz[k] for k in npz.files}
            except FileNotFoundError:
                raise BenchError(f"{path}: FLAME landmark embedding not found") from None
            except (OSError, ValueError) as exc:
                raise BenchError(f"{path}: not a readable .npz ({exc})") from None
        else:
            fields = _read_deca_embedding(path)
        missing = [k for k in EMBEDDING_FIELDS if not isinstance(fields.get(k), np.ndarray)]
        if missing:
            raise BenchError(f"{path}: landmark embedding lacks array field(s) {', '.join(missing)}")
        return cls(np.asarray(fields["full_lmk_faces_idx"]).reshape(-1).astype(np.int64),
                   np.asarray(fields["full_lmk_bary_coords"], dtype=np.float32).reshape(-1, 3))

    @classmethod
    def synthetic(cls, seed: int = 0) -> "LandmarkEmbedding":
        """The embedding of `render.synthetic`'s head (`HeadConditionRenderer.synthetic(seed=seed)`)."""
        from caphuman_bench.render.synthetic import synthetic_flame

        faces, bary = synthetic_flame(seed).landmark_embedding()
        return cls(faces, bary)


class _Skipped:
    """What a torch tensor of the file becomes: DECA's dynamic-contour fields, which are not used."""


def _skip(*_args):
    return _Skipped()


class _EmbeddingUnpickler(_FlameUnpickler):
    """FLAME's restricted unpickler plus the few names DECA's file holds: its `dynamic_lmk_*` fields are
    torch tensors pickled through `torch._utils._rebuild_tensor_v2` / `torch.storage._load_from_bytes`
    (which would run `torch.load` on embedded bytes); they become inert `_Skipped` stand-ins."""

    def __init__(self, fh, path: Path):
        super().__init__(fh, path)
        self._allowed.update({
            ("torch._utils", "_rebuild_tensor_v2"): _skip,
            ("torch._utils", "_rebuild_tensor"): _skip,
            ("torch.storage", "_load_from_bytes"): _skip,
            ("torch.serialization", "_load_from_bytes"): _skip,
            ("collections", "OrderedDict"): OrderedDict,
        })

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise BenchError(f"{self._path}: refused to unpickle class {module}.{name} — DECA's landmark_embedding.npy "
                             f"only holds numpy arrays and torch tensors") from None


def _read_deca_embedding(path: Path) -> dict:
    """The dict inside DECA's .npy (a 0-d object array, i.e. a pickle after the .npy header), read
    without running anything the file names: `np.load(allow_pickle=True)` would."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise BenchError(f"{path}: .npy format version {version} is not DECA's (1.0)")
            shape, _, dtype = read_header[version](fh)
            if dtype != np.dtype(object) or shape != ():
                raise BenchError(f"{path}: expected DECA's landmark embedding (a pickled dict in a .npy), got a {dtype} array {shape}")
            array = _EmbeddingUnpickler(fh, path).load()
    except FileNotFoundError:
        raise BenchError(f"{path}: FLAME landmark embedding not found") from None
    except BenchError:
        raise
    except Exception as exc:  # truncated or foreign file
        raise BenchError(f"{path}: not a readable landmark_embedding.npy ({type(exc).__name__}: {exc})") from None
    content = array[()] if isinstance(array, np.ndarray) else array
    if not isinstance(content, dict):
        raise BenchError(f"{path}: expected a dict of landmark fields, got {type(content).__name__}")
    return content


def surface_points(vertices: torch.Tensor, faces: torch.Tensor, embedding: LandmarkEmbedding) -> torch.Tensor:
    """DECA's `vertices2landmarks`: vertices [B, V, 3] → landmarks [B, 68, 3] (barycentric mix of each face's corners)."""
    corners = vertices[:, faces[torch.as_tensor(embedding.faces, device=faces.device)]]  # [B, 68, 3, 3]
    weights = torch.as_tensor(embedding.bary, dtype=vertices.dtype, device=vertices.device)
    return torch.einsum("blkd,lk->bld", corners, weights)


def to_pixels(points: torch.Tensor, cam: torch.Tensor, size: int) -> torch.Tensor:
    """World points [B, N, 3] → [B, N, 2] pixel (x, y) of a size × size render with camera cam [B, 3]."""
    screen = orthographic_projection(points, cam)[..., :2]
    return (screen + 1) * (size / 2)


class HeadLandmarks:
    """FLAME landmarks of the heads a `HeadConditionRenderer` draws, in its render's pixel frame."""

    def __init__(self, renderer, embedding: LandmarkEmbedding):
        self.renderer = renderer
        self.embedding = embedding.check(int(renderer.flame.faces.shape[0]), "FLAME landmark embedding")

    @classmethod
    def synthetic(cls, renderer, seed: int = 0) -> "HeadLandmarks":
        return cls(renderer, LandmarkEmbedding.synthetic(seed))

    @torch.no_grad()
    def _posed(self, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """FLAME vertices [N, V, 3] and cameras [N, 3] of mixed head codes (a `HeadRender.target`)."""
        device = self.renderer.device
        stacked = {k: torch.tensor(np.stack([np.asarray(t[k], dtype=np.float32).reshape(-1) for t in targets]),
                                   device=device) for k in ("shape", "exp", "pose", "cam")}
        return self.renderer.flame(stacked["shape"], stacked["exp"], stacked["pose"]), stacked["cam"]

    def of_targets(self, targets: list[dict], size: int) -> np.ndarray:
        """Mixed head codes (shape, exp, pose, cam, ...) → [N, 68, 2] pixel (x, y)."""
        vertices, cam = self._posed(targets)
        points = surface_points(vertices, self.renderer.flame.faces, self.embedding)
        return to_pixels(points, cam, size).cpu().numpy().astype(np.float64)

    def facing_camera(self, target: dict) -> np.ndarray:
        """[68] bool: whether each landmark's triangle turns towards the camera (normal z > 0; DECA's
        orthographic camera looks along −z). False marks landmarks on surfaces turned away, e.g. the far
        jaw line of a turned head, which a landmark detector would not find."""
        vertices, _ = self._posed([target])
        corners = vertices[:, self.renderer.flame.faces[torch.as_tensor(self.embedding.faces, device=vertices.device)]]
        normals = torch.linalg.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0], dim=-1)
        return (normals[0, :, 2] > 0).cpu().numpy()

    def of_target(self, target: dict, size: int) -> np.ndarray:
        """One head code → [68, 2] pixel (x, y)."""
        return self.of_targets([target], size)[0]

    def of_condition(self, identity_code: dict, condition: HeadCondition | dict, mode: str, size: int) -> np.ndarray:
        """The identity under a head condition, mixed as the renderer mixes it (`mix_coefficients`) → [68, 2]."""
        from caphuman_bench.render.head_condition import mix_coefficients

        coefficients = condition.coefficients() if isinstance(condition, HeadCondition) else condition
        return self.of_target(mix_coefficients(identity_code, coefficients, mode), size)


def five_keypoints(landmarks: np.ndarray) -> np.ndarray:
    """68 landmarks [68, 2] → InsightFace's 5 keypoints [5, 2] in its order (what `arcface_dst` and
    InstantID's `draw_kps` expect): image-left eye centre, image-right eye centre, nose tip,
    image-left mouth corner, image-right mouth corner."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (N_LANDMARKS, 2):
        raise BenchError(f"five_keypoints: expected [{N_LANDMARKS}, 2] landmarks, got {list(landmarks.shape)}")
    return np.stack([landmarks[RIGHT_EYE].mean(0), landmarks[LEFT_EYE].mean(0), landmarks[NOSE_TIP],
                     landmarks[MOUTH_LEFT_CORNER], landmarks[MOUTH_RIGHT_CORNER]])


# ControlNet 1.1's openpose annotator draws at its detect resolution (512 by default) with radius 3.
OPENPOSE_DETECT_RESOLUTION, OPENPOSE_FACE_RADIUS = 512, 3


def openpose_face_points(landmarks: np.ndarray, visible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 70 points OpenPose's face model outputs — the 68 iBUG landmarks, then the right and left
    pupils (taken as the eye-contour centres) — and which of them are visible (a pupil when its whole
    eye contour is)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    visible = np.ones(N_LANDMARKS, dtype=bool) if visible is None else np.asarray(visible, dtype=bool)
    points = np.concatenate([landmarks, landmarks[RIGHT_EYE].mean(0, keepdims=True), landmarks[LEFT_EYE].mean(0, keepdims=True)])
    return points, np.concatenate([visible, [visible[RIGHT_EYE].all(), visible[LEFT_EYE].all()]])


OPENPOSE_EPS = 0.01  # annotator/openpose/util.py: a point is drawn only if its integer x and y exceed it


def draw_openpose_face(landmarks: np.ndarray, width: int, height: int | None = None,
                       visible: np.ndarray | None = None) -> Image.Image:
    """The face part of ControlNet 1.1's openpose image (annotator/openpose/util.py `draw_facepose`):
    a black RGB canvas with a filled white disc of radius 3 at each face point (`int` of its
    coordinates), points whose integer x or y is not above 0 skipped (the annotator's `x > eps and y > eps`
    on the integer pixel, eps = 0.01, at commit e2b4415), as are points `visible` marks False (the
    annotator's face model reports only the peaks it finds). The annotator draws at its detect
    resolution and the image is then resized, so the radius is 3 at 512 px and scales with the canvas
    (rounded, at least 1). Discs as OpenCV's filled `cv2.circle` draws them (every pixel within the
    radius, inclusive), in numpy: OpenCV is not a dependency."""
    height = height or width
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    radius = max(1, round(OPENPOSE_FACE_RADIUS * min(width, height) / OPENPOSE_DETECT_RESOLUTION))
    rows, cols = np.ogrid[:height, :width]
    for (x, y), shown in zip(*openpose_face_points(landmarks, visible)):
        ix, iy = int(x), int(y)
        if shown and ix > OPENPOSE_EPS and iy > OPENPOSE_EPS:
            canvas[(cols - ix) ** 2 + (rows - iy) ** 2 <= radius * radius] = 255
    return Image.fromarray(canvas, mode="RGB")
