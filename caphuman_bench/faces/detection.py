"""One face detector for every face metric of a scoring pass: facenet-pytorch's MTCNN.

MTCNN ships its weights in the facenet-pytorch wheel, is what the paper's ID-sim protocol uses
(`MTCNN(image_size=160, margin=0)`), and gives the 5 landmarks ArcFace alignment needs, so the
face-detection rate, all identity recognisers and the DECA crop see the same face in each image.

Conventions (recorded by the metrics that use this module):
- MTCNN's default thresholds (0.6, 0.7, 0.7) and minimum face size 20 px; a face is "detected" when
  MTCNN's output network keeps it (probability ≥ 0.7).
- With several faces, `detect_faces` lists them most confident first; `FaceDetection.choose("largest")`
  reorders them largest box first, as FastComposer's `MTCNN(keep_all=True)` (facenet-pytorch's default
  `select_largest=True`) then `[:1]` takes them. `n_faces` reports how many there were.
- `max_side` (default `DETECT_MAX_SIDE`): larger images are detected on a copy downscaled to that size
  and the boxes mapped back (× the scale factor), which bounds memory but moves boxes by a few pixels;
  `max_side=None` detects every image at full size (FastComposer's protocol).
- One image per MTCNN call. Batching images saved pyramid launches on a GPU, but a convolution's result
  depends in its last bits on the batch it runs in (cuDNN picks kernels by shape), and MTCNN's thresholds
  and NMS turn a last bit into another box: on an H100, batch 64 against 7 moved 2 of 175 boxes and every
  score of those images with them (issue 25). Alone, an image's detection is the same whatever batch,
  shard or process it is scored in.

The three MTCNN stages run through `mtcnn_detect`, this module's orchestration of facenet-pytorch's
networks and helpers: facenet-pytorch's own `detect_face` crops every candidate box of the second and
third stages with a separate resize call (about 160 per 512² image), which on a GPU costs more in
kernel launches and Python than the networks cost. Here all crops of a stage come from one gather in a
summed-area table; the crops equal facenet-pytorch's to an ulp (one rounding of an exact window sum
instead of two), and boxes, probabilities and landmarks match its own to float tolerance (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from caphuman_bench.images import to_rgb
from caphuman_bench.faces.memo import BoundedMemo, image_digest
from caphuman_bench.parallel import thread_map

DETECT_MAX_SIDE = 2048
FACENET_CROP = 160
MTCNN_FILES = ("pnet.pt", "rnet.pt", "onet.pt")

_DETECTORS: dict[tuple[str, str], torch.nn.Module] = {}
_DETECTIONS = BoundedMemo(capacity=1024)
_MISSING = object()

DETECTOR_CONVENTION = {
    "detector": "facenet-pytorch MTCNN, thresholds (0.6, 0.7, 0.7), min face 20 px, factor 0.709; a face counts "
                "when MTCNN's output network gives it probability > 0.7 (facenet-pytorch's strict inequality)",
    "several_faces": "protocol fastcomposer: the largest box (FastComposer's MTCNN(keep_all=True)[:1]); "
                     "protocol caphuman-bench: the most confident face",
    "large_images": f"protocol fastcomposer: detected at full size; protocol caphuman-bench: images over "
                    f"{DETECT_MAX_SIDE} px a side are detected on a copy downscaled to {DETECT_MAX_SIDE} px, boxes scaled back",
}


@dataclass(frozen=True)
class FaceDetection:
    """All faces MTCNN found in one image, most confident first; `box` etc. describe that first one."""

    boxes: np.ndarray  # (n, 4) x1, y1, x2, y2 in image pixels
    probs: np.ndarray  # (n,)
    all_landmarks: np.ndarray  # (n, 5, 2): left eye, right eye, nose, mouth left, mouth right (x, y)

    @property
    def box(self) -> np.ndarray:
        return self.boxes[0]

    @property
    def prob(self) -> float:
        return float(self.probs[0])

    @property
    def landmarks(self) -> np.ndarray:
        return self.all_landmarks[0]

    @property
    def n_faces(self) -> int:
        return len(self.probs)

    def choose(self, rule: str) -> "FaceDetection":
        """The same faces with the one `rule` picks first: "most_confident" (as detected) or "largest"
        (box area, facenet-pytorch's `select_largest` order: `argsort(area)[::-1]`)."""
        if rule == "most_confident":
            return self
        if rule != "largest":
            raise ValueError(f"face choice {rule!r}: expected most_confident or largest")
        area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        order = np.argsort(area)[::-1]
        return FaceDetection(self.boxes[order], self.probs[order], self.all_landmarks[order])


def face_detector(device: str | torch.device = "cpu", weights_dir: str | Path | None = None) -> torch.nn.Module:
    """The MTCNN of this process for a device (built once), with P/R/O-nets from `weights_dir` if given.

    `weights_dir` is the folder of the resolved `mtcnn` manifest entry (pnet.pt, rnet.pt, onet.pt);
    None means the files packaged with facenet-pytorch, which is also where that entry resolves.
    """
    from facenet_pytorch import MTCNN

    weights_dir = _weights_dir(weights_dir)
    key = (str(device), str(weights_dir))
    if key not in _DETECTORS:
        detector = MTCNN(image_size=FACENET_CROP, margin=0, select_largest=False, device=torch.device(device))
        if weights_dir != _packaged_weights_dir():
            for net, filename in zip((detector.pnet, detector.rnet, detector.onet), MTCNN_FILES):
                state = torch.load(Path(weights_dir) / filename, map_location="cpu", weights_only=True)
                net.load_state_dict(state, strict=True)
        detector.eval()
        _DETECTORS[key] = detector
    return _DETECTORS[key]


def mtcnn_weights_dir(weights: dict[str, Path]) -> Path | None:
    """The folder of a scoring pass's resolved `mtcnn` entry (`ScoreContext.weights`): pnet/rnet/onet.pt."""
    onet = weights.get("mtcnn")
    return Path(onet).parent if onet else None


def detect_faces(
    images: list[Image.Image], device: str | torch.device = "cpu", weights_dir: str | Path | None = None,
    max_side: int | None = DETECT_MAX_SIDE,
) -> list[FaceDetection | None]:
    """Faces in each image (None where there is none), one image per MTCNN call; `max_side` as the module says.

    Results are memoised by pixel content, so the other face metrics of the same pass reuse them.
    """
    detector = face_detector(device, weights_dir)
    prefix = (str(device), str(_weights_dir(weights_dir)))  # + the size MTCNN sees, whatever max_side gave it
    results: list[FaceDetection | None] = [None] * len(images)
    images = [to_rgb(image) for image in images]  # a no-op for the RGB images scoring reads
    for index, (image, digest) in enumerate(zip(images, thread_map(image_digest, images))):
        key = (prefix, digest, _detection_size(image.size, max_side)[0])
        known = _DETECTIONS.get(key, _MISSING)
        if known is _MISSING:
            work, scale = _detection_input(image, max_side)  # resized only when MTCNN has to run on it
            (found,) = mtcnn_detect(detector, [work])  # alone, as the module's note says
            known = _as_detection(*found, scale)
            _DETECTIONS.put(key, known)
        results[index] = known
    return results


@torch.no_grad()
def mtcnn_detect(detector: torch.nn.Module, images: list[Image.Image]) -> list[tuple]:
    """(boxes (n, 4), probs (n,), landmarks (n, 5, 2)) per image, (None, None, None) without a face: what
    `detector.detect(images, landmarks=True)` returns (with `select_largest=False`), computed as its
    `detect_face` does but with the second and third stages' crops made all at once (`_box_crops`)."""
    from facenet_pytorch.models.utils.detect_face import (
        batched_nms, batched_nms_numpy, bbreg, fixed_batch_process, generateBoundingBox, imresample, pad, rerec)

    pnet, rnet, onet = detector.pnet, detector.rnet, detector.onet
    thresholds, device = detector.thresholds, next(pnet.parameters()).device
    pixels = torch.as_tensor(np.stack(thread_map(np.asarray, images)), device=device)
    imgs = pixels.permute(0, 3, 1, 2).type(next(pnet.parameters()).dtype)
    h, w = imgs.shape[2:4]
    integral = summed_area_table(pixels.permute(0, 3, 1, 2))

    # stage 1: P-net over the scale pyramid, NMS per scale and image, then per image
    scale, smallest = 12.0 / detector.min_face_size, min(h, w) * 12.0 / detector.min_face_size
    boxes, image_inds, picks, offset = [], [], [], 0
    while smallest >= 12:
        scaled = (imresample(imgs, (int(h * scale + 1), int(w * scale + 1))) - 127.5) * 0.0078125
        reg, probs = pnet(scaled)
        scale_boxes, scale_inds = generateBoundingBox(reg, probs[:, 1], scale, thresholds[0])
        boxes.append(scale_boxes)
        image_inds.append(scale_inds)
        picks.append(batched_nms(scale_boxes[:, :4], scale_boxes[:, 4], scale_inds, 0.5) + offset)
        offset += scale_boxes.shape[0]
        scale, smallest = scale * detector.factor, smallest * detector.factor
    picks = torch.cat(picks)
    boxes, image_inds = torch.cat(boxes)[picks], torch.cat(image_inds)[picks]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = rerec(torch.stack([boxes[:, 0] + boxes[:, 5] * width, boxes[:, 1] + boxes[:, 6] * height,
                               boxes[:, 2] + boxes[:, 7] * width, boxes[:, 3] + boxes[:, 8] * height, boxes[:, 4]], dim=1))

    # stage 2: R-net on 24² crops
    if len(boxes) > 0:
        out = fixed_batch_process(_box_crops(integral, image_inds, pad(boxes, w, h), 24), rnet)
        score = out[1][:, 1]
        keep = score > thresholds[1]
        boxes, image_inds = torch.cat((boxes[keep, :4], score[keep].unsqueeze(1)), dim=1), image_inds[keep]
        moves = out[0][keep]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes = rerec(bbreg(boxes[pick], moves[pick]))
        image_inds = image_inds[pick]

    # stage 3: O-net on 48² crops, landmarks, NMS by the "Min" rule
    points = torch.zeros(0, 5, 2, device=device)
    if len(boxes) > 0:
        out = fixed_batch_process(_box_crops(integral, image_inds, pad(boxes, w, h), 48), onet)
        score = out[2][:, 1]
        keep = score > thresholds[2]
        marks, moves = out[1][keep], out[0][keep]
        boxes, image_inds = torch.cat((boxes[keep, :4], score[keep].unsqueeze(1)), dim=1), image_inds[keep]
        box_w, box_h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        points = torch.stack((box_w[:, None] * marks[:, :5] + boxes[:, 0:1] - 1,
                              box_h[:, None] * marks[:, 5:10] + boxes[:, 1:2] - 1), dim=2)
        boxes = bbreg(boxes, moves)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
        boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

    boxes, points, image_inds = boxes.cpu().numpy(), points.cpu().numpy(), image_inds.cpu().numpy()
    found = []
    for index in range(len(images)):
        mine = np.where(image_inds == index)
        found.append((boxes[mine][:, :4], boxes[mine][:, 4], points[mine]) if len(mine[0]) else (None, None, None))
    return found


def _box_crops(integral: torch.Tensor, image_inds: torch.Tensor, padded: tuple, size: int) -> torch.Tensor:
    """facenet-pytorch's crops `imgs[i, :, y-1:ey, x-1:ex]` resized (area) to size², normalised, in box
    order; boxes with no pixels are left out as it leaves them out.

    All boxes at once from the summed-area table `integral` (`summed_area_table`): area resizing is
    PyTorch's adaptive average pooling, whose window for output a of an n-pixel side is
    [floor(a·n/size), ceil((a+1)·n/size)). The window sums are exact (integer pixels in float64); the
    mean is rounded to float32 once, where PyTorch's kernels divide twice or multiply by a reciprocal,
    so values can differ from facenet-pytorch's by an ulp. One call instead of one resize per box
    (thousands per batch), which on a GPU were launches and Python rather than arithmetic."""
    device = integral.device
    y, ey, x, ex = (torch.as_tensor(np.asarray(v, dtype=np.int64), device=device) for v in padded)
    kept = (ey > y - 1) & (ex > x - 1)
    top, left, images = y[kept] - 1, x[kept] - 1, image_inds.to(device)[kept]
    steps = torch.arange(size, device=device)

    def windows(first: torch.Tensor, extent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extent = extent[:, None]
        return first[:, None] + steps * extent // size, first[:, None] - (-(steps + 1) * extent // size)

    r0, r1 = windows(top, ey[kept] - top)
    c0, c1 = windows(left, ex[kept] - left)
    b = images[:, None, None]

    def corner(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # (boxes, size, size, channels)
        return integral[b, :, rows[:, :, None], cols[:, None, :]]

    sums = corner(r1, c1) - corner(r0, c1) - corner(r1, c0) + corner(r0, c0)
    counts = ((r1 - r0)[:, :, None] * (c1 - c0)[:, None, :])[..., None]
    crops = (sums / counts).float()  # MTCNN's networks are float32
    return (crops.permute(0, 3, 1, 2) - 127.5) * 0.0078125


def summed_area_table(imgs: torch.Tensor) -> torch.Tensor:
    """(B, C, H + 1, W + 1) float64 with a zero first row and column: entry (r, c) sums pixels [0, r) × [0, c).
    Exact for 8-bit pixels (integers far below 2^53)."""
    table = imgs.to(torch.float64).cumsum(2).cumsum(3)
    return torch.nn.functional.pad(table, (1, 0, 1, 0))


def aligned_crops_160(images: list[Image.Image], detections: list[FaceDetection | None]) -> list[torch.Tensor | None]:
    """The face crops `MTCNN(image_size=160, margin=0)` returns: 3×160×160, (pixel − 127.5) / 128.

    facenet-pytorch's own `extract_face` + `fixed_image_standardization` (its post_process=True)
    on the chosen box, so the tensors equal MTCNN's output for the same face.
    """
    from facenet_pytorch.models.mtcnn import fixed_image_standardization
    from facenet_pytorch.models.utils.detect_face import extract_face

    def crop(pair: tuple[Image.Image, FaceDetection | None]) -> torch.Tensor | None:
        image, detection = pair
        if detection is None:
            return None
        return fixed_image_standardization(extract_face(to_rgb(image), detection.box, image_size=FACENET_CROP, margin=0))

    return thread_map(crop, zip(images, detections))


def _packaged_weights_dir() -> Path:
    import facenet_pytorch

    return Path(facenet_pytorch.__file__).resolve().parent / "data"


def _weights_dir(weights_dir: str | Path | None) -> Path:
    return Path(weights_dir).resolve() if weights_dir is not None else _packaged_weights_dir()


def _detection_size(size: tuple[int, int], max_side: int | None) -> tuple[tuple[int, int], float]:
    """The (width, height) MTCNN sees of a photo of `size` and the factor from it back to the photo."""
    longest = max(size)
    if max_side is None or longest <= max_side:
        return size, 1.0
    scale = longest / max_side
    return (max(1, round(size[0] / scale)), max(1, round(size[1] / scale))), scale


def _detection_input(image: Image.Image, max_side: int | None) -> tuple[Image.Image, float]:
    """The image MTCNN sees and the factor from its pixels back to the original's."""
    size, scale = _detection_size(image.size, max_side)
    return (image, scale) if size == image.size else (image.resize(size, Image.BILINEAR), scale)


def _as_detection(boxes, probs, points, scale: float) -> FaceDetection | None:
    if boxes is None:
        return None
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2) * scale
    order = np.argsort(-probs, kind="stable")
    return FaceDetection(boxes=boxes[order], probs=probs[order], all_landmarks=points[order])
