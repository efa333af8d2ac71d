"""ArcFace (insightface antelopev2 `glintr100.onnx`) through onnxruntime: alignment, session, embeddings.

One implementation for the `id_sim_arcface` metric and for every method conditioned on an ArcFace
embedding (IP-Adapter-FaceID, InstantID, Arc2Face). onnxruntime is insightface's own runtime for
these graphs; insightface itself (its detector, its C++ extension) is not a dependency.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from caphuman_bench.errors import BenchError

# insightface's `arcface_dst` (utils/face_align.py): where the 5 landmarks sit in a 112 × 112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
ARCFACE_SIZE = 112
EMBED_BATCH = 32


def arcface_align(image: Image.Image, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """insightface's `norm_crop`: warp the face so its 5 landmarks land on the ArcFace template.

    Other sizes scale the template as insightface's `estimate_norm` does (a multiple of 112: by
    size / 112; otherwise by size / 128, shifted right by 8 · size / 128), e.g. the 224 px face crop
    IP-Adapter-FaceID-Plus feeds CLIP. scikit-image stands in for OpenCV's `warpAffine` (bilinear,
    black border; OpenCV is not a dependency of the core install). Returns size × size × 3 uint8 RGB.
    """
    from skimage.transform import SimilarityTransform, warp

    ratio, shift = (size / ARCFACE_SIZE, 0.0) if size % ARCFACE_SIZE == 0 else (size / 128.0, 8.0 * size / 128.0)
    template = ARCFACE_TEMPLATE * ratio + np.array([shift, 0.0])
    transform = SimilarityTransform.from_estimate(np.asarray(landmarks, dtype=np.float64), template)
    if not transform:
        raise ValueError(f"cannot align landmarks {np.asarray(landmarks).tolist()}: {transform}")
    warped = warp(np.asarray(image.convert("RGB")), transform.inverse, output_shape=(size, size),
                  order=1, mode="constant", cval=0.0, preserve_range=True)
    return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


_ARCFACES: dict[tuple[str, str], object] = {}


def load_arcface(path: str | Path, device: str):
    """An onnxruntime session for the ArcFace ONNX file; CUDA when asked for and available."""
    try:
        import onnxruntime
    except ImportError:
        raise BenchError(
            "ArcFace embeddings (metric id_sim_arcface, ArcFace-conditioned methods) need onnxruntime, which is not installed: "
            "pip install 'caphuman-bench[arcface]'"
        ) from None
    key = (str(Path(path).resolve()), str(device))
    if key not in _ARCFACES:
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            _ARCFACES[key] = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as exc:
            raise BenchError(f"{path}: cannot load the arcface_antelopev2 ONNX model ({type(exc).__name__}: {exc})") from None
    return _ARCFACES[key]


def arcface_embeddings(session, images: list[Image.Image], landmarks: list[np.ndarray]) -> list[np.ndarray]:
    """Raw (not normalised) 512-d embeddings of each image's face given its 5 landmarks.

    Input as insightface's `ArcFaceONNX.get_feat`: aligned RGB crops, (pixel - 127.5) / 127.5, NCHW.
    """
    input_name = session.get_inputs()[0].name
    out: list[np.ndarray] = []
    for start in range(0, len(images), EMBED_BATCH):
        crops = np.stack([arcface_align(image, points) for image, points in
                          zip(images[start:start + EMBED_BATCH], landmarks[start:start + EMBED_BATCH])])
        blob = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
        vectors = session.run(None, {input_name: np.ascontiguousarray(blob)})[0]
        out.extend(np.asarray(v, dtype=np.float64) for v in vectors)
    return out
