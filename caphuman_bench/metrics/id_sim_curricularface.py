"""Identity similarity under CurricularFace (IR-101, Glint360K), a recogniser no method here trains with.

PuLID and ConsisID report it beside ArcFace so that a method tuned against one recogniser shows.
Protocol transcribed from ConsisID's `eval/get_facesim_fid.py`: the face is aligned with insightface's
`norm_crop` at 224 px (the ArcFace template × 2), resized to 112 × 112 (OpenCV bilinear there, PIL
bilinear here), RGB scaled to [-1, 1], embedded by IR-101 and L2-normalised; ConsisID then scores
`max(cos, 0)`. Here the landmarks are the shared MTCNN five points (ConsisID uses insightface's
detector) and the cosine is signed, as for the other recognisers of this project.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from caphuman_bench.faces.arcface import arcface_align
from caphuman_bench.faces.detection import DETECTOR_CONVENTION
from caphuman_bench.metrics.identity import _NO_FACE_CONVENTION, EMBED_BATCH, IdentitySimilarity
from caphuman_bench.registry import register_metric

ALIGN_SIZE = 224
INPUT_SIZE = 112
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def curricularface_on(path: str | Path, device: str) -> torch.nn.Module:
    from caphuman_bench.models.curricularface import load_curricularface

    key = (str(Path(path).resolve()), str(device))
    if key not in _MODELS:
        _MODELS[key] = load_curricularface(path).to(device)
    return _MODELS[key]


def curricularface_input(image: Image.Image, landmarks: np.ndarray) -> torch.Tensor:
    """3 × 112 × 112 in [-1, 1]: `norm_crop` at 224, then halved."""
    aligned = Image.fromarray(arcface_align(image, landmarks, size=ALIGN_SIZE)).resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(aligned, dtype=np.float32)).permute(2, 0, 1)
    return (pixels / 255.0 - 0.5) / 0.5


@register_metric("id_sim_curricularface", higher_is_better={"id_sim_curricularface": True, "id_sim_curricularface_mean_ref": True},
                 weights=("mtcnn", "curricularface_ir101"))
class CurricularFaceIdentity(IdentitySimilarity):
    """Cosine of CurricularFace IR-101 (Glint360K) embeddings of 5-point-aligned faces (PuLID / ConsisID's recogniser)."""

    convention: ClassVar[dict] = {
        "value": "cosine similarity in [-1, 1] between reference and generated face embeddings (ConsisID clamps at 0)",
        "recogniser": "CurricularFace IR-101, Glint360K (glint360k_curricular_face_r101_backbone.bin)",
        "alignment": "insightface norm_crop at 224 px on MTCNN's 5 landmarks, bilinear to 112 x 112, RGB, (pixel / 255 - 0.5) / 0.5",
        **DETECTOR_CONVENTION,
        **_NO_FACE_CONVENTION,
    }

    def embed(self, images, detections):
        model = curricularface_on(self.context.weights["curricularface_ir101"], self.device_name)
        present = [i for i, d in enumerate(detections) if d is not None]
        out: list[np.ndarray | None] = [None] * len(images)
        for start in range(0, len(present), EMBED_BATCH):
            chunk = present[start : start + EMBED_BATCH]
            batch = torch.stack([curricularface_input(images[i], detections[i].landmarks) for i in chunk]).to(self.device_name)
            with torch.inference_mode():
                vectors = torch.nn.functional.normalize(model(batch).float(), dim=1).cpu().numpy()
            for i, vector in zip(chunk, vectors):
                out[i] = vector.astype(np.float64)
        return out
