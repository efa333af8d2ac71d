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

# insightface's `arcface_dst` (python-package/insightface/utils/face_align.py): where the 5 landmarks
# sit in a 112 × 112 crop; float32 as there, since the similarity transform is estimated in that dtype.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# onnxruntime's CUDA provider runs float32 convolutions and GEMMs in TF32 unless told not to (`use_tf32`),
# and picks cuDNN algorithms by timing them (`EXHAUSTIVE`): strict float32, chosen by cuDNN's heuristic.
CUDA_PROVIDER_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
ARCFACE_SIZE = 112
EMBED_BATCH = 32


def arcface_align(image: Image.Image, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """insightface's `norm_crop`: warp the face so its 5 landmarks land on the ArcFace template.

    The same call as insightface's `estimate_norm` + `norm_crop`: scikit-image's similarity transform
    from the landmarks (in their own dtype) to the float32 template — scaled by size / 112 for a
    multiple of 112, else by size / 128 and shifted right by 8 · size / 128, e.g. the 224 px face crop
    IP-Adapter-FaceID-Plus feeds CLIP — then OpenCV's `warpAffine` (bilinear in OpenCV's fixed-point
    arithmetic, black border). Equal to `norm_crop` pixel for pixel (tests/data/arcface_norm_crop).
    Returns size × size × 3 uint8 RGB.
    """
    import cv2

    params = arcface_transform(landmarks, size)
    return cv2.warpAffine(np.asarray(image.convert("RGB")), params, (size, size), borderValue=0.0)


def arcface_transform(landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """insightface's `estimate_norm`: the 2 × 3 similarity from the landmarks (estimated in their own dtype)
    onto the template for a size² crop, as `arcface_align` warps with it."""
    from skimage.transform import SimilarityTransform

    ratio, shift = (size / ARCFACE_SIZE, 0) if size % ARCFACE_SIZE == 0 else (size / 128.0, 8.0 * size / 128.0)
    template = ARCFACE_TEMPLATE * ratio
    template[:, 0] += shift
    transform = SimilarityTransform.from_estimate(np.asarray(landmarks), template)
    if not transform:
        raise ValueError(f"cannot align landmarks {np.asarray(landmarks).tolist()}: {transform}")
    return transform.params[0:2, :]


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
        providers: list = ["CPUExecutionProvider"]
        if _on_cuda(onnxruntime, device):
            providers.insert(0, ("CUDAExecutionProvider", {**CUDA_PROVIDER_OPTIONS, "device_id": _cuda_index(device)}))
        try:
            _ARCFACES[key] = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as exc:
            raise BenchError(f"{path}: cannot load the arcface_antelopev2 ONNX model ({type(exc).__name__}: {exc})") from None
    return _ARCFACES[key]


def _on_cuda(onnxruntime, device: str) -> bool:
    return str(device).startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _cuda_index(device: str) -> int:
    """cuda:N → N (the GPU the metric was given, not the process's first); cuda → 0."""
    _, _, index = str(device).partition(":")
    return int(index) if index.isdigit() else 0


def arcface_runtime(device: str) -> str:
    """Where ArcFace runs for `device`, for scoring.json."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime (not installed)"
    if _on_cuda(onnxruntime, device):
        return "onnxruntime CUDAExecutionProvider, " + ", ".join(f"{k}={v}" for k, v in CUDA_PROVIDER_OPTIONS.items())
    return "onnxruntime CPUExecutionProvider (float32)"


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
