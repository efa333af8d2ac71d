"""Per-run head renders shared by the methods steered by a rendered 3D head (CapHuman, IP-Adapter + ControlNet).

Per identity, once per run (cached under the run's `cache/method/`): the reference's DECA code (FLAME's
neutral code when the adapter has no DECA encoder, i.e. the tiny setting) and its crop frame. Per
identity × head condition: the head render of that code mixed with the condition (`params["mixing"]`,
CapHuman's `--modes`), whose mixed code is also the head-control target the method was steered to.

What DECA sees, as CapHuman's inference.py (`TestData(iscrop=True, size=image_resolution)`):
1. the photo resized to size × size without keeping its aspect ratio, anti-aliased, truncated to uint8
   (`deca_encoder.resize_as_testdata`);
2. the crop (`deca_crop`): "kpt68" (default, official) — DECA's `bbox2point(type='kpt68')` square of 68
   landmarks (`faces.landmarks`: FAN when `fan_2dfan4` is present, dlib's 68-point predictor otherwise);
   "mtcnn" — DECA's 'bbox' rule on MTCNN's most confident box. No face: DECA's whole-image fallback.

Where the head is drawn (`head_frame`): "reference" (default, official `position` semantics with the
reference as the pose photo) — into the size² frame of the resized reference through its crop transform,
at the reference's own DECA camera, with the condition's rotation, expression and light as `mixing` says;
"crop" — the condition's explicit camera in the crop frame (the output is the crop). A condition with a
`pose_image` is the official run with a pose photo: that photo goes through the same steps and its code
(and, with `position`, its camera and crop frame) is mixed in.

A subclass sets `self.renderer` (a `HeadConditionRenderer`), `self.deca` (DECA encoder or None) and
`self._codes = {}` in its `load`; one steered by landmarks also sets `self.landmarks` (a `render.landmarks.HeadLandmarks`).

Normal map convention: ControlNet 1.1's normalbae annotator (lllyasviel/ControlNet-v1-1-nightly,
commit e2b4415, `annotator/normalbae/__init__.py`) writes BAE's camera-space unit normal n as
`((n + 1) * 0.5).clip(0, 1) * 255` cast to uint8 (truncated, not rounded). Its README says "blue is
front, red is left, green is top", and its demo figure (`github_docs/imgs/normal_2.png`, the annotator's
output as is) agrees: the floor (facing up) ≈ (127, 252, 146), the ceiling ≈ (122, 8, 126), a wall facing
the image's right ≈ (37, 114, 205). Our renderer's normals are DECA/FLAME's (x to the image's right, y up,
z towards the camera), so only x flips sign. BAE predicts a unit normal at every pixel (the zero vector,
mid-grey, never occurs in its output); outside the head we write the normal of a camera-facing
background plane, (0, 0, 1) → (127, 127, 255), the wall behind a sitter.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from caphuman_bench.atomic import atomic_write, read_cached
from caphuman_bench.errors import BenchError
from caphuman_bench.faces.memo import BoundedMemo


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# normalbae's axes in ours: red grows towards the image's left (-x), green up (+y), blue to the camera (+z)
NORMALBAE_AXES = np.array([-1.0, 1.0, 1.0], dtype=np.float32)
BACKGROUND_NORMAL = np.array([0.0, 0.0, 1.0], dtype=np.float32)  # a camera-facing plane behind the head


def normals_to_controlnet_image(normal: np.ndarray) -> Image.Image:
    """Renderer normals [3, H, W] (x right, y up, z to the camera; 0 outside the head) → normalbae RGB."""
    background = ~np.any(normal != 0, axis=0)
    normal = np.where(background[None], BACKGROUND_NORMAL[:, None, None], normal)
    bae = normal * NORMALBAE_AXES[:, None, None]
    rgb = (np.clip((bae + 1.0) * 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)  # the annotator truncates
    return Image.fromarray(rgb.transpose(1, 2, 0), mode="RGB")


DECA_CROPS = ("kpt68", "mtcnn")
HEAD_FRAMES = ("reference", "crop")
HEAD_PARAM_TYPES = {"deca_crop": str, "head_frame": str}
FAN_WEIGHTS = "fan_2dfan4"


def check_head_params(params: dict, where: str) -> None:
    """The head-input parameters' values (their types are checked with the other parameters)."""
    for name, allowed, default in (("deca_crop", DECA_CROPS, "kpt68"), ("head_frame", HEAD_FRAMES, "reference")):
        if params.get(name, default) not in allowed:
            raise BenchError(f"{where}: parameter {name!r} must be one of {', '.join(allowed)}, got {params[name]!r}")


def landmark_source() -> str:
    """'fan' when FAN's weights file resolves (never downloaded), else 'dlib' (the stand-in)."""
    from caphuman_bench.weights import locate

    return "fan" if locate(FAN_WEIGHTS) is not None else "dlib"


def head_inputs(params: dict) -> dict:
    """How the head condition was made, for run.json (`head_inputs`) and the leaderboard's provenance."""
    if params.get("tiny"):
        return {"tiny": "FLAME's neutral code in the crop frame at the condition's camera (no DECA: no resize, crop or frame)"}
    crop = params.get("deca_crop", "kpt68")
    size = int(params.get("height", 512))
    landmarks = {"fan": "FAN 2DFAN-4 (official)", "dlib": "dlib 68-point predictor (stand-in for FAN)"}
    return {
        "resize": f"{size}x{size}, aspect not kept, skimage anti-aliased, uint8 truncation (official TestData)",
        "deca_crop": crop,
        "landmarks": landmarks[landmark_source()] if crop == "kpt68" else None,
        "head_frame": params.get("head_frame", "reference"),
        "mixing": params.get("mixing", "position,pose"),
    }


def target_sources(params: dict, head_inputs: dict | None) -> tuple[str | None, tuple[str, ...]]:
    """For a run's stored head targets: the reconstructor that read the reference photo, and the parts of
    the target it read there (the rest came from the head condition's FLAME parameters), as `head_target`
    mixes them (`render.head_condition.mix_coefficients`): 'shape' always; 'rotation' (pose[:3]) unless
    the mode takes `pose`; 'exp' and 'jaw' (pose[3:]) unless `expression`; 'light' unless `lighting`.
    (None, ()) where no photo was read (the tiny setting's neutral code) or the method says nothing
    of how it made its target (no `mixing` in run.json's head_inputs)."""
    from caphuman_bench.models.reconstructors import DEFAULT_RECONSTRUCTOR
    from caphuman_bench.render.head_condition import parse_mode

    if not head_inputs or "mixing" not in head_inputs:
        return None, ()
    taken = parse_mode(str(head_inputs["mixing"]))
    parts = ["shape"] + [part for part, mode in (("rotation", "pose"), ("exp", "expression"), ("jaw", "expression"),
                                                  ("light", "lighting")) if mode not in taken]
    return str(params.get("reconstructor", DEFAULT_RECONSTRUCTOR)), tuple(parts)


RENDER_MEMO = 64  # a 512² render holds ~10 MB; tasks come identity by identity


class HeadRenderMixin:
    """Gives an adapter the head-input parameters (`deca_crop`, `head_frame`: declared, checked, and
    recorded in run.json as `head_inputs`) and the renders; list it before `MethodAdapter`."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.param_types = {**getattr(cls, "param_types", {}), **HEAD_PARAM_TYPES}

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        check_head_params(params, where)

    @classmethod
    def head_inputs(cls, params: dict) -> dict:
        return head_inputs(params)

    def _cache_path(self, folder: str, *parts: str) -> Path | None:
        """`<workdir>/<folder>/<parts...>` with its parent folder created; None without a workdir."""
        if self.context.workdir is None:
            return None
        path = Path(self.context.workdir, folder, *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _fingerprint(self, reference: Image.Image) -> str:
        """The reference's pixels and the model setting: a cached entry is valid only for both."""
        h = hashlib.sha256(np.asarray(reference.convert("RGB")).tobytes())
        h.update(f"{reference.size}|tiny={bool(self.params.get('tiny'))}|{self.params.get('backbone')}".encode())
        return h.hexdigest()[:16]

    def _deca_fingerprint(self, photo: Image.Image) -> str:
        """`_fingerprint` plus what DECA's input depends on: size, crop rule, landmark source."""
        crop = self.params.get("deca_crop", "kpt68")
        source = self._landmarks().source if crop == "kpt68" else ""
        h = hashlib.sha256(self._fingerprint(photo).encode())
        h.update(f"{self.params.get('height', 512)}|{crop}|{source}".encode())
        return h.hexdigest()[:16]

    def _landmarks(self):
        from caphuman_bench.faces.landmarks import LandmarkDetector
        from caphuman_bench.weights import locate

        if getattr(self, "_landmark_detector", None) is None:
            fan = self.context.weights.get(FAN_WEIGHTS) or locate(FAN_WEIGHTS)
            self._landmark_detector = LandmarkDetector.create(fan, str(self.context.device))
        return self._landmark_detector

    def deca_square(self, photo: Image.Image):
        """The square DECA crops from a (resized) photo under `deca_crop`, with DECA's no-face fallback."""
        from caphuman_bench.faces.detection import detect_faces
        from caphuman_bench.models.deca_encoder import bbox2point, landmark_square, no_face_square

        if self.params.get("deca_crop", "kpt68") == "kpt68":
            points = self._landmarks()(photo)
            return landmark_square(points) if points is not None else no_face_square(photo.width, photo.height, "kpt68")
        (detection,) = detect_faces([photo], str(self.context.device))
        if detection is None:
            return no_face_square(photo.width, photo.height, "bbox")
        left, top, right, bottom = detection.box
        return bbox2point(left, right, top, bottom, "bbox")

    def photo_code(self, name: str, photo: Image.Image, resize: bool = True):
        """(DECA code, CropFrame) of a photo as CapHuman's inference computes them; cached as `deca/<name>.*.npz`.
        `resize=False`: the photo is already the frame (size², e.g. FFHQ-aligned) and DECA sees it unresampled.
        Without a DECA encoder (tiny): FLAME's neutral code and no frame, i.e. the condition's explicit camera."""
        from caphuman_bench.models.deca_encoder import deca_crop_square, encode_crops, resize_as_testdata
        from caphuman_bench.render.head_condition import CropFrame, check_code, neutral_identity_code

        if name in self._codes:
            return self._codes[name]
        if self.deca is None:  # tiny: FLAME's neutral code has no camera for any photo, so no frame either
            self._codes[name] = (neutral_identity_code(), None)
            return self._codes[name]
        path = self._cache_path("deca", f"{name}.{self._deca_fingerprint(photo)}.npz")
        stored = read_cached(path, _load_npz) if path is not None else None  # an unreadable entry is a miss
        if stored is None:
            size = int(self.params.get("height", 512))
            resized = resize_as_testdata(photo, size) if resize else photo.convert("RGB")
            square = self.deca_square(resized)
            code = encode_crops(self.deca, deca_crop_square(resized, square)[None])[0]
            stored = {**code, "frame_tform": square.tform, "frame_size": np.array([size, size])}
            if path is not None:
                atomic_write(path, lambda fh: np.savez(fh, **stored))
        code = check_code(stored, f"{name!r} DECA code")
        width, height = (int(v) for v in stored["frame_size"])
        self._codes[name] = (code, CropFrame(np.asarray(stored["frame_tform"], dtype=np.float64), width, height))
        return self._codes[name]

    def identity_code(self, identity_id: str, reference: Image.Image) -> dict[str, np.ndarray]:
        """The reference's DECA code (FLAME's neutral code in the tiny setting)."""
        return self.photo_code(identity_id, reference)[0]

    def frame_code(self, name: str, photo: Image.Image):
        """(DECA code, CropFrame) of a photo the head is drawn into (the reference, a pose photo): `photo_code`;
        a method whose authors re-frame that photo first (Arc2Face's FFHQ alignment) overrides this."""
        return self.photo_code(name, photo)

    def _condition_and_frame(self, identity_id: str, reference: Image.Image, condition):
        """The condition's coefficients (pose, exp, cam, light) and the frame to draw into (see module doc)."""
        from caphuman_bench.images import load_rgb
        from caphuman_bench.render.head_condition import parse_mode

        code, frame = self.frame_code(identity_id, reference)
        if condition.pose_image:
            pose_code, pose_frame = self.frame_code(f"pose-{condition.id}", load_rgb(condition.pose_image))
            coefficients = {k: pose_code[k] for k in ("pose", "exp", "cam", "light")}
            if "position" in parse_mode(str(self.params.get("mixing", "position,pose"))):
                frame = pose_frame
        elif frame is not None and self.params.get("head_frame", "reference") == "reference":
            coefficients = {**condition.coefficients(), "cam": code["cam"]}
        else:
            coefficients, frame = condition.coefficients(), None
        return {**coefficients, "id": condition.id}, frame

    def render_key(self, identity_id: str, condition, size: int) -> tuple:
        """What a memoised render (or anything made from one) is looked up by."""
        return identity_id, condition.id, str(self.params.get("mixing", "position,pose")), size

    def head_render(self, identity_id: str, reference: Image.Image, condition, size: int):
        """The head render of one identity × condition; `render_cached` re-renders if any input changed.

        Kept in memory too (the last RENDER_MEMO): every task of an identity × condition needs the
        same render, and reading the compressed file back costs ~0.1 s, seconds per batch of 32."""
        code = self.identity_code(identity_id, reference)
        coefficients, frame = self._condition_and_frame(identity_id, reference, condition)
        mixing = str(self.params.get("mixing", "position,pose"))
        if not hasattr(self, "_renders"):
            self._renders = BoundedMemo(RENDER_MEMO)
        key = self.render_key(identity_id, condition, size)
        render = self._renders.get(key)
        if render is None:
            folder = self._cache_path("render", identity_id, condition.id)
            if folder is None:
                render = self.renderer.render(code, coefficients, mixing, size, frame)
            else:
                render = self.renderer.render_cached(code, coefficients, folder, mixing, size, frame)
            self._renders.put(key, render)
        return render

    def head_landmarks(self, identity_id: str, reference: Image.Image, condition, size: int) -> np.ndarray:
        """The 68 FLAME landmarks [68, 2] (pixels) of exactly the head `head_render` draws."""
        return self.landmarks.of_target(self.head_render(identity_id, reference, condition, size).target, size)

    def head_target(self, identity_id: str, reference: Image.Image, condition) -> dict[str, np.ndarray]:
        """The mixed code the method was steered to (the reference's, with the mixed-in condition parts)."""
        size = int(self.params.get("height", 512))
        return dict(self.head_render(identity_id, reference, condition, size).target)

    def load_head_models(self, device, *, tiny: bool) -> None:
        """What the mixin needs: the synthetic FLAME head without DECA (tiny), or FLAME + DECA from
        the run's weights (`flame_model`, `flame_texture`, `flame_head_template`, `deca_model`)."""
        from caphuman_bench.render.head_condition import HeadConditionRenderer

        self._codes = {}
        if tiny:
            self.renderer = HeadConditionRenderer.synthetic(device=device)
            self.deca = None
            return
        from caphuman_bench.models.deca_encoder import load_deca_encoder

        paths = self.context.weights
        self.renderer = HeadConditionRenderer.from_files(
            paths["flame_model"], paths["flame_texture"], paths["flame_head_template"], device=device)
        self.deca = load_deca_encoder(paths["deca_model"], device=device)
