"""The reference photos' faces for methods conditioned on an ArcFace embedding (PhotoMaker v2, InstantID,
IP-Adapter-FaceID).

The authors run insightface's `FaceAnalysis` (SCRFD detector + ArcFace) and take the raw, un-normalised
`face.embedding`. Here the face is found by the project's MTCNN (`faces.detection`, the most confident
face) and embedded by the project's onnxruntime ArcFace (`faces.arcface`: insightface's 5-point
alignment and input scaling) on the ONNX file the method's authors use. The detector differs from
SCRFD, so the 5 landmarks (and with them the aligned crop) can differ by a pixel or two.

In the tiny setting (smoke preset) there is no ONNX file: the aligned 112 × 112 crop goes through a
fixed random linear map to 512 numbers instead (or through the adapter's own stand-in session), so
detection and alignment still run.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.faces.arcface import ARCFACE_SIZE, arcface_align, arcface_embeddings
from caphuman_bench.faces.detection import FaceDetection, detect_faces

TINY_EMBED_SIDE = 16


def require_onnxruntime(method: str) -> None:
    """Stop before any work when the ArcFace runtime is missing (the run's pre-flight calls this)."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise BenchError(f"method {method} needs ArcFace embeddings through onnxruntime, which is not installed: "
                         "pip install 'caphuman-bench[arcface]'")


class ReferenceFaces:
    """Per reference photo, once: its MTCNN face and raw 512-d ArcFace embedding, kept under the caller's
    key (an identity, or `<identity>#<n>` for its n-th photo).

    `session`: an onnxruntime ArcFace session (`faces.arcface.load_arcface`) or anything with its
    `get_inputs` / `run` interface; None embeds with `tiny_arcface_embedding`. Faces are found on
    `detect_device` (the CPU unless the adapter says otherwise)."""

    def __init__(self, method: str, session=None, detect_device: str = "cpu") -> None:
        self.method = method
        self.session = session
        self.detect_device = detect_device
        self._faces: dict[str, tuple[FaceDetection, np.ndarray]] = {}

    def face(self, key: str, reference: Image.Image) -> tuple[FaceDetection, np.ndarray]:
        (found,) = self._known([key], [reference], key)
        return found

    def faces(self, identity_id: str, photos: list[Image.Image]) -> list[tuple[FaceDetection, np.ndarray]]:
        """(face, raw embedding) of each of an identity's photos, those not seen before detected and embedded together."""
        return self._known([f"{identity_id}#{n}" for n in range(len(photos))], photos, identity_id)

    def embedding(self, key: str, reference: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.face(key, reference)[1])

    def _known(self, keys: list[str], photos: list[Image.Image], identity_id: str) -> list[tuple[FaceDetection, np.ndarray]]:
        new = {key: photo for key, photo in zip(keys, photos) if key not in self._faces}
        if new:
            detections = detect_faces(list(new.values()), device=self.detect_device)
            if any(d is None for d in detections):
                which = "the reference photo" if len(photos) == 1 else "a reference photo"
                raise BenchError(f"identity {identity_id!r}: MTCNN finds no face in {which}; "
                                 f"{self.method} needs one for its ArcFace embedding")
            if self.session is None:
                embeddings = [tiny_arcface_embedding(arcface_align(p, d.landmarks)) for p, d in zip(new.values(), detections)]
            else:
                embeddings = arcface_embeddings(self.session, list(new.values()), [d.landmarks for d in detections])
            for key, detection, embedding in zip(new, detections, embeddings):
                self._faces[key] = (detection, np.asarray(embedding, dtype=np.float32))
        return [self._faces[key] for key in keys]


def tiny_arcface_embedding(crop: np.ndarray) -> np.ndarray:
    """A stand-in for ArcFace in the smoke model: the aligned crop, downscaled, through a fixed random map."""
    small = Image.fromarray(crop).resize((TINY_EMBED_SIDE, TINY_EMBED_SIDE), Image.BILINEAR)
    pixels = (np.asarray(small, dtype=np.float32).reshape(-1) - 127.5) / 127.5
    projection = np.random.default_rng(ARCFACE_SIZE).standard_normal((512, pixels.size)).astype(np.float32)
    return projection @ pixels
