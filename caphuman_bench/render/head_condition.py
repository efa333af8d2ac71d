"""Head conditions → the 9-channel image CapHuman is steered by.

The reference identity's DECA code (shape, tex, exp, pose, cam, light) is mixed with a head
condition's parameters as CapHuman's `create_inter_data` mixes the reference and the pose image's
codes (inference.py), then decoded by FLAME and rendered by DECA's renderer.

Modes (comma-separated parts, as the official `--modes`): `position` takes the camera, `pose` the
global head rotation, `expression` the expression and jaw, `lighting` the SH light; `all` takes all
of them. Shape and texture always stay the reference's. The default is `position,pose`.

The hint is `cat([normal, albedo, rendered])` [9, H, W] exactly as inference.py builds `control`
from DECA's `normal_images`, `albedo_images`, `rendered_images`: normals in [-1, 1], albedo and
rendered about [0, 1], zero outside the head, no rescaling. (The training loader reads these as
PNGs normalised to [-1, 1]; the released inference code does not, and we follow inference.)
Frames: the official code renders into the (512²-resized) photo through DECA's crop transform
`tform` (`decode(render_orig=True)`: crop-normalised x, y → crop pixels (p + 1) / 2 · 224 → photo pixels
by tform⁻¹ → photo-normalised o / size · 2 − 1). A `CropFrame` given to `render` does the same; without
one the output frame is the crop itself, so `cam` places the head in the size × size image directly.
The frame travels with `cam` (the official `position` part takes both from the pose photo).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from caphuman_bench.atomic import atomic_write, write_text_atomic
from caphuman_bench.benchmark import N_CAM, N_EXP, N_LIGHT, N_POSE, N_SHAPE, N_TEX, HeadCondition
from caphuman_bench.errors import BenchError
from caphuman_bench.render.flame import FLAME, FlameTexture
from caphuman_bench.render.flame_io import TextureSpace, UVLayout, load_flame_pickle, load_texture_space, load_uv_layout
from caphuman_bench.render.renderer import MeshRenderer

log = logging.getLogger(__name__)

DEFAULT_MODE = "position,pose"
MODE_PARTS = ("position", "pose", "expression", "lighting")
CODE_SIZES = {"shape": N_SHAPE, "tex": N_TEX, "exp": N_EXP, "pose": N_POSE, "cam": N_CAM, "light": N_LIGHT}
RENDER_FILE, TARGET_FILE = "head_render.npz", "head_target.json"
CROP_SIDE = 224  # DECA's image_size: the crop its projection normalises to [-1, 1]
FLAME_WEIGHTS = ("flame_model", "flame_texture", "flame_head_template")


def parse_mode(mode: str) -> frozenset[str]:
    """'position,pose' → {'position', 'pose'}; 'all' → every part."""
    parts = frozenset(p.strip() for p in mode.split(",") if p.strip())
    if parts == {"all"}:
        return frozenset(MODE_PARTS)
    unknown = parts - set(MODE_PARTS)
    if not parts or unknown:
        raise BenchError(f"head-condition mode {mode!r}: parts must be 'all' or some of {', '.join(MODE_PARTS)}")
    return parts


def check_code(code: dict, where: str, keys=tuple(CODE_SIZES)) -> dict[str, np.ndarray]:
    """Validate a DECA code (light as [27] or [9, 3]) → float64 arrays, light as [9, 3]."""
    out = {}
    for key in keys:
        if key not in code:
            raise BenchError(f"{where}: DECA code lacks field {key!r}")
        value = np.asarray(code[key], dtype=np.float64).reshape(-1)
        if value.size != CODE_SIZES[key]:
            raise BenchError(f"{where}: field {key!r} needs {CODE_SIZES[key]} numbers, got {value.size}")
        out[key] = value.reshape(9, 3) if key == "light" else value
    return out


def mix_coefficients(reference: dict, condition: dict, mode: str = DEFAULT_MODE) -> dict[str, np.ndarray]:
    """The code to render: the reference's, with the parts named by `mode` taken from the condition."""
    parts = parse_mode(mode)
    mixed = {k: v.copy() for k, v in check_code(reference, "identity code").items()}
    cond = check_code(condition, "head condition", keys=("pose", "exp", "cam", "light"))
    if "position" in parts:
        mixed["cam"] = cond["cam"].copy()
    if "pose" in parts:
        mixed["pose"][:3] = cond["pose"][:3]
    if "expression" in parts:
        mixed["exp"] = cond["exp"].copy()
        mixed["pose"][3:] = cond["pose"][3:]
    if "lighting" in parts:
        mixed["light"] = cond["light"].copy()
    return mixed


def neutral_identity_code() -> dict[str, np.ndarray]:
    """FLAME's mean head and mean albedo, frontal, DECA-like soft light (for when no photo is given)."""
    light = np.zeros((9, 3))
    light[0], light[3] = 2.8, 0.6
    zeros = {k: np.zeros(n) for k, n in CODE_SIZES.items() if k != "light"}
    return {**zeros, "cam": np.array([6.0, 0.0, 0.0]), "light": light}


@dataclass(frozen=True)
class CropFrame:
    """Where DECA's 224² crop lies in the photo a head is drawn into (the official `render_orig` frame).

    tform: DECA's `tform.params`, photo pixel → crop pixel (`DecaSquare.tform`); width, height: the photo's
    size in the pixels tform speaks of (CapHuman: the 512² resize). The output may be rendered at any
    size: the frame is resolution-free once normalised."""

    tform: np.ndarray  # [3, 3]
    width: int
    height: int

    def screen_transform(self) -> np.ndarray:
        """The affine map [3, 3] of crop-normalised screen x, y to photo-normalised x, y."""
        crop_pixels = np.array([[CROP_SIDE / 2, 0, CROP_SIDE / 2], [0, CROP_SIDE / 2, CROP_SIDE / 2], [0, 0, 1.0]])
        normalise = np.array([[2.0 / self.width, 0, -1], [0, 2.0 / self.height, -1], [0, 0, 1.0]])
        return normalise @ np.linalg.inv(np.asarray(self.tform, dtype=np.float64)) @ crop_pixels

    def digest(self) -> bytes:
        return np.ascontiguousarray(self.tform, dtype=np.float64).tobytes() + f"{self.width}x{self.height}".encode()


@dataclass
class HeadRender:
    """One identity under one head condition: the three images, their mask and the target code."""

    normal: np.ndarray  # [3, H, W] float32 in [-1, 1]
    albedo: np.ndarray  # [3, H, W] float32
    rendered: np.ndarray  # [3, H, W] float32
    mask: np.ndarray  # [1, H, W] float32 0/1
    target: dict[str, np.ndarray]  # shape, tex, exp, pose, cam, light [9, 3] after mixing
    mode: str = DEFAULT_MODE
    condition_id: str | None = None
    key: str = ""  # hash of everything the render depends on (cache validity)

    @property
    def hint(self) -> np.ndarray:
        """CapHuman's control image: cat([normal, albedo, rendered]) → [9, H, W] float32."""
        return np.concatenate([self.normal, self.albedo, self.rendered]).astype(np.float32)

    def save(self, folder: str | os.PathLike) -> None:
        """Both files written atomically, the images first: the key in the JSON vouches for them."""
        folder = Path(folder)
        atomic_write(folder / RENDER_FILE, lambda fh: np.savez_compressed(
            fh, normal=self.normal, albedo=self.albedo, rendered=self.rendered, mask=self.mask))
        meta = {"mode": self.mode, "condition_id": self.condition_id, "key": self.key,
                "target": {k: np.asarray(v).tolist() for k, v in self.target.items()}}
        write_text_atomic(folder / TARGET_FILE, json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "HeadRender":
        folder = Path(folder)
        try:
            meta = json.loads((folder / TARGET_FILE).read_text())
            with np.load(folder / RENDER_FILE, allow_pickle=False) as npz:
                images = {k: npz[k].astype(np.float32) for k in ("normal", "albedo", "rendered", "mask")}
        except FileNotFoundError as exc:
            raise BenchError(f"{folder}: cached head render incomplete ({Path(exc.filename).name} missing)") from None
        except Exception as exc:  # json, numpy and zipfile each fail on junk in their own way
            raise BenchError(f"{folder}: cached head render unreadable ({type(exc).__name__}: {exc})") from None
        if not isinstance(meta, dict):
            raise BenchError(f"{folder / TARGET_FILE}: cached head render unreadable (not a JSON object)")
        target = check_code(meta.get("target", {}), str(folder / TARGET_FILE))
        return cls(**images, target=target, mode=meta.get("mode", DEFAULT_MODE),
                   condition_id=meta.get("condition_id"), key=meta.get("key", ""))


def _condition_parts(condition: HeadCondition | dict) -> tuple[dict, str | None]:
    if isinstance(condition, HeadCondition):
        return condition.coefficients(), condition.id
    return condition, condition.get("id")


@dataclass
class HeadConditionRenderer:
    """FLAME + albedo model + DECA renderer on one device; `render` turns (identity code, condition)
    into a `HeadRender`."""

    flame: FLAME
    texture: FlameTexture
    mesh_renderer: MeshRenderer
    device: torch.device
    source: str  # what the model files were (enters the cache key)

    @classmethod
    def from_arrays(cls, model: dict, texture: TextureSpace, uv: UVLayout, device=None, source: str = "",
                    names: tuple[str, str] = ("FLAME model", "head template")) -> "HeadConditionRenderer":
        """The mesh is drawn with the template's own faces when it has them (DECA's `SRenderY` draws with
        `head_template.obj`'s faces), which must index FLAME's vertices: a template of another vertex
        count is refused, naming both files (`names`: the FLAME model's and the template's)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        flame = FLAME(model, N_SHAPE, N_EXP, source=source or "FLAME model")
        if texture.basis.shape[1] < N_TEX:
            raise BenchError(f"{source}: texture space has {texture.basis.shape[1]} components, DECA uses {N_TEX}")
        faces = flame.faces if uv.faces is None else torch.from_numpy(uv.faces)
        n_vertices = flame.v_template.shape[0]
        if uv.n_vertices is not None and uv.n_vertices != n_vertices:
            raise BenchError(f"{names[1]} has {uv.n_vertices} vertices but {names[0]} has {n_vertices}: "
                             f"the template is not of this FLAME topology")
        if uv.uv_faces.shape != tuple(faces.shape):
            raise BenchError(f"{names[1]}: {len(uv.uv_faces)} texture faces for {len(faces)} faces ({names[0]} has {len(flame.faces)})")
        renderer = MeshRenderer(faces, torch.from_numpy(uv.uv), torch.from_numpy(uv.uv_faces))
        return cls(flame.to(device), FlameTexture(texture).to(device), renderer.to(device), device, source)

    @classmethod
    def from_files(cls, flame_path: str | os.PathLike, texture_path: str | os.PathLike,
                   template_path: str | os.PathLike, device=None) -> "HeadConditionRenderer":
        """The user's generic_model.pkl, FLAME_texture.npz and DECA's head_template.obj."""
        paths = [Path(p) for p in (flame_path, texture_path, template_path)]
        source = ";".join(f"{p.resolve()}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in paths if p.exists())
        return cls.from_arrays(load_flame_pickle(paths[0]), load_texture_space(paths[1], N_TEX),
                               load_uv_layout(paths[2]), device, source=source, names=(str(paths[0]), str(paths[2])))

    @classmethod
    def from_weights(cls, device=None, overrides: dict[str, str] | None = None) -> "HeadConditionRenderer":
        """Resolve the three FLAME files through the weights manifest; a missing one raises
        MissingWeightsError naming it, its source and its registration requirement."""
        from caphuman_bench.weights import require

        found = require(list(FLAME_WEIGHTS), overrides)
        return cls.from_files(*(found[w] for w in FLAME_WEIGHTS), device=device)

    @classmethod
    def synthetic(cls, device=None, seed: int = 0) -> "HeadConditionRenderer":
        """The synthetic FLAME-format head of `render.synthetic` (tests, smoke preset)."""
        from caphuman_bench.render.synthetic import synthetic_flame

        head = synthetic_flame(seed)
        return cls.from_arrays(head.flame_arrays(), head.texture_space(N_TEX), head.uv, device, source=f"synthetic:{seed}")

    @torch.no_grad()
    def render_batch(self, identity_code: dict, conditions: list[HeadCondition | dict], mode: str = DEFAULT_MODE,
                     size: int = 512, frame: CropFrame | None = None) -> list[HeadRender]:
        """One identity under several conditions, rendered as one batch (into `frame`, see `CropFrame`)."""
        targets, ids = [], []
        for condition in conditions:
            coefficients, cid = _condition_parts(condition)
            targets.append(mix_coefficients(identity_code, coefficients, mode))
            ids.append(cid)
        stacked = {k: torch.tensor(np.stack([t[k] for t in targets]), dtype=torch.float32, device=self.device)
                   for k in CODE_SIZES}
        vertices = self.flame(stacked["shape"], stacked["exp"], stacked["pose"])
        albedo_map = self.texture(stacked["tex"])
        screen = None
        if frame is not None:
            screen = torch.tensor(frame.screen_transform(), dtype=torch.float32, device=self.device).expand(len(conditions), 3, 3)
        out = self.mesh_renderer(vertices, stacked["cam"], albedo_map, stacked["light"], size, frame=screen)
        images = {k: getattr(out, k).float().cpu().numpy() for k in ("normal", "albedo", "rendered", "mask")}
        return [HeadRender(**{k: v[i] for k, v in images.items()}, target=targets[i], mode=mode,
                           condition_id=ids[i], key=self.cache_key(identity_code, conditions[i], mode, size, frame))
                for i in range(len(conditions))]

    def render(self, identity_code: dict, condition: HeadCondition | dict, mode: str = DEFAULT_MODE,
               size: int = 512, frame: CropFrame | None = None) -> HeadRender:
        """identity_code: DECA's decomposition (shape[100], tex[50], exp[50], pose[6], cam[3],
        light[27] or [9, 3]); condition: a HeadCondition or a dict with pose, exp, cam, light."""
        return self.render_batch(identity_code, [condition], mode, size, frame)[0]

    def cache_key(self, identity_code: dict, condition: HeadCondition | dict, mode: str, size: int,
                  frame: CropFrame | None = None) -> str:
        coefficients, _ = _condition_parts(condition)
        h = hashlib.sha256(f"{self.source}|{','.join(sorted(parse_mode(mode)))}|{size}".encode())
        if frame is not None:
            h.update(b"frame" + frame.digest())
        for part in (check_code(identity_code, "identity code"), check_code(coefficients, "head condition", ("pose", "exp", "cam", "light"))):
            for key in sorted(part):
                h.update(key.encode() + np.ascontiguousarray(part[key], dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def render_cached(self, identity_code: dict, condition: HeadCondition | dict, folder: str | os.PathLike,
                      mode: str = DEFAULT_MODE, size: int = 512, frame: CropFrame | None = None) -> HeadRender:
        """`render`, reusing `folder`'s saved render when it was made from the same inputs."""
        folder = Path(folder)
        key = self.cache_key(identity_code, condition, mode, size, frame)
        if (folder / TARGET_FILE).exists() and (folder / RENDER_FILE).exists():
            try:
                cached = HeadRender.load(folder)
            except BenchError as exc:  # a torn or damaged entry is a miss, rendered again
                log.warning("%s; rendering it again", exc)
            else:
                if cached.key == key:
                    return cached
        result = self.render(identity_code, condition, mode, size, frame)
        result.save(folder)
        return result
