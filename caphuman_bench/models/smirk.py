"""SMIRK's encoder (Retsinas et al., CVPR 2024) as the reconstructor `smirk`.

Followed: github.com/georgeretsi/smirk at c7de404c4389f073906a6db1adabf62efcea3f35, `src/smirk_encoder.py`
(the network), `demo.py` (test-time crop and input), `src/FLAME/FLAME.py` (how the outputs pose FLAME),
`src/base_trainer.py` `save_model` (the checkpoint's layout).

Network: three encoders read the same 224² crop, each a timm MobileNetV3 trunk (`features_only`), the
global average of its last feature map and one linear layer:
- `pose_encoder`: `tf_mobilenetv3_small_minimal_100` → 6 = global rotation (3, axis-angle) + cam (3:
  orthographic scale, tx, ty, as `src/renderer/util.py` `batch_orth_proj` reads it);
- `shape_encoder`: `tf_mobilenetv3_large_minimal_100` → 300 FLAME shape components (MICA's 300; the
  registry keeps FLAME's first 100);
- `expression_encoder`: `tf_mobilenetv3_large_minimal_100` → 55 = 50 expression, 2 eyelid blendshape
  weights clamped to [0, 1], and the jaw as axis-angle [relu(a), clamp(b, ±0.2), clamp(c, ±0.2)] — a jaw
  that opens (x ≥ 0) and moves a little sideways. FLAME.py poses FLAME with [global, neck (fixed 0), jaw,
  eyes (fixed)], so the registry's 6-d pose is [global, jaw] as DECA's.
The eyelids are SMIRK's own blendshapes, outside FLAME's groups: `SmirkEncoder` returns them, the
registry's code does not. No lighting is estimated.

Input (demo.py `--crop`): MediaPipe's face landmarks; the square around their box — centre the box's,
side `int((w + h) / 2 · 1.4)` — mapped onto [0, 223]² by a similarity (`crop_face`, DECA's square rule
with 1.4 and no landmark-box growth, so `DecaSquare` computes it); skimage `warp` of the uint8 photo
(bilinear, zeros outside, `preserve_range=True`) cast back to uint8 (truncated); RGB / 255. No
mean/std normalisation, although the trunks are ImageNet MobileNets.

Deviation, named: the landmarks come from MediaPipe's legacy face mesh (`faces/face_mesh.py`, bundled in
the wheel) rather than the Tasks `FaceLandmarker` with `face_landmarker.task` (a separate download), with
its 468 points rather than 478 (the 10 iris points lie inside the eye contours and never set the box) and
detection confidence 0.5 rather than 0.1. From the landmarks on, crop and codes are what the authors' code
computes (`tests/data/smirk/`, `caphuman-bench conformance smirk`).

Checkpoint `SMIRK_em1.pt`: one flat state dict of `smirk_encoder.*` (this encoder) and `smirk_generator.*`
(the image-to-image generator used in training and the demo's optional re-rendering, not read here).
The demo strips `smirk_encoder.`; `load_smirk_encoder` reads those keys strictly and refuses any other
prefix. The trunks are built with `pretrained=False`: no ImageNet weights are downloaded (the authors'
`create_backbone` fetches them, then the checkpoint overwrites them).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.transform import warp
from torch import nn

from caphuman_bench.errors import BenchError
from caphuman_bench.models.deca_encoder import DecaSquare, layout_differences
from caphuman_bench.models.reconstructors import (
    Reconstructor,
    ReconstructorInfo,
    _path,
    checked_code,
    register_reconstructor,
)
from caphuman_bench.parallel import thread_map
from caphuman_bench.weights import load_once, load_torch_file

SOURCE = "github.com/georgeretsi/smirk c7de404c4389f073906a6db1adabf62efcea3f35"
CROP_SIZE = 224
CROP_SCALE = 1.4  # demo.py crop_face(..., scale=1.4, image_size=224)
N_SHAPE, N_EXP, N_EYELID = 300, 50, 2  # configs/config_train.yaml arch.num_shape / num_expression; two eyelids
JAW_SIDEWAYS_LIMIT = 0.2  # |jaw y|, |jaw z| ≤ 0.2 rad (src/smirk_encoder.py ExpressionEncoder.forward)
CAM_SCALE_INIT = 7.0  # the initial orthographic scale of PoseEncoder.init_weights (src/smirk_encoder.py); the tiny model keeps it
POSE_BACKBONE = "tf_mobilenetv3_small_minimal_100"
LARGE_BACKBONE = "tf_mobilenetv3_large_minimal_100"
ENCODER_PREFIX, GENERATOR_PREFIX = "smirk_encoder.", "smirk_generator."
OUTPUTS = ("pose_params", "cam", "shape_params", "expression_params", "eyelid_params", "jaw_params")  # the authors' names


class SmirkBranch(nn.Module):
    """One of SMIRK's encoders: MobileNetV3 trunk → global average of its last feature map → one linear layer
    (named `head_name`, inside an `nn.Sequential` as in the checkpoint's keys)."""

    def __init__(self, backbone: str, head_name: str, outputs: int) -> None:
        super().__init__()
        import timm

        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True)
        self.head_name = head_name
        self.add_module(head_name, nn.Sequential(nn.Linear(self.encoder.feature_info[-1]["num_chs"], outputs)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.adaptive_avg_pool2d(self.encoder(images)[-1], (1, 1)).flatten(1)
        return self.get_submodule(self.head_name)(features)


class SmirkEncoder(nn.Module):
    """SMIRK's `SmirkEncoder(n_exp=50, n_shape=300)`: crops [B, 3, 224, 224], RGB in [0, 1] → the six outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.pose_encoder = SmirkBranch(POSE_BACKBONE, "pose_cam_layers", 6)
        self.shape_encoder = SmirkBranch(LARGE_BACKBONE, "shape_layers", N_SHAPE)
        self.expression_encoder = SmirkBranch(LARGE_BACKBONE, "expression_layers", N_EXP + N_EYELID + 3)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, CROP_SIZE, CROP_SIZE):
            raise ValueError(f"SMIRK's encoder takes crops [B, 3, {CROP_SIZE}, {CROP_SIZE}], got {list(images.shape)}")
        pose_cam = self.pose_encoder(images)
        expression = self.expression_encoder(images)
        jaw = expression[:, N_EXP + N_EYELID:]
        return {
            "pose_params": pose_cam[:, :3],
            "cam": pose_cam[:, 3:],
            "shape_params": self.shape_encoder(images),
            "expression_params": expression[:, :N_EXP],
            "eyelid_params": expression[:, N_EXP:N_EXP + N_EYELID].clamp(0, 1),
            "jaw_params": torch.cat([F.relu(jaw[:, :1]), jaw[:, 1:].clamp(-JAW_SIDEWAYS_LIMIT, JAW_SIDEWAYS_LIMIT)], dim=1),
        }


def flame_codes(outputs: Mapping[str, torch.Tensor]) -> list[dict[str, np.ndarray]]:
    """The registry's FLAME groups per face: shape (first 100), exp, pose = [global, jaw], cam."""
    parts = {name: value.detach().float().cpu().numpy() for name, value in outputs.items()}
    pose = np.concatenate([parts["pose_params"], parts["jaw_params"]], axis=1)
    return [checked_code({"shape": parts["shape_params"][i], "exp": parts["expression_params"][i], "pose": pose[i],
                          "cam": parts["cam"][i]}, "smirk") for i in range(len(pose))]


def encoder_layout() -> dict[str, torch.Tensor]:
    """The encoder's state dict on the meta device: names, shapes and dtypes, nothing allocated."""
    with torch.device("meta"):
        return SmirkEncoder().state_dict()


def encoder_from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str) -> SmirkEncoder:
    """A `SmirkEncoder` holding `state_dict` (no prefix), only if it has exactly the reference layout."""
    with torch.device("meta"):
        encoder = SmirkEncoder()
    problems = layout_differences(dict(state_dict), encoder.state_dict())
    if problems:
        raise BenchError(f"{source}: not SMIRK's encoder layout (SmirkEncoder(n_exp=50, n_shape=300)); " + "; ".join(problems))
    encoder.load_state_dict(dict(state_dict), strict=True, assign=True)
    return encoder.eval()


def encoder_state_of_checkpoint(checkpoint: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    """The `smirk_encoder.` entries of a SMIRK checkpoint, prefix removed; any key that is neither the
    encoder's nor the generator's is refused (a file of another layout, not a release)."""
    foreign = [k for k in checkpoint if not (isinstance(k, str) and k.startswith((ENCODER_PREFIX, GENERATOR_PREFIX)))]
    if foreign:
        shown = ", ".join(map(str, foreign[:5])) + (f", … ({len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise BenchError(f"{source}: not a SMIRK checkpoint (keys other than smirk_encoder.* / smirk_generator.*: {shown})")
    state = {k[len(ENCODER_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(ENCODER_PREFIX)}
    if not state:
        raise BenchError(f"{source}: not a SMIRK checkpoint (no smirk_encoder.* keys)")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchError(f"{source}: not a SMIRK checkpoint (smirk_encoder.* entries that are not tensors)")
    return state


def load_smirk_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> SmirkEncoder:
    """SMIRK's encoder from `SMIRK_em1.pt` (read with `weights_only=True`), in eval mode on `device`;
    loaded once per process, file and device."""
    path = Path(path)

    def build() -> SmirkEncoder:
        checkpoint = load_torch_file(path, "SMIRK checkpoint")
        return encoder_from_state_dict(encoder_state_of_checkpoint(checkpoint, str(path)), str(path)).to(device)

    return load_once("smirk_encoder", path, device, build)


def crop_square(landmarks: np.ndarray) -> DecaSquare:
    """demo.py `crop_face(frame, landmarks, scale=1.4)`: centre of the landmarks' box, side int(mean side · 1.4)."""
    points = np.asarray(landmarks, dtype=np.float64)[:, :2]
    left, top = points.min(axis=0)
    right, bottom = points.max(axis=0)
    old_size = (right - left + bottom - top) / 2
    return DecaSquare((float(right - (right - left) / 2.0), float(bottom - (bottom - top) / 2.0)), int(old_size * CROP_SCALE))


def smirk_crop(image: Image.Image, landmarks: np.ndarray) -> np.ndarray:
    """demo.py's crop: [224, 224, 3] uint8 RGB (skimage bilinear warp of the uint8 photo, zeros outside,
    `preserve_range=True`, then `.astype(np.uint8)`, which truncates)."""
    rgb = np.asarray(image.convert("RGB"))
    inverse = np.linalg.inv(crop_square(landmarks).tform)  # skimage's own `tform.inverse`
    return warp(rgb, inverse, output_shape=(CROP_SIZE, CROP_SIZE), preserve_range=True).astype(np.uint8)


def crops_to_tensor(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 crops [224, 224, 3] → [N, 3, 224, 224] float32 in [0, 1], as demo.py (`.float() / 255.0`)."""
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0


@register_reconstructor
class SmirkReconstructor(Reconstructor):
    """SMIRK's encoder on its own MediaPipe crop."""

    info = ReconstructorInfo(
        name="smirk", title="SMIRK (Retsinas et al., CVPR 2024)", weights=("smirk",), crop="own",
        groups=("shape", "exp", "pose", "cam"),
        source=f"{SOURCE} src/smirk_encoder.py, demo.py",
        licence="SMIRK: MIT (the repository's; the checkpoint states none of its own); its codes are FLAME "
                "parameters, meshes need FLAME (non-commercial research, registration at flame.is.tue.mpg.de)")

    def __init__(self, encoder: SmirkEncoder, fingerprint: str, batch_size: int = 16) -> None:
        self.encoder, self._fingerprint, self.batch_size = encoder, fingerprint, batch_size
        self._reader = None

    @classmethod
    def from_weights(cls, paths, device="cpu"):
        path = _path(paths, "smirk", cls.info.name)
        return cls(load_smirk_encoder(path, device), f"smirk:{path.resolve()}")

    @classmethod
    def tiny(cls, seed=0, device="cpu"):
        return cls(tiny_smirk_encoder(seed).to(device), f"smirk:tiny-{seed}")

    def landmarks(self, image: Image.Image) -> np.ndarray | None:
        """MediaPipe's face-mesh points in pixels (x, y, z), None without a face."""
        if self._reader is None:
            from caphuman_bench.faces.face_mesh import FaceMeshReader

            self._reader = FaceMeshReader()
        return self._reader.pixel_landmarks(image)

    @torch.no_grad()
    def outputs(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoder's six outputs (the authors' names) for crops [N, 3, 224, 224] in [0, 1], on the CPU."""
        device = next(self.encoder.parameters()).device
        batches = [self.encoder(crops[i:i + self.batch_size].to(device)) for i in range(0, len(crops), self.batch_size)]
        return {name: torch.cat([b[name].float().cpu() for b in batches]) for name in OUTPUTS}

    def encode_smirk_crops(self, crops: torch.Tensor) -> list[dict[str, np.ndarray]]:
        """Codes of crops already made by SMIRK's rule ([N, 3, 224, 224], RGB in [0, 1])."""
        return flame_codes(self.outputs(crops)) if len(crops) else []

    def encode_images(self, images):
        points = [self.landmarks(image) for image in images]
        found = [i for i, p in enumerate(points) if p is not None]
        codes: list[dict[str, np.ndarray] | None] = [None] * len(images)
        crops = thread_map(lambda i: smirk_crop(images[i], points[i]), found)
        for i, code in zip(found, self.encode_smirk_crops(crops_to_tensor(crops)) if found else []):
            codes[i] = code
        return codes

    def fingerprint(self):
        return self._fingerprint


def _random_value(key: str, shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A seeded value by the parameter's role: batch-norm statistics and scales near their trained ranges
    (so a port that skips them differs), biases small, other weights N(0, 1/fan_in)."""
    leaf = key.rsplit(".", 1)[-1]
    if dtype == torch.int64:  # num_batches_tracked
        return torch.zeros(shape, dtype=dtype)
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=generator)
    if leaf in ("running_mean", "bias"):
        return 0.1 * torch.randn(shape, generator=generator)
    if len(shape) == 1:  # batch-norm scale
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))


def random_smirk_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A `SMIRK_em1.pt`-layout state dict (`smirk_encoder.*`, float32) with seeded random values, drawn in
    the encoder's key order: the same seed gives the same tensors on any machine. The release's
    `smirk_generator.*` entries are not written (nothing here reads them)."""
    generator = torch.Generator().manual_seed(seed)
    return {ENCODER_PREFIX + key: _random_value(key, list(value.shape), value.dtype, generator)
            for key, value in encoder_layout().items()}


def write_random_smirk_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """`random_smirk_checkpoint(seed)` saved as the release file is (`torch.save` of the flat dict)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_smirk_checkpoint(seed), path)
    return path


def tiny_smirk_encoder(seed: int = 0, head_scale: float = 0.01) -> SmirkEncoder:
    """The smoke model: SMIRK's architecture with seeded random weights, the three heads scaled by
    `head_scale` so codes stay near FLAME's neutral, and the authors' initial camera scale (bias 7)."""
    state = {k[len(ENCODER_PREFIX):]: v for k, v in random_smirk_checkpoint(seed).items()}
    for head in ("pose_encoder.pose_cam_layers.0", "shape_encoder.shape_layers.0", "expression_encoder.expression_layers.0"):
        state[f"{head}.weight"] *= head_scale
        state[f"{head}.bias"] *= head_scale
    state["pose_encoder.pose_cam_layers.0.weight"][3] = 0.0
    state["pose_encoder.pose_cam_layers.0.bias"][3] = CAM_SCALE_INIT
    return encoder_from_state_dict(state, f"smirk tiny (seed {seed})")


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in key order: which weights a vector file was made with."""
    digest = hashlib.sha256()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
