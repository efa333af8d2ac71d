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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image
from skimage.transform import estimate_transform, resize, warp

from caphuman_bench.errors import BenchError
from caphuman_bench.images import to_rgb
from caphuman_bench.models.reconstructors import Reconstructor, ReconstructorInfo, register_reconstructor
from caphuman_bench.parallel import thread_map
from caphuman_bench.weights import load_once, load_torch_file

CODE_SIZE = 236
CROP_SIZE = 224
CROP_SCALE = 1.25  # DECA TestData(scale=1.25)
BBOX_CENTRE_SHIFT = 0.12  # DECA bbox2point(type='bbox'): the centre moves down 12 % of the box size
KPT68_SIZE_FACTOR = 1.1  # DECA bbox2point(type='kpt68'): the landmark box's mean side grows by 10 %
SQUARE_KINDS = ("bbox", "kpt68")
_CROP_CORNERS = np.array([[0, 0], [0, CROP_SIZE - 1], [CROP_SIZE - 1, 0]])  # where a square's corners land

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
    with `weights_only=True`, so nothing but tensors and containers is unpickled. Loaded once per
    process and device (`weights.load_once`): the encoder is shared, never changed by its users.
    """
    path = Path(path)

    def build() -> DecaEncoder:
        checkpoint = load_torch_file(path, "DECA checkpoint")
        if not isinstance(checkpoint, dict) or "E_flame" not in checkpoint:
            entries = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise BenchError(f"{path}: no entry 'E_flame' (found: {entries})")
        return encoder_from_state_dict(dict(checkpoint["E_flame"]), f"{path} [E_flame]").eval().to(device)

    return load_once("deca_encoder", path, device, build)


@dataclass(frozen=True)
class DecaSquare:
    """The square of a photo DECA crops: centre (x, y) and side `int(old_size · 1.25)` in photo pixels."""

    centre: tuple[float, float]
    side: int

    @property
    def tform(self) -> np.ndarray:
        """DECA's `tform.params` (3 × 3): photo pixel (x, y, 1) → crop pixel, the similarity skimage's
        `estimate_transform` fits from the square's corners to [0, 223]² (a scale and a shift)."""
        return _square_transform(self).params


def bbox2point(left: float, right: float, top: float, bottom: float, kind: str) -> DecaSquare:
    """DECA's `TestData.bbox2point` then `size = int(old_size * scale)` (decalib/datasets/datasets.py).

    kind 'bbox' (a detector box): old_size = (w + h) / 2, centre = box centre moved down 0.12 · old_size;
    kind 'kpt68' (the box of 68 landmarks, DECA's FAN default and CapHuman's): old_size = (w + h) / 2 · 1.1,
    centre = the landmark box's centre. Either way side = int(1.25 · old_size).
    """
    if kind not in SQUARE_KINDS:
        raise ValueError(f"DECA crop kind {kind!r} is not one of {', '.join(SQUARE_KINDS)}")
    old_size = (right - left + bottom - top) / 2
    centre_y = bottom - (bottom - top) / 2.0
    if kind == "kpt68":
        old_size *= KPT68_SIZE_FACTOR
    else:
        centre_y += old_size * BBOX_CENTRE_SHIFT
    return DecaSquare((float(right - (right - left) / 2.0), float(centre_y)), int(old_size * CROP_SCALE))


def landmark_square(landmarks: np.ndarray) -> DecaSquare:
    """The kpt68 square of 68 landmarks (x, y): DECA's FAN path, `bbox2point(min/max of the points, 'kpt68')`."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    return bbox2point(points[:, 0].min(), points[:, 0].max(), points[:, 1].min(), points[:, 1].max(), "kpt68")


def no_face_square(width: int, height: int, kind: str) -> DecaSquare:
    """DECA's fallback when its detector finds nothing: `left = 0; right = h-1; top = 0; bottom = w-1`
    (height and width swapped, as in TestData — equal for CapHuman's square 512² input), with the
    detector's own kind (FAN reports 'kpt68' even without a face)."""
    return bbox2point(0, height - 1, 0, width - 1, kind)


def _square_transform(square: DecaSquare, offset: tuple[float, float] = (0.0, 0.0)):
    """The similarity from the square's corners (photo pixels, less `offset`) onto [0, 223]²."""
    (cx, cy), half = square.centre, square.side / 2
    corners = np.array([[cx - half, cy - half], [cx - half, cy + half], [cx + half, cy - half]]) - offset
    return estimate_transform("similarity", corners, _CROP_CORNERS)


def box_square(box: Sequence[float]) -> DecaSquare:
    """DECA's square of a detector box (x1, y1, x2, y2): `bbox2point(type='bbox')`."""
    left, top, right, bottom = (float(v) for v in box[:4])
    return bbox2point(left, right, top, bottom, "bbox")


def deca_crop(image: Image.Image, box: Sequence[float]) -> torch.Tensor:
    """DECA's test-time crop of a detector box; see `deca_crop_square`."""
    return deca_crop_square(image, box_square(box))


def deca_crop_square(image: Image.Image, square: DecaSquare) -> torch.Tensor:
    """DECA's test-time crop of one photo: tensor [3, 224, 224], RGB in [0, 1] (see `deca_crops`)."""
    return deca_crops([image], [square])[0]


def deca_crops(images: Sequence[Image.Image], squares: Sequence[DecaSquare], device: str | torch.device = "cpu") -> torch.Tensor:
    """DECA's test-time crops: [N, 3, 224, 224] float32 on the CPU, RGB in [0, 1].

    As `decalib/datasets/datasets.py` `TestData`: `warp(image / 255., tform.inverse, output_shape=(224, 224))`
    with skimage's defaults (bilinear, zeros outside the photo, output clipped to the photo's range),
    the square mapped onto [0, 223]² by a similarity. On the CPU skimage's warp itself, photo by photo
    on the host pool; on a GPU its arithmetic step for step in float64 torch operations, all crops of
    a size at once (skimage costs about 5 ms of host time per crop, the scoring pass's largest
    per-image host cost). Against skimage's warp of the whole photo the GPU path is equal to the bit,
    the host path within 1e-6 (it warps the square's region, whose coordinates round differently).
    """
    if torch.device(device).type == "cpu":
        return torch.stack(thread_map(lambda pair: _skimage_crop(*pair), zip(images, squares)))
    out = torch.empty(len(images), 3, CROP_SIZE, CROP_SIZE)
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.size, []).append(index)
    for members in by_size.values():
        pixels = torch.from_numpy(np.stack([np.asarray(to_rgb(images[i])) for i in members])).to(device)
        inverse = np.stack([_square_transform(squares[i]).inverse.params for i in members])
        out[members] = _bilinear_warp(pixels, torch.from_numpy(inverse).to(device)).float().cpu()
    return out


def _skimage_crop(image: Image.Image, square: DecaSquare) -> torch.Tensor:
    """skimage's warp of the square's pixels (plus the bilinear neighbours) only, so an 8k photo stays
    cheap; the region stops at the photo's edges, so outside it is zero as in the whole-photo warp,
    and the clip uses the whole photo's range as there."""
    (cx, cy), size = square.centre, square.side
    x0, y0 = (max(int(np.floor(c - size / 2)) - 2, 0) for c in (cx, cy))
    x1 = min(int(np.ceil(cx + size / 2)) + 3, image.width)
    y1 = min(int(np.ceil(cy + size / 2)) + 3, image.height)
    if x1 <= x0 or y1 <= y0:
        return torch.zeros(3, CROP_SIZE, CROP_SIZE)
    transform = _square_transform(square, (x0, y0))
    rgb = np.asarray(to_rgb(image))
    warped = warp(rgb[y0:y1, x0:x1] / 255.0, transform.inverse, output_shape=(CROP_SIZE, CROP_SIZE), clip=False)
    scale = torch.tensor(255.0, dtype=torch.float64)
    clipped = _clip_as_skimage(torch.from_numpy(warped.transpose(2, 0, 1))[None], torch.tensor([rgb.min()]) / scale,
                               torch.tensor([rgb.max()]) / scale)
    return clipped[0].float()


def _bilinear_warp(pixels: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """skimage `warp(pixels / 255., inverse, output_shape=(224, 224))` of uint8 images [B, H, W, C] with
    3 × 3 output → input matrices [B, 3, 3] (float64): [B, C, 224, 224] float64.

    `_warp_fast`: output pixel (col x, row y) → input (c, r) = M · (x, y, 1) (divided by the third
    row unless it is (0, 0, 1)); bilinear between the floor and ceil neighbours, 0 outside the image;
    then `_clip_warp_output`. The divisor 255 is a device tensor: CUDA divides by a host scalar as a
    multiplication by its reciprocal, which rounds differently."""
    batch, height, width, channels = pixels.shape
    scale = torch.tensor(255.0, dtype=torch.float64, device=pixels.device)
    rows, cols = torch.meshgrid(*(torch.arange(CROP_SIZE, dtype=torch.float64, device=pixels.device),) * 2, indexing="ij")
    m = inverse.reshape(batch, 9, 1, 1)
    c = m[:, 0] * cols + m[:, 1] * rows + m[:, 2]
    r = m[:, 3] * cols + m[:, 4] * rows + m[:, 5]
    affine = (inverse[:, 2, 0] == 0) & (inverse[:, 2, 1] == 0) & (inverse[:, 2, 2] == 1)
    if not bool(affine.all()):
        z = m[:, 6] * cols + m[:, 7] * rows + m[:, 8]
        keep = affine[:, None, None]
        c, r = torch.where(keep, c, c / z), torch.where(keep, r, r / z)
    flat = pixels.reshape(batch, height * width, channels)

    def at(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:  # [B, 224², C], 0 outside the image
        inside = ((row >= 0) & (row < height) & (col >= 0) & (col < width)).reshape(batch, -1, 1)
        index = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1)).long().reshape(batch, -1, 1)
        values = torch.gather(flat, 1, index.expand(-1, -1, channels)).double() / scale
        return torch.where(inside, values, 0.0)

    r0, c0, r1, c1 = r.floor(), c.floor(), r.ceil(), c.ceil()
    dr, dc = (r - r0).reshape(batch, -1, 1), (c - c0).reshape(batch, -1, 1)
    top = (1 - dc) * at(r0, c0) + dc * at(r0, c1)
    bottom = (1 - dc) * at(r1, c0) + dc * at(r1, c1)
    warped = ((1 - dr) * top + dr * bottom).reshape(batch, CROP_SIZE, CROP_SIZE, channels).permute(0, 3, 1, 2)
    return _clip_as_skimage(warped, pixels.amin(dim=(1, 2, 3)).double() / scale, pixels.amax(dim=(1, 2, 3)).double() / scale)


def _clip_as_skimage(warped: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """skimage's `_clip_warp_output` (clip=True, constant 0) per image of [B, C, H, W]: clipped to the
    input's [low, high], widened to 0 when 0 lies outside it but inside the output's range."""
    widen = ((low > 0) | (high < 0)) & (warped.amin(dim=(1, 2, 3)) <= 0) & (warped.amax(dim=(1, 2, 3)) >= 0)
    low, high = torch.where(widen, low.clamp(max=0), low), torch.where(widen, high.clamp(min=0), high)
    return warped.clamp(min=low[:, None, None, None], max=high[:, None, None, None])


def resize_as_testdata(image: Image.Image, size: int) -> Image.Image:
    """CapHuman's `TestData(size=image_resolution)` resize of a photo before DECA sees it
    (VamosC/CapHuman libs/decalib/datasets/datasets.py): `skimage.transform.resize(im, (size, size),
    anti_aliasing=True)` — the aspect ratio is not kept — then `(· 255).astype(np.uint8)`, i.e. truncated,
    not rounded."""
    pixels = np.asarray(image.convert("RGB"))
    resized = resize(pixels, (size, size), anti_aliasing=True)
    return Image.fromarray((resized * 255.0).astype(np.uint8), mode="RGB")


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
        crops = deca_crops([images[i] for i in found], [box_square(boxes[i]) for i in found])
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



@register_reconstructor
class DecaReconstructor(Reconstructor):
    """DECA's coarse encoder `E_flame` on DECA's test-time crop: the paper's reconstructor."""

    info = ReconstructorInfo(
        name="deca", title="DECA (Feng et al., SIGGRAPH 2021)", weights=("deca_model",), crop="deca",
        groups=("shape", "exp", "pose", "cam", "light"),
        source="github.com/yfeng95/DECA decalib/deca.py, decalib/models/encoders.py",
        licence="DECA/FLAME licence: non-commercial scientific research, registration at flame.is.tue.mpg.de")

    def __init__(self, encoder: DecaEncoder, fingerprint: str) -> None:
        self.encoder, self._fingerprint = encoder, fingerprint

    @classmethod
    def from_weights(cls, paths, device="cpu"):
        path = Path(paths["deca_model"])
        return cls(load_deca_encoder(path, device), f"deca:{path.resolve()}")

    @classmethod
    def tiny(cls, seed=0, device="cpu"):
        return cls(random_deca_encoder(seed).to(device), f"deca:tiny-{seed}")

    def encode_crops(self, crops):
        return encode_crops(self.encoder, crops)

    def fingerprint(self):
        return self._fingerprint


def random_deca_encoder(seed: int = 0, scale: float = 0.01) -> DecaEncoder:
    """DECA's architecture with seeded random weights whose codes stay near FLAME's neutral (the last layer
    scaled by `scale`): the smoke model, never loaded from or written to a user's weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = DecaEncoder()
        with torch.no_grad():
            encoder.layers[-1].weight.mul_(scale)
            encoder.layers[-1].bias.mul_(scale)
    return encoder.eval()
