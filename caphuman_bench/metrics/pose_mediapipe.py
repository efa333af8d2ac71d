"""Head pose cross-check without DECA: MediaPipe face mesh + Kabsch (not the paper's metric).

MediaPipe 0.10.21's legacy `solutions.face_mesh` ships its detector and mesh models in the wheel, so
this runs offline where DECA's `deca_model.tar` (registration required) is absent. The paper's
head-control number is `head_control` (DECA coefficients); this one exists so a head-pose claim can
be checked with a second, independent estimator.

Definition (explicit target parameters, no rendered target image needed):

1. Landmarks: the 468 mesh points of the face MediaPipe ranks first (`static_image_mode=True`,
   `refine_landmarks=False` — the iris points add nothing to pose, and with them the mesh model
   rejects some strongly turned faces), in pixels and turned into the FLAME camera frame
   (x right, y up, z towards the camera): (x·W, −y·H, −z·W).
2. The reference photo's absolute head rotation R_ref comes from the face's own anatomical frame
   (`face_frame_rotation`): x along the mean of 44 left − right mirror-pair vectors (eyes, brows,
   face oval, mouth corners), y from the subnasale (2) to the top of the forehead (10) — rigid
   points, so an open jaw does not tilt it — made orthogonal to x, z = x × y.
3. The generated head's rotation is the reference pose carried over by the rigid motion between the
   two meshes: R_gen = Kabsch(reference mesh → generated mesh, rigid landmarks) · R_ref. Both meshes
   show the same person, so their shapes match and only the pose differs.
4. R_gen is compared with the target's global rotation (pose[0:3]): geodesic angle and per-axis
   yaw / pitch / roll differences, as in `head_control`.

Yaw and roll have a convention-free zero (the face's mirror symmetry, as in FLAME). Pitch zero is a
convention: here the forehead–subnasale line parallel to the image plane; FLAME's zero pose may
differ by a constant few degrees, which shows up in `mp_pitch_error_deg` only.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from PIL import Image

from caphuman_bench.faces.face_mesh import FaceMeshReader
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreItem
from caphuman_bench.metrics.geometry import kabsch_rotation, pose_errors
from caphuman_bench.registry import register_metric

# Mirror pairs of the MediaPipe face mesh, subject's left first (image right in a frontal photo):
# eye contours, eyebrows, face oval and mouth corners, matched in the order MediaPipe's own
# `face_mesh_connections` lists the two sides.
LEFT_LANDMARKS = (
    263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398,  # eye
    276, 283, 282, 295, 285, 300, 293, 334, 296, 336,  # eyebrow
    338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,  # face oval
    291,  # mouth corner
)
RIGHT_LANDMARKS = (
    33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173,
    46, 53, 52, 65, 55, 70, 63, 105, 66, 107,
    109, 67, 103, 54, 21, 162, 127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148,
    61,
)
FOREHEAD_TOP, SUBNASALE = 10, 2


def _rigid_landmarks() -> np.ndarray:
    """Points that expressions and the jaw do not move: eyes, brows, nose, upper face oval."""
    from mediapipe.python.solutions import face_mesh_connections as connections

    rigid = set()
    for edges in (connections.FACEMESH_LEFT_EYE, connections.FACEMESH_RIGHT_EYE, connections.FACEMESH_LEFT_EYEBROW,
                  connections.FACEMESH_RIGHT_EYEBROW, connections.FACEMESH_NOSE):
        rigid.update(i for edge in edges for i in edge)
    rigid.update((FOREHEAD_TOP, 338, 297, 332, 284, 251, 389, 356, 454, 109, 67, 103, 54, 21, 162, 127, 234))
    return np.array(sorted(rigid))


def face_frame_rotation(landmarks: np.ndarray) -> np.ndarray:
    """Absolute head rotation [3, 3] (FLAME camera frame) from one mesh's anatomical axes (see module doc)."""
    x_axis = (landmarks[list(LEFT_LANDMARKS)] - landmarks[list(RIGHT_LANDMARKS)]).mean(0)
    x_axis /= np.linalg.norm(x_axis)
    y_axis = landmarks[FOREHEAD_TOP] - landmarks[SUBNASALE]
    y_axis -= x_axis * (x_axis @ y_axis)
    y_axis /= np.linalg.norm(y_axis)
    return np.stack([x_axis, y_axis, np.cross(x_axis, y_axis)], axis=1)


_WORKER_READER: FaceMeshReader | None = None


def _worker_landmarks(pixels: np.ndarray) -> np.ndarray | None:
    """In a pool process: its own face mesh (MediaPipe graphs are not shared between processes)."""
    global _WORKER_READER
    if _WORKER_READER is None:
        _WORKER_READER = FaceMeshReader()
    return _WORKER_READER.landmarks(Image.fromarray(pixels))


class FaceMeshPool:
    """MediaPipe on CPU worker processes (spawned: safe beside CUDA): MediaPipe runs one image at a
    time on one core, so the GPU families would otherwise wait on it. Same landmarks as in-process
    (static-image mode has no state between images)."""

    def __init__(self, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def landmarks(self, images: list[Image.Image]) -> list[np.ndarray | None]:
        pixels = [np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)) for image in images]
        return list(self._pool.map(_worker_landmarks, pixels, chunksize=max(1, len(pixels) // (4 * self.workers))))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def default_mediapipe_workers() -> int:
    """One process per core but one (the scoring loop's), at most 16."""
    import os

    return max(1, min(16, (os.cpu_count() or 1) - 1))


def generated_rotation(reference_landmarks: np.ndarray, generated_landmarks: np.ndarray) -> np.ndarray:
    """R_gen = Kabsch(reference → generated, rigid landmarks) · R_ref (module doc, step 3)."""
    rigid = _rigid_landmarks()
    motion = kabsch_rotation(reference_landmarks[rigid], generated_landmarks[rigid])
    return motion @ face_frame_rotation(reference_landmarks)


VALUE_NAMES = ("mp_pose_error_deg", "mp_yaw_error_deg", "mp_pitch_error_deg", "mp_roll_error_deg")


@register_metric("pose_mediapipe", higher_is_better={name: False for name in VALUE_NAMES}, weights=("mediapipe_face_mesh",))
class PoseMediaPipe(BenchMetric):
    """Head pose error by MediaPipe face mesh + Kabsch against the target pose (offline cross-check)."""

    convention: ClassVar[dict] = {
        "paper_metric": False,
        "estimator": FaceMeshReader.convention,
        "generated_rotation": "Kabsch(reference mesh -> generated mesh, rigid landmarks) . R_ref",
        "reference_rotation": "anatomical frame: x = mean left-right mirror-pair vector, y = subnasale(2) -> forehead(10)",
        "target": "global rotation pose[0:3] of the head-control target (axis-angle, FLAME camera frame)",
        "angles": "geodesic angle; |yaw|,|pitch|,|roll| differences, R = R_y(yaw) R_x(pitch) R_z(roll), degrees",
        "pitch_zero": "forehead-subnasale line parallel to the image plane (may differ from FLAME's zero by a constant)",
        "several_faces": "the face MediaPipe's detector ranks first (max_num_faces=1)",
        "no_face": "status no_face (generated or reference), values NaN",
    }

    def __init__(self, context=None) -> None:
        super().__init__(context)
        self._reader: FaceMeshReader | None = None
        self._pool: FaceMeshPool | None = None
        self.workers = int(self.option("mediapipe_workers", default_mediapipe_workers()))

    @property
    def reader(self) -> FaceMeshReader:
        if self._reader is None:
            self._reader = FaceMeshReader()
        return self._reader

    def numerics(self) -> dict:
        return {"device": "cpu", "dtype": "float32", "runtime": "MediaPipe face mesh (TFLite) on the host, whatever --device"}

    def measure(self, items: list[ScoreItem]) -> list[ItemScore]:
        scorable = [i for i, item in enumerate(items) if item.image is not None and item.target is not None and "pose" in item.target]
        generated = dict(zip(scorable, self._generated_landmarks([items[i].image for i in scorable])))
        return [self._measure_one(item, generated.get(i)) for i, item in enumerate(items)]

    def _generated_landmarks(self, images: list[Image.Image]) -> list[np.ndarray | None]:
        """Landmarks of a batch of generated images: in the worker pool when there is one to use."""
        if self.workers <= 1 or len(images) < 2:
            return [self.reader.landmarks(image) for image in images]
        if self._pool is None:
            self._pool = FaceMeshPool(self.workers)
        return self._pool.landmarks(images)

    def _measure_one(self, item: ScoreItem, generated: np.ndarray | None = None) -> ItemScore:
        unscored = {name: math.nan for name in VALUE_NAMES}
        if item.image is None:
            return ItemScore(unscored, "unreadable", item.image_error or "image could not be read")
        if item.target is None or "pose" not in item.target:
            return ItemScore(unscored, "error", "no target pose stored for this item")
        reference = self.reference_features(item.identity_id, item.reference, self.reader.landmarks, item.reference_sha256)
        if reference is None:
            return ItemScore(unscored, "no_face", "MediaPipe found no face in the reference photo")
        if generated is None:
            return ItemScore(unscored, "no_face", "MediaPipe found no face in the generated image")
        rotation = generated_rotation(reference, generated)
        target_rotvec = np.asarray(item.target["pose"], dtype=np.float64).reshape(-1)[:3]
        errors = pose_errors(rotation, target_rotvec)
        return ItemScore({f"mp_{name}": value for name, value in errors.items()}, extra={"estimator": "mediapipe_face_mesh"})
