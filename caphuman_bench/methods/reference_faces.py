"""The reference photo's face for methods conditioned on an ArcFace embedding (PhotoMaker v2, InstantID).

The authors run insightface's `FaceAnalysis` (SCRFD detector + ArcFace) and take the raw, un-normalised
`face.embedding`. Here the face is found by the project's MTCNN (`faces.detection`, the most confident
face) and embedded by the project's onnxruntime ArcFace (`faces.arcface`: insightface's 5-point
alignment and input scaling) on the ONNX file the method's authors use. The detector differs from
SCRFD, so the 5 landmarks (and with them the aligned crop) can differ by a pixel or two.

In the tiny setting (smoke preset) there is no ONNX file: the aligned 112 × 112 crop goes through a
fixed random linear map to 512 numbers instead, so detection and alignment still run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.faces.arcface import ARCFACE_SIZE, arcface_align, arcface_embeddings, load_arcface
from caphuman_bench.faces.detection import FaceDetection, detect_faces

TINY_EMBED_SIDE = 16


def require_onnxruntime(method: str) -> None:
    """Stop before any work when the ArcFace runtime is missing (the run's pre-flight calls this)."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise BenchError(f"method {method} needs ArcFace embeddings through onnxruntime, which is not installed: "
                         "pip install 'caphuman-bench[arcface]'")


class ReferenceFaces:
    """Per identity, once: the reference's MTCNN face and its raw 512-d ArcFace embedding."""

    def __init__(self, method: str, device: str, arcface_path: Path | None) -> None:
        self.method = method
        self.device = device
        self.session = load_arcface(arcface_path, device) if arcface_path is not None else None
        self._faces: dict[str, tuple[FaceDetection, np.ndarray]] = {}

    def face(self, identity_id: str, reference: Image.Image) -> tuple[FaceDetection, np.ndarray]:
        if identity_id not in self._faces:
            (detection,) = detect_faces([reference], device="cpu")
            if detection is None:
                raise BenchError(f"identity {identity_id!r}: MTCNN finds no face in the reference photo; "
                                 f"{self.method} needs one for its ArcFace embedding")
            if self.session is None:
                embedding = tiny_arcface_embedding(arcface_align(reference, detection.landmarks))
            else:
                (embedding,) = arcface_embeddings(self.session, [reference], [detection.landmarks])
            self._faces[identity_id] = (detection, np.asarray(embedding, dtype=np.float32))
        return self._faces[identity_id]

    def embedding(self, identity_id: str, reference: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.face(identity_id, reference)[1])


def tiny_arcface_embedding(crop: np.ndarray) -> np.ndarray:
    """A stand-in for ArcFace in the smoke model: the aligned crop, downscaled, through a fixed random map."""
    small = Image.fromarray(crop).resize((TINY_EMBED_SIDE, TINY_EMBED_SIDE), Image.BILINEAR)
    pixels = (np.asarray(small, dtype=np.float32).reshape(-1) - 127.5) / 127.5
    projection = np.random.default_rng(ARCFACE_SIZE).standard_normal((512, pixels.size)).astype(np.float32)
    return projection @ pixels
