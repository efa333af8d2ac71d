"""DECA's coarse encoder `E_flame` (github.com/yfeng95/DECA, `decalib/models/encoders.py`).

`ResnetEncoder(outsize=236)`: a ResNet-50 trunk without its classifier (2048-d feature after a 7 × 7
average pool) and an MLP 2048 → 1024 → ReLU → 236. DECA's trunk (`decalib/models/resnet.py`) is a
copy of torchvision's ResNet-50 with the `fc` removed; torchvision's `resnet50(weights=None)` with
`fc = Identity` has exactly its state-dict keys, shapes and order (pinned by
`tests/data/deca_encoder_layout.tsv`), and on a 224 × 224 input its adaptive pool equals DECA's
`AvgPool2d(7)`. No ImageNet weights are downloaded: the trunk only ever holds the user's
`deca_model.tar` weights.

Loading is strict: DECA's own `copy_state_dict` silently skips keys it does not know, which would
score with a half-random encoder; `load_deca_encoder` refuses any layout but the reference one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image
from skimage.transform import estimate_transform, warp

from caphuman_bench.errors import BenchError
from caphuman_bench.weights import load_torch_file

CODE_SIZE = 236
CROP_SIZE = 224
CROP_SCALE = 1.25  # DECA TestData(scale=1.25)
BBOX_CENTRE_SHIFT = 0.12  # DECA bbox2point(type='bbox'): the centre moves down 12 % of the box size

# decalib/deca.py `param_dict` order: name -> (start, stop).
CODE_SLICES: dict[str, tuple[int, int]] = {
    "shape": (0, 100),
    "tex": (100, 150),
    "exp": (150, 200),
    "pose": (200, 206),  # global rotation (3) + jaw (3), axis-angle
    "cam": (206, 209),  # orthographic scale, tx, ty
    "light": (209, 236),  # 9 spherical-harmonics bands × RGB
}

# A face box detector: RGB image -> [x1, y1, x2, y2] in pixels, or None when it finds no face.
BoxDetector = Callable[[Image.Image], "Sequence[float] | None"]


class DecaEncoder(torch.nn.Module):
    """DECA `E_flame`: image crop [B, 3, 224, 224] in [0, 1] → code [B, 236]."""

    def __init__(self) -> None:
        super().__init__()
        trunk = torchvision.models.resnet50(weights=None)
        trunk.fc = torch.nn.Identity()
        self.encoder = trunk
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(2048, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, CODE_SIZE),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (CROP_SIZE, CROP_SIZE):
            raise ValueError(f"DECA's encoder takes {CROP_SIZE}x{CROP_SIZE} crops, got {tuple(images.shape[-2:])}")
        return self.layers(self.encoder(images))


def decompose(code: torch.Tensor) -> dict[str, torch.Tensor]:
    """Slice codes [B, 236] into DECA's groups; light becomes [B, 9, 3] as in `decompose_code`."""
    if code.ndim != 2 or code.shape[1] != CODE_SIZE:
        raise ValueError(f"expected DECA codes [B, {CODE_SIZE}], got {tuple(code.shape)}")
    parts = {name: code[:, start:stop] for name, (start, stop) in CODE_SLICES.items()}
    parts["light"] = parts["light"].reshape(code.shape[0], 9, 3)
    return parts


def layout_differences(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between a state dict and the expected one (empty when equal)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {list(state_dict[k].shape)} {state_dict[k].dtype} (expected {list(v.shape)} {v.dtype})"
        for k, v in expected.items()
        if k in state_dict and (tuple(state_dict[k].shape) != tuple(v.shape) or state_dict[k].dtype != v.dtype)
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shape/dtype", mismatched)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", … ({len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    return problems


def encoder_from_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> DecaEncoder:
    """A `DecaEncoder` holding `state_dict`, only if it has exactly the reference layout.

    The model is built on the meta device and takes the given tensors (`assign=True`), so no
    throw-away random initialisation of 25.9 M numbers happens first.
    """
    with torch.device("meta"):
        encoder = DecaEncoder()
    problems = layout_differences(state_dict, encoder.state_dict())
    if problems:
        raise BenchError(f"{source}: not DECA's E_flame layout (ResnetEncoder(outsize=236)); " + "; ".join(problems))
    encoder.load_state_dict(state_dict, strict=True, assign=True)
    return encoder


def load_deca_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> DecaEncoder:
    """DECA's `E_flame` from the user's `deca_model.tar`, in eval mode on `device`.

    The file is a torch-saved dict of state dicts (`E_flame`, `E_detail`, `D_detail`); it is read
    with `weights_only=True`, so nothing but tensors and containers is unpickled.
    """
    path = Path(path)
    checkpoint = load_torch_file(path, "DECA checkpoint")
    if not isinstance(checkpoint, dict) or "E_flame" not in checkpoint:
        entries = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise BenchError(f"{path}: no entry 'E_flame' (found: {entries})")
    encoder = encoder_from_state_dict(dict(checkpoint["E_flame"]), f"{path} [E_flame]")
    return encoder.eval().to(device)


def deca_crop(image: Image.Image, box: Sequence[float]) -> torch.Tensor:
    """DECA's test-time crop of a detector box: tensor [3, 224, 224], RGB in [0, 1].

    As `decalib/datasets/datasets.py` `TestData` with a bounding-box detector (`bbox2point(type='bbox')`):
    size = (w + h) / 2, centre = box centre moved down by 0.12 · size, a square of side
    int(1.25 · size) mapped by a similarity onto [0, 223]², bilinear (skimage `warp`, order 1),
    zeros outside the image, no mean / std.
    """
    left, top, right, bottom = (float(v) for v in box[:4])
    old_size = (right - left + bottom - top) / 2
    centre = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0 + old_size * BBOX_CENTRE_SHIFT])
    size = int(old_size * CROP_SCALE)
    src_pts = np.array([
        [centre[0] - size / 2, centre[1] - size / 2],
        [centre[0] - size / 2, centre[1] + size / 2],
        [centre[0] + size / 2, centre[1] - size / 2],
    ])
    # Only the square (plus the bilinear neighbours) is converted to float: an 8k photo stays cheap.
    # Cropping at image bounds keeps DECA's zero padding outside the photo exactly.
    x0, y0 = (max(int(np.floor(c - size / 2)) - 2, 0) for c in centre)
    x1 = min(int(np.ceil(centre[0] + size / 2)) + 3, image.width)
    y1 = min(int(np.ceil(centre[1] + size / 2)) + 3, image.height)
    if x1 <= x0 or y1 <= y0:
        return torch.zeros(3, CROP_SIZE, CROP_SIZE)
    dst_pts = np.array([[0, 0], [0, CROP_SIZE - 1], [CROP_SIZE - 1, 0]])
    transform = estimate_transform("similarity", src_pts - [x0, y0], dst_pts)
    pixels = np.asarray(image.convert("RGB").crop((x0, y0, x1, y1)), dtype=np.float64) / 255.0
    cropped = warp(pixels, transform.inverse, output_shape=(CROP_SIZE, CROP_SIZE))
    return torch.from_numpy(cropped.transpose(2, 0, 1).copy()).float()


@torch.no_grad()
def encode_crops(encoder: DecaEncoder, crops: torch.Tensor, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Codes of crops [N, 3, 224, 224], decomposed, one numpy dict per crop (light as [9, 3])."""
    device = next(encoder.parameters()).device
    codes = torch.cat([encoder(crops[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(crops), batch_size)])
    parts = decompose(codes)
    return [{name: value[i].numpy() for name, value in parts.items()} for i in range(len(crops))]


def encode_images(
    encoder: DecaEncoder, images: list[Image.Image], detector: BoxDetector, batch_size: int = 16
) -> list[dict[str, np.ndarray] | None]:
    """DECA codes of images (box from `detector` → DECA crop → E_flame); None where no face was found."""
    boxes = [detector(image) for image in images]
    found = [i for i, box in enumerate(boxes) if box is not None]
    results: list[dict[str, np.ndarray] | None] = [None] * len(images)
    if found:
        crops = torch.stack([deca_crop(images[i], boxes[i]) for i in found])
        for i, code in zip(found, encode_crops(encoder, crops, batch_size)):
            results[i] = code
    return results


def mtcnn_box_detector(device: str | torch.device = "cpu", weights_dir: str | os.PathLike | None = None) -> BoxDetector:
    """The scoring pass's MTCNN (`caphuman_bench.faces.detection`) as a `BoxDetector`: the most confident face."""
    from caphuman_bench.faces.detection import detect_faces

    def box(image: Image.Image) -> Sequence[float] | None:
        (detection,) = detect_faces([image], device, weights_dir)
        return None if detection is None else detection.box

    return box
