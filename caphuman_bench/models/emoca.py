"""EMOCA v2 as a FLAME reconstructor: DECA's coarse encoder plus EMOCA's own expression encoder.

What is followed, from github.com/radekd91/emoca, branch release/EMOCA_v2, commit
fef5472a2fe3c47d8c5ffa56ad13928a790df1ab:

* `gdl/models/DECA.py` `ExpDECA` (the EMOCA class): `E_flame` is DECA's `ResnetEncoder(outsize=236)`,
  frozen; `E_expression` (`expression_backbone: deca_clone`) is a second `ResnetEncoder` of the same
  architecture whose outputs are the 50 expression coefficients, then 3 global-rotation and/or 3
  jaw-rotation numbers where the configuration's `exp_deca_global_pose` / `exp_deca_jaw_pose` say so
  (`_reconfigure`). `decompose_code` takes shape, texture, camera, light and every pose part
  `E_expression` does not give from `E_flame`, sliced as DECA slices it. `gdl/models/DecaEncoder.py`
  `ResnetEncoder` and `gdl/models/ResNet.py` are DECA's encoder (a torchvision ResNet-50 trunk without
  its classifier, MLP 2048 → 1024 → outsize): `deca_encoder.DecaEncoder` with another last layer.
* Test-time crop: `gdl/datasets/ImageTestDataset.py` `TestData` (FAN's 68 landmarks, or a landmark file;
  `ImageDatasetHelpers.bbox2point` type 'kpt68'; scale 1.25; 224²; `warp(image / 255., ...)`) is DECA's,
  so `info.crop == "deca"`: callers hand `encode_crops` DECA's crops.
* The release (`gdl_apps/EMOCA/demos/download_assets.sh`, `utils/load.py` `load_model(..., 'detail')`,
  `utils/package_model.py`, `gdl/models/IO.py` `locate_checkpoint(mode='best')`): a folder such as
  `EMOCA_v2_lr_mse_20/` with `cfg.yaml` (OmegaConf, sections `coarse` and `detail`) and
  `detail/checkpoints/**/*.ckpt`, a PyTorch Lightning checkpoint of the whole `DecaModule`. Its
  `state_dict` holds `deca.E_flame.*` and `deca.E_expression.*` (read here) next to the detail networks,
  FLAME buffers and loss networks (`deca.E_detail.*`, `emonet_loss.*`, `lipread_loss.*`, ...), which
  the authors load with `strict=False` and nothing here reads.

Loading is strict where it matters: both encoders' keys, shapes and dtypes must be exactly those of the
configuration's `ExpDECA`, and every other key must belong to one of `DecaModule`'s children; anything
else is a one-line error naming the keys. The checkpoint is read with `torch.load(weights_only=True)`;
the classes and functions a Lightning checkpoint names outside its tensors (callback classes used as
keys, optimiser state helpers) are mapped to an inert stand-in that runs nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from caphuman_bench.errors import BenchError
from caphuman_bench.models.deca_encoder import (
    CODE_SIZE,
    CROP_SIZE,
    DecaEncoder,
    decompose,
    layout_differences,
)
from caphuman_bench.models.reconstructors import (
    Reconstructor,
    ReconstructorInfo,
    _path,
    register_reconstructor,
)
from caphuman_bench.weights import load_once, load_torch_file, tensor_state_dict

WEIGHTS_ID = "emoca_v2"
STAGE = "detail"  # the demos load the detail stage's checkpoint (test_emoca_on_images.py --mode detail)
EXPRESSION_SIZE = 50
DECA_SIZES = {"n_shape": 100, "n_tex": 50, "n_exp": 50, "n_pose": 6, "n_cam": 3, "n_light": 27}
ENCODER_PREFIXES = ("deca.E_flame.", "deca.E_expression.")
# DecaModule's children (gdl/models/DECA.py): what else a release's state_dict may hold, unread here
MODULE_PREFIXES = ("deca.", "emonet_loss.", "au_loss.", "lipread_loss.", "emotion_mlp.")
# ModelCheckpoint(filename='deca-{epoch:02d}-{val_loss/dataloader_idx_0:.8f}') in
# gdl_apps/EMOCA/training/test_and_finetune_deca.py: the '/' makes a folder
CHECKPOINT_NAME = "deca-epoch=00-val_loss/dataloader_idx_0=0.00000000.ckpt"
BATCH_SIZE = 16


@dataclass(frozen=True)
class ExpressionHead:
    """What `E_expression` predicts after the 50 expression coefficients (ExpDECA._reconfigure): the
    global rotation and/or the jaw rotation, 3 axis-angle numbers each, in that order."""

    global_pose: bool
    jaw_pose: bool

    @property
    def size(self) -> int:
        return EXPRESSION_SIZE + 3 * self.global_pose + 3 * self.jaw_pose

    def __str__(self) -> str:
        return "exp" + "_global" * self.global_pose + "_jaw" * self.jaw_pose


# The v2-era training settings (emoca_conf/model/settings/coarse_train_expdeca*.yaml) give E_expression the
# jaw; EMOCA v1's emoca.yaml does not. A release's cfg.yaml decides when it is loaded; this is what
# `tiny` and the random release use.
V2_HEAD = ExpressionHead(global_pose=False, jaw_pose=True)


class ResnetEncoder(DecaEncoder):
    """The authors' `ResnetEncoder(outsize)`: DECA's trunk and MLP, with `outsize` outputs."""

    def __init__(self, outsize: int) -> None:
        super().__init__()
        self.layers[-1] = torch.nn.Linear(1024, outsize)


class EmocaEncoder(torch.nn.Module):
    """ExpDECA's two encoders: crops [B, 3, 224, 224] in [0, 1] → (E_flame code [B, 236], E_expression code)."""

    def __init__(self, head: ExpressionHead) -> None:
        super().__init__()
        self.head = head
        self.E_flame = ResnetEncoder(CODE_SIZE)
        self.E_expression = ResnetEncoder(head.size)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.E_flame(crops), self.E_expression(crops)


def combine_codes(flame_code: torch.Tensor, expression_code: torch.Tensor, head: ExpressionHead) -> dict[str, torch.Tensor]:
    """ExpDECA.decompose_code: DECA's groups from E_flame, then the expression, and the pose parts the
    head predicts, from E_expression (light as [B, 9, 3])."""
    if expression_code.shape[1] != head.size:
        raise ValueError(f"E_expression code of size {expression_code.shape[1]}, the {head} head gives {head.size}")
    parts = decompose(flame_code)
    parts["exp"] = expression_code[:, :EXPRESSION_SIZE]
    predicted = expression_code[:, EXPRESSION_SIZE:]
    deca_pose = parts["pose"]
    if head.global_pose and head.jaw_pose:
        parts["pose"] = predicted
    elif head.global_pose:
        parts["pose"] = torch.cat([predicted, deca_pose[:, 3:]], dim=1)
    elif head.jaw_pose:
        parts["pose"] = torch.cat([deca_pose[:, :3], predicted], dim=1)
    return parts


@torch.no_grad()
def encode_crops(encoder: EmocaEncoder, crops: torch.Tensor, batch_size: int = BATCH_SIZE) -> list[dict[str, np.ndarray]]:
    """EMOCA's codes of DECA crops [N, 3, 224, 224], one numpy dict per crop (DECA's groups, tex included)."""
    device = next(encoder.parameters()).device
    batches = []
    for start in range(0, len(crops), batch_size):
        flame_code, expression_code = encoder(crops[start : start + batch_size].to(device))
        batches.append(combine_codes(flame_code.float().cpu(), expression_code.float().cpu(), encoder.head))
    if not batches:
        return []
    merged = {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}
    return [{name: value[i].numpy() for name, value in merged.items()} for i in range(len(crops))]


# ----------------------------------------------------------------------------------------------
# the release folder


def release_head(folder: Path) -> ExpressionHead:
    """What `cfg.yaml`'s detail stage configures (plain YAML, as OmegaConf.save writes it): refused unless
    it is ExpDECA with a cloned ResNet expression encoder and DECA's code sizes."""
    path = Path(folder) / "cfg.yaml"
    if not path.is_file():
        raise BenchError(f"{path}: missing (an EMOCA release folder holds cfg.yaml and {STAGE}/checkpoints/)")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BenchError(f"{path}: cannot read EMOCA's configuration ({type(exc).__name__})") from None
    model = cfg.get(STAGE, {}).get("model") if isinstance(cfg, dict) and isinstance(cfg.get(STAGE), dict) else None
    if not isinstance(model, dict):
        raise BenchError(f"{path}: no '{STAGE}.model' section (EMOCA's demos load the {STAGE} stage)")
    expected = {"deca_class": "ExpDECA", "expression_backbone": "deca_clone", "image_size": CROP_SIZE, **DECA_SIZES}
    problems = [f"{key} {model.get(key)!r} (expected {value!r})" for key, value in expected.items() if model.get(key) != value]
    if model.get("e_flame_type", "ResnetEncoder") != "ResnetEncoder":
        problems.append(f"e_flame_type {model['e_flame_type']!r} (expected 'ResnetEncoder')")
    flags = ("exp_deca_global_pose", "exp_deca_jaw_pose")
    problems += [f"{key} {model.get(key)!r} (expected true or false)" for key in flags if not isinstance(model.get(key), bool)]
    if problems:
        raise BenchError(f"{path}: not EMOCA's configuration ({STAGE}.model): " + "; ".join(problems))
    return ExpressionHead(global_pose=model["exp_deca_global_pose"], jaw_pose=model["exp_deca_jaw_pose"])


def release_checkpoint(folder: Path) -> Path:
    """`locate_checkpoint(mode='best')`: of `detail/checkpoints/**/*.ckpt` in sorted order, 'last' skipped,
    the one whose file stem ends in the smallest number after its last '=' (a later one wins a tie)."""
    directory = Path(folder) / STAGE / "checkpoints"
    checkpoints = sorted(directory.rglob("*.ckpt"))
    if not checkpoints:
        raise BenchError(f"{directory}: no *.ckpt (an EMOCA release folder holds cfg.yaml and {STAGE}/checkpoints/…/*.ckpt)")
    best, best_loss = None, math.inf
    for path in checkpoints:
        if path.stem == "last":
            continue
        try:
            loss = float(path.stem[path.stem.rfind("=") + 1 :])
        except ValueError:
            continue
        if loss <= best_loss:
            best, best_loss = path, loss
    if best is None:
        names = ", ".join(str(p.relative_to(directory)) for p in checkpoints)
        raise BenchError(f"{directory}: no checkpoint named by its validation loss ('…=<loss>.ckpt'; found {names})")
    return best


class _Inert:
    """Stands in for a class or function that a checkpoint names outside its tensors: it accepts whatever
    the pickle hands it and runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def read_lightning_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint, read with `weights_only=True`: every global outside
    torch's allowlist (found by reading the pickle's opcodes, nothing run) is replaced by its own inert
    stand-in, so the non-tensor parts load as husks and no foreign code runs."""
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not torch's zip format: load_torch_file says what is wrong with the file
        foreign = []
    stand_ins = [(type(name, (_Inert,), {}), name) for name in foreign]
    with torch.serialization.safe_globals(stand_ins):
        loaded = load_torch_file(path, "EMOCA checkpoint")
    if "state_dict" not in loaded:
        raise BenchError(f"{path}: not a Lightning checkpoint: no 'state_dict' (found: {', '.join(map(str, loaded))})")
    return tensor_state_dict({"state_dict": loaded["state_dict"]}, path, "an EMOCA checkpoint")


def encoder_from_state_dict(state_dict: dict[str, torch.Tensor], head: ExpressionHead, source: str) -> EmocaEncoder:
    """An `EmocaEncoder` holding the release's two encoders, only if their layout is exactly ExpDECA's for
    `head` and every other key belongs to DecaModule (built on the meta device, tensors assigned)."""
    with torch.device("meta"):
        encoder = EmocaEncoder(head)
    expected = {f"deca.{key}": value for key, value in encoder.state_dict().items()}
    considered = {key: value for key, value in state_dict.items()
                  if key.startswith(ENCODER_PREFIXES) or not key.startswith(MODULE_PREFIXES)}
    problems = layout_differences(considered, expected)
    if problems:
        raise BenchError(f"{source}: not EMOCA's encoders (ExpDECA: E_flame ResnetEncoder({CODE_SIZE}), E_expression "
                         f"ResnetEncoder({head.size}) for the {head} head); " + "; ".join(problems))
    encoder.load_state_dict({key.removeprefix("deca."): value for key, value in considered.items()}, strict=True, assign=True)
    return encoder


def load_emoca(folder: str | Path, device: str | torch.device = "cpu") -> tuple[EmocaEncoder, Path]:
    """EMOCA's encoders from a release folder, in eval mode on `device`, and the checkpoint they came from.
    Loaded once per process, checkpoint and device (`weights.load_once`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchError(f"{folder}: not a folder (EMOCA v2 is released as one: cfg.yaml + {STAGE}/checkpoints/…/*.ckpt)")
    head = release_head(folder)
    checkpoint = release_checkpoint(folder)

    def build() -> EmocaEncoder:
        state = read_lightning_state_dict(checkpoint)
        return encoder_from_state_dict(state, head, f"{checkpoint} [state_dict]").eval().to(device)

    return load_once(f"emoca_v2 {head}", checkpoint, device, build), checkpoint


# ----------------------------------------------------------------------------------------------
# seeded random weights in the release layout


def seeded_values(seed: int, name: str, count: int) -> np.ndarray:
    """`count` numbers in (-1, 1), a pure function of (seed, name, position): splitmix64 of the position
    plus a hash of seed and name, top 24 bits. No library's random stream is involved, so the vectors'
    generator and this package draw the same numbers anywhere."""
    stream = np.uint64(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    bits = np.arange(count, dtype=np.uint64) + stream  # arrays wrap around silently, as splitmix64 wants
    bits += np.uint64(0x9E3779B97F4A7C15)
    bits = (bits ^ (bits >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    bits = (bits ^ (bits >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    bits ^= bits >> np.uint64(31)
    return ((bits >> np.uint64(40)).astype(np.float64) + 0.5) / 2.0**23 - 1.0


def seeded_tensor(seed: int, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A value by role: weights of variance 1 / fan_in, biases and running means ±0.1, batch-norm scales
    1 ± 0.1, running variances in (1, 1.5), counters 0: no float tensor is all zeros or ones, so a
    mislaid one shows."""
    if dtype == torch.int64:
        return torch.zeros(shape, dtype=dtype)
    leaf = name.rsplit(".", 1)[-1]
    u = seeded_values(seed, name, math.prod(shape)).reshape(shape)
    if leaf == "running_var":
        values = 1.0 + 0.25 * (u + 1.0)
    elif leaf in ("running_mean", "bias"):
        values = 0.1 * u
    elif len(shape) == 1:
        values = 1.0 + 0.1 * u
    else:
        values = u * math.sqrt(3.0 / math.prod(shape[1:]))
    return torch.from_numpy(values.astype(np.float32))


def random_state_dict(seed: int = 0, head: ExpressionHead = V2_HEAD, last_layer_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Both encoders' tensors under the release's names (`deca.E_flame.*`, `deca.E_expression.*`), seeded;
    each encoder's last layer times `last_layer_scale` (0.01 keeps the codes near FLAME's neutral)."""
    with torch.device("meta"):
        layout = EmocaEncoder(head).state_dict()
    state = OrderedDict()
    for key, value in layout.items():
        name = f"deca.{key}"
        tensor = seeded_tensor(seed, name, tuple(value.shape), value.dtype)
        state[name] = tensor * last_layer_scale if key.endswith(("layers.2.weight", "layers.2.bias")) else tensor
    return state


def random_encoder(seed: int = 0, head: ExpressionHead = V2_HEAD, last_layer_scale: float = 0.01) -> EmocaEncoder:
    """EMOCA's architecture with seeded random weights (`random_state_dict`): the smoke model."""
    return encoder_from_state_dict(random_state_dict(seed, head, last_layer_scale), head, f"random EMOCA (seed {seed})").eval()


def write_release(folder: str | Path, state_dict: dict[str, torch.Tensor], head: ExpressionHead = V2_HEAD) -> Path:
    """A release folder as the authors' package_model.py leaves one: `cfg.yaml` (the keys read here, for
    both stages) and `detail/checkpoints/<ModelCheckpoint's name>.ckpt`, a Lightning checkpoint holding
    `state_dict`. The real checkpoint's detail and loss networks are not written: nothing here reads them."""
    folder = Path(folder)
    model = {"deca_class": "ExpDECA", "expression_backbone": "deca_clone", "exp_deca_global_pose": head.global_pose,
             "exp_deca_jaw_pose": head.jaw_pose, "image_size": CROP_SIZE, **DECA_SIZES}
    cfg = {stage: {"model": {**model, "mode": stage}} for stage in ("coarse", "detail")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    checkpoint = folder / STAGE / "checkpoints" / CHECKPOINT_NAME
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.4.9", "state_dict": OrderedDict(state_dict)},
               checkpoint)
    return checkpoint


# ----------------------------------------------------------------------------------------------


@register_reconstructor
class EmocaReconstructor(Reconstructor):
    """EMOCA v2 on DECA's test-time crop: E_flame's shape, camera and light, E_expression's expression
    (and jaw, as the release's cfg.yaml says)."""

    info = ReconstructorInfo(
        name="emoca_v2", title="EMOCA v2 (Daněček, Black & Bolkart, CVPR 2022; v2 release)", weights=(WEIGHTS_ID,),
        crop="deca", groups=("shape", "exp", "pose", "cam", "light"),
        source="github.com/radekd91/emoca release/EMOCA_v2 fef5472a gdl/models/DECA.py (ExpDECA), "
               "gdl/models/DecaEncoder.py, gdl/datasets/ImageTestDataset.py",
        licence="EMOCA licence: non-commercial scientific research, registration at emoca.is.tue.mpg.de "
                "(and FLAME's at flame.is.tue.mpg.de)")

    def __init__(self, encoder: EmocaEncoder, fingerprint: str) -> None:
        self.encoder, self._fingerprint = encoder, fingerprint

    @classmethod
    def from_weights(cls, paths, device="cpu"):
        encoder, checkpoint = load_emoca(_path(paths, WEIGHTS_ID, cls.info.name), device)
        return cls(encoder, f"emoca_v2:{checkpoint.resolve()}")

    @classmethod
    def tiny(cls, seed=0, device="cpu"):
        return cls(random_encoder(seed).to(device), f"emoca_v2:tiny-{seed}")

    def encode_crops(self, crops):
        return encode_crops(self.encoder, crops)

    def fingerprint(self):
        return self._fingerprint
