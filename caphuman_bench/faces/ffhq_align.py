"""FFHQ's face alignment from 68 landmarks: the square, rotated crop that FFHQ's images were cut with.

Arc2Face's pose demo (foivospar/Arc2Face, commit 8f3acd7, gradio_demo/app_controlnet.py `run_emoca`) aligns
the pose photo with `arc2face/utils.py image_align(img, landmarks, output_size=512)` — the FFHQ recipe of
NVlabs/ffhq-dataset `download_ffhq.py` — and renders the target head into that aligned photo. The steps,
re-implemented here from that description (tests/data/arc2face holds the authors' outputs, matched pixel for
pixel by `caphuman-bench conformance arc2face_controlnet`):

1. the oriented square (`ffhq_quad`): centre 10 % of the way from the eyes' midpoint to the mouth's, side
   max(4 · eye distance, 3.6 · eye-to-mouth distance), turned with the eye line;
2. shrink: an integer Lanczos downscale while the square is ≥ 4 output sizes wide;
3. crop to the square's bounds plus a 10 % border;
4. where the square leaves the photo: reflect padding (≥ 30 % of the side), blurred and pulled towards the
   median colour with the distance from the photo's edge;
5. the square sampled bilinearly onto 4096², then Lanczos down to the output size.

Landmarks are the iBUG 68 points (eyes 36–47, outer lip 48–59), as EMOCA's FAN (face_alignment 2DFAN)
gives them in the demo.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

TRANSFORM_SIZE = 4096  # the intermediate canvas of the recipe (image_align's default)


def ffhq_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """(corners [4, 2] of the oriented square: top-left, bottom-left, bottom-right, top-right; its side)."""
    points = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right = points[36:42].mean(axis=0), points[42:48].mean(axis=0)
    eye_mid = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (points[48] + points[54]) / 2 - eye_mid
    # the square's x axis: the eye line blended with the perpendicular of the eye-to-mouth line
    x_axis = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    half = max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    x_axis = x_axis / np.hypot(*x_axis) * half  # this order, as the recipe (the last bits matter)
    y_axis = np.array([-x_axis[1], x_axis[0]])
    centre = eye_mid + eye_to_mouth * 0.1
    quad = np.stack([centre - x_axis - y_axis, centre - x_axis + y_axis, centre + x_axis + y_axis,
                     centre + x_axis - y_axis])
    return quad, float(np.hypot(*x_axis) * 2)


def _bounds(quad: np.ndarray) -> tuple[int, int, int, int]:
    return (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
            int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())))


def _soft_padding(photo: Image.Image, pad: tuple[int, int, int, int], side: float) -> Image.Image:
    """Reflect-pad by (left, top, right, bottom); the further from the photo, the blurrier and the closer to
    the median colour."""
    left, top, right, bottom = pad
    pixels = np.pad(np.asarray(photo, dtype=np.float32), ((top, bottom), (left, right), (0, 0)), "reflect")
    h, w, _ = pixels.shape
    y, x = np.ogrid[:h, :w]
    x, y = x[..., None].astype(np.float32), y[..., None].astype(np.float32)
    outside = np.maximum(1.0 - np.minimum(x / left, (w - 1 - x) / right),
                         1.0 - np.minimum(y / top, (h - 1 - y) / bottom))
    blur = side * 0.02
    pixels += (gaussian_filter(pixels, [blur, blur, 0]) - pixels) * np.clip(outside * 3.0 + 1.0, 0.0, 1.0)
    pixels += (np.median(pixels, axis=(0, 1)) - pixels) * np.clip(outside, 0.0, 1.0)
    return Image.fromarray(np.uint8(np.clip(np.rint(pixels), 0, 255)), "RGB")


def ffhq_align(photo: Image.Image, landmarks: np.ndarray, size: int) -> Image.Image:
    """The size × size FFHQ-aligned face of `photo` for its 68 landmarks (pixels, x then y)."""
    quad, side = ffhq_quad(landmarks)
    photo = photo.convert("RGB")
    shrink = int(np.floor(side / size * 0.5))
    if shrink > 1:
        photo = photo.resize((int(np.rint(photo.width / shrink)), int(np.rint(photo.height / shrink))), Image.LANCZOS)
        quad, side = quad / shrink, side / shrink
    border = max(int(np.rint(side * 0.1)), 3)
    x0, y0, x1, y1 = _bounds(quad)
    crop = (max(x0 - border, 0), max(y0 - border, 0), min(x1 + border, photo.width), min(y1 + border, photo.height))
    if crop[2] - crop[0] < photo.width or crop[3] - crop[1] < photo.height:
        photo = photo.crop(crop)
        quad = quad - crop[:2]
    x0, y0, x1, y1 = _bounds(quad)
    pad = (max(border - x0, 0), max(border - y0, 0), max(x1 - photo.width + border, 0), max(y1 - photo.height + border, 0))
    if max(pad) > border - 4:
        pad = tuple(int(v) for v in np.maximum(pad, int(np.rint(side * 0.3))))
        photo = _soft_padding(photo, pad, side)
        quad = quad + pad[:2]
    aligned = photo.transform((TRANSFORM_SIZE, TRANSFORM_SIZE), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR)
    return aligned.resize((size, size), Image.LANCZOS) if size < TRANSFORM_SIZE else aligned
