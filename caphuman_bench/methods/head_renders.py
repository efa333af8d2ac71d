"""Per-run head renders shared by the methods steered by a rendered 3D head (CapHuman, IP-Adapter + ControlNet).

Per identity, once per run (cached under the run's `cache/method/`): the reference's FLAME code, made by
the run's reconstructor (`params["reconstructor"]`, default `deca`, the paper's; any name of
`models.reconstructors`, issue 26), and its crop frame. Per identity × head condition: the head render of
that code mixed with the condition (`params["mixing"]`, CapHuman's `--modes`), whose mixed code is also the
head-control target the method was steered to.

What a reconstructor with DECA's crop (`info.crop == "deca"`: DECA, EMOCA v2) sees, as CapHuman's
inference.py (`TestData(iscrop=True, size=image_resolution)`):
1. the photo resized to size × size without keeping its aspect ratio, anti-aliased, truncated to uint8
   (`deca_encoder.resize_as_testdata`);
2. the crop (`deca_crop`): "kpt68" (default, official) — DECA's `bbox2point(type='kpt68')` square of 68
   landmarks (`faces.landmarks`: FAN when `fan_2dfan4` is present, dlib's 68-point predictor otherwise);
   "mtcnn" — DECA's 'bbox' rule on MTCNN's most confident box. No face: DECA's whole-image fallback.
A reconstructor that crops the face itself (`info.crop == "own"`: SMIRK) gets the photo as given
(`encode_images`; TestData's resize is DECA's loader, not part of it). It reports no crop transform, so
its camera places the head in its own crop only: the head is drawn in the crop frame (`head_frame: crop`
semantics, whatever `head_frame` says). No face found: there is no whole-image fallback to copy, so that
photo's tasks fail with the reason (`FaceNotFoundError`) and the run goes on.

A group the reconstructor does not estimate (SMIRK has no light; only DECA gives an albedo `tex`) is
taken from the head condition's explicit value (its `light`; `pose`, `exp`, `cam` likewise), else from
FLAME's neutral code (`tex`: the mean albedo); `head_inputs` records which.

Where the head is drawn (`head_frame`): "reference" (default, official `position` semantics with the
reference as the pose photo) — into the size² frame of the resized reference through its crop transform,
at the reference's own camera, with the condition's rotation, expression and light as `mixing` says;
"crop" — the condition's explicit camera in the crop frame (the output is the crop). A condition with a
`pose_image` is the official run with a pose photo: that photo goes through the same steps and its code
(and, with `position`, its camera and crop frame) is mixed in.

Tiny setting (`tiny: true`, smoke runs): the reconstructor's `tiny(seed=0)` random model reads the
reference as above; its shape and expression replace FLAME's neutral ones, the rest stays neutral and
the head is drawn in the crop frame at the condition's camera (no frame), so `reconstructor` changes the
smoke run's heads too.

A subclass calls `load_head_models` in its `load` (it sets `self.renderer`, a `HeadConditionRenderer`,
`self.reconstructor`, a loaded `Reconstructor`, and `self._codes = {}`); one steered by landmarks also sets
`self.landmarks` (a `render.landmarks.HeadLandmarks`).

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
from caphuman_bench.errors import BenchError, FaceNotFoundError
from caphuman_bench.faces.memo import BoundedMemo
from caphuman_bench.models.reconstructors import FLAME_GROUPS, reconstructor_class, reconstructor_names
from caphuman_bench.registry import DEFAULT_RECONSTRUCTOR


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
HEAD_PARAM_TYPES = {"deca_crop": str, "head_frame": str, "reconstructor": str}
FAN_WEIGHTS = "fan_2dfan4"
FLAME_WEIGHTS = ("flame_model", "flame_texture", "flame_head_template")
CONDITION_GROUPS = ("pose", "exp", "cam", "light")  # what a head condition gives explicitly
TINY_GROUPS = ("shape", "exp")  # what the tiny model's code contributes to the smoke run's head


def check_head_params(params: dict, where: str) -> None:
    """The head-input parameters' values (their types are checked with the other parameters)."""
    for name, allowed, default in (("deca_crop", DECA_CROPS, "kpt68"), ("head_frame", HEAD_FRAMES, "reference")):
        if params.get(name, default) not in allowed:
            raise BenchError(f"{where}: parameter {name!r} must be one of {', '.join(allowed)}, got {params[name]!r}")
    try:
        reconstructor_class(chosen_reconstructor(params))
    except BenchError as exc:
        raise BenchError(f"{where}: parameter 'reconstructor': {exc}") from None


def chosen_reconstructor(params: dict) -> str:
    return str(params.get("reconstructor", DEFAULT_RECONSTRUCTOR))


def reconstructor_weights(params: dict) -> list[str]:
    """The manifest entries of the chosen reconstructor only (another one's are not needed)."""
    return list(reconstructor_class(chosen_reconstructor(params)).info.weights)


def head_weights(params: dict) -> list[str]:
    """What a head-aware adapter loads for the head condition: the reconstructor's weights and FLAME's files."""
    return [*reconstructor_weights(params), *FLAME_WEIGHTS]


def with_chosen_reconstructor(needed: list[str], params: dict) -> list[str]:
    """A card's weights list with every reconstructor's entries ("only with reconstructor: <name>") swapped
    for the chosen one's; a list that names no reconstructor's entry is left as it is."""
    every = {w for name in reconstructor_names() for w in reconstructor_class(name).info.weights}
    if not every & set(needed):
        return needed
    kept = [w for w in needed if w not in every]
    return [*kept, *(w for w in reconstructor_weights(params) if w not in kept)]


def landmark_source() -> str:
    """'fan' when FAN's weights file resolves (never downloaded), else 'dlib' (the stand-in)."""
    from caphuman_bench.weights import locate

    return "fan" if locate(FAN_WEIGHTS) is not None else "dlib"


def head_inputs(params: dict) -> dict:
    """How the head condition was made, for run.json (`head_inputs`) and the leaderboard's provenance."""
    info = reconstructor_class(chosen_reconstructor(params)).info
    tiny = bool(params.get("tiny"))
    reconstructor = {"name": info.name, "title": info.title,
                     "weights": "random (its tiny model, seed 0)" if tiny else list(info.weights),
                     "crop": info.crop,
                     "not_estimated": {g: "the head condition's value" if g in CONDITION_GROUPS else "FLAME's neutral"
                                       for g in FLAME_GROUPS if g not in info.groups} or None,
                     "tex": "the reconstructor's albedo where it gives one, else FLAME's mean albedo"}
    size = int(params.get("height", 512))
    if info.crop == "own":
        seen = {"crop": f"{info.name}'s own face detection and crop on the photo as given (no TestData resize)"}
    else:
        crop = params.get("deca_crop", "kpt68")
        landmarks = {"fan": "FAN 2DFAN-4 (official)", "dlib": "dlib 68-point predictor (stand-in for FAN)"}
        seen = {"resize": f"{size}x{size}, aspect not kept, skimage anti-aliased, uint8 truncation (official TestData)",
                "deca_crop": crop,
                "landmarks": landmarks[landmark_source()] if crop == "kpt68" else None}
    if tiny:
        return {"tiny": f"the tiny {info.name}'s shape and expression on FLAME's neutral code, in the crop frame at the "
                        "condition's camera (no frame)",
                "reconstructor": reconstructor, **seen}
    own = "crop (the reconstructor crops the face itself and reports no crop transform: the condition's camera in the crop frame)"
    return {
        "reconstructor": reconstructor,
        **seen,
        "head_frame": own if info.crop == "own" else params.get("head_frame", "reference"),
        "mixing": params.get("mixing", "position,pose"),
    }


def target_sources(params: dict, head_inputs: dict | None) -> tuple[str | None, tuple[str, ...]]:
    """For a run's stored head targets: the reconstructor that read the reference photo, and the parts of
    the target it read there (the rest came from the head condition's FLAME parameters), as `head_target`
    mixes them (`render.head_condition.mix_coefficients`): 'shape' always; 'rotation' (pose[:3]) unless
    the mode takes `pose`; 'exp' and 'jaw' (pose[3:]) unless `expression`; 'light' unless `lighting`; less
    the groups the reconstructor does not estimate (head_inputs' `reconstructor.not_estimated`: they came
    from the condition too). (None, ()) where no real reconstructor read the photo (the tiny setting: a
    random tiny model) or the method says nothing of how it made its target (no `mixing` in head_inputs)."""
    from caphuman_bench.render.head_condition import parse_mode

    if not head_inputs or "mixing" not in head_inputs:
        return None, ()
    taken = parse_mode(str(head_inputs["mixing"]))
    missing = (head_inputs.get("reconstructor") or {}).get("not_estimated") or {}
    parts = ["shape"] + [part for part, group, mode in (("rotation", "pose", "pose"), ("exp", "exp", "expression"),
                                                        ("jaw", "pose", "expression"), ("light", "light", "lighting"))
                         if mode not in taken and group not in missing]
    return chosen_reconstructor(params), tuple(parts)


RENDER_MEMO = 64  # a 512² render holds ~10 MB; tasks come identity by identity


class HeadRenderMixin:
    """Gives an adapter the head-input parameters (`reconstructor`, `deca_crop`, `head_frame`: declared,
    checked, and recorded in run.json as `head_inputs`) and the renders; list it before `MethodAdapter`."""

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

    @classmethod
    def required_weights(cls, card, params: dict) -> list[str]:
        """The card's list (an adapter that names its own list uses `head_weights`), with the chosen
        reconstructor's weights in place of the card's default one's."""
        return with_chosen_reconstructor(super().required_weights(card, params), params)

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

    def _code_fingerprint(self, photo: Image.Image) -> str:
        """`_fingerprint` plus the reconstructor's identity and, for DECA's crop, what its input depends on:
        size, crop rule, landmark source."""
        h = hashlib.sha256(self._fingerprint(photo).encode())
        h.update(self.reconstructor.fingerprint().encode())
        if self.reconstructor.info.crop == "deca":
            crop = self.params.get("deca_crop", "kpt68")
            source = self._landmarks().source if crop == "kpt68" else ""
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
        """(code, CropFrame or None) of a photo as the module doc says; cached as `codes/<name>.*.npz`.
        Groups the reconstructor does not estimate are absent (`head_render` fills them). `resize=False`:
        the photo is already the frame (size², e.g. FFHQ-aligned) and DECA's crop is cut from it unresampled.
        Tiny: the tiny model's shape and expression on FLAME's neutral code, and no frame."""
        from caphuman_bench.render.head_condition import CODE_SIZES, CropFrame, check_code, neutral_identity_code

        known = self._codes.get(name)
        if isinstance(known, FaceNotFoundError):
            raise known
        if known is not None:
            return known
        path = self._cache_path("codes", f"{name}.{self._code_fingerprint(photo)}.npz")
        stored = read_cached(path, _load_npz) if path is not None else None  # an unreadable entry is a miss
        if stored is None:
            try:
                stored = self._reconstruct(name, photo, resize)
            except FaceNotFoundError as exc:
                self._codes[name] = exc
                raise
            if path is not None:
                atomic_write(path, lambda fh: np.savez(fh, **stored))
        code = check_code(stored, f"{name!r} {self.reconstructor.info.name} code", keys=[k for k in CODE_SIZES if k in stored])
        frame = None
        if self.params.get("tiny"):
            code = {**neutral_identity_code(), **{k: code[k] for k in TINY_GROUPS}}
        elif "frame_tform" in stored:
            width, height = (int(v) for v in stored["frame_size"])
            frame = CropFrame(np.asarray(stored["frame_tform"], dtype=np.float64), width, height)
        self._codes[name] = (code, frame)
        return self._codes[name]

    def _reconstruct(self, name: str, photo: Image.Image, resize: bool) -> dict[str, np.ndarray]:
        """The reconstructor's code of a photo, with DECA's crop frame where it takes DECA's crop."""
        from caphuman_bench.models.deca_encoder import deca_crop_square, resize_as_testdata
        from caphuman_bench.models.reconstructors import checked_code

        info = self.reconstructor.info
        if info.crop == "own":
            (code,) = self.reconstructor.encode_images([photo.convert("RGB")])
            if code is None:
                raise FaceNotFoundError(f"{name!r}: {info.name} found no face in the photo, so there is no head "
                                        "condition (it crops the face itself: DECA's whole-image fallback has no equivalent)")
            return checked_code(code, f"{info.name} code of {name!r}")
        size = int(self.params.get("height", 512))
        resized = resize_as_testdata(photo, size) if resize else photo.convert("RGB")
        square = self.deca_square(resized)
        (code,) = self.reconstructor.encode_crops(deca_crop_square(resized, square)[None])
        return {**checked_code(code, f"{info.name} code of {name!r}"), "frame_tform": square.tform,
                "frame_size": np.array([size, size])}

    def identity_code(self, identity_id: str, reference: Image.Image) -> dict[str, np.ndarray]:
        """The reference's code (groups the reconstructor does not estimate absent)."""
        return self.photo_code(identity_id, reference)[0]

    def frame_code(self, name: str, photo: Image.Image):
        """(code, CropFrame or None) of a photo the head is drawn into (the reference, a pose photo): `photo_code`;
        a method whose authors re-frame that photo first (Arc2Face's FFHQ alignment) overrides this."""
        return self.photo_code(name, photo)

    def _condition_and_frame(self, identity_id: str, reference: Image.Image, condition):
        """The condition's coefficients (pose, exp, cam, light) and the frame to draw into (see module doc)."""
        from caphuman_bench.images import load_rgb
        from caphuman_bench.render.head_condition import parse_mode

        code, frame = self.frame_code(identity_id, reference)
        explicit = condition.coefficients()
        if condition.pose_image:
            pose_code, pose_frame = self.frame_code(f"pose-{condition.id}", load_rgb(condition.pose_image))
            coefficients = {k: pose_code.get(k, explicit[k]) for k in CONDITION_GROUPS}
            if "position" in parse_mode(str(self.params.get("mixing", "position,pose"))):
                frame = pose_frame
        elif frame is not None and self.params.get("head_frame", "reference") == "reference":
            coefficients = {**explicit, "cam": code["cam"]}
        else:
            coefficients, frame = explicit, None
        return {**coefficients, "id": condition.id}, frame

    def render_key(self, identity_id: str, condition, size: int) -> tuple:
        """What a memoised render (or anything made from one) is looked up by."""
        return identity_id, condition.id, str(self.params.get("mixing", "position,pose")), size

    def head_render(self, identity_id: str, reference: Image.Image, condition, size: int):
        """The head render of one identity × condition; `render_cached` re-renders if any input changed.

        Kept in memory too (the last RENDER_MEMO): every task of an identity × condition needs the
        same render, and reading the compressed file back costs ~0.1 s, seconds per batch of 32."""
        from caphuman_bench.render.head_condition import neutral_identity_code

        # groups the reconstructor does not estimate: the condition's explicit value, else FLAME's neutral one
        code = {**neutral_identity_code(), **condition.coefficients(), **self.identity_code(identity_id, reference)}
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
        """What the mixin needs: the synthetic FLAME head and the reconstructor's tiny random model (tiny),
        or FLAME (`flame_model`, `flame_texture`, `flame_head_template`) and the reconstructor from the
        run's weights (its `info.weights`)."""
        from caphuman_bench.render.head_condition import HeadConditionRenderer

        chosen = reconstructor_class(chosen_reconstructor(self.params))
        self._codes = {}
        if tiny:
            self.renderer = HeadConditionRenderer.synthetic(device=device)
            self.reconstructor = chosen.tiny(seed=0, device=device)
            return
        paths = self.context.weights
        self.renderer = HeadConditionRenderer.from_files(*(paths[w] for w in FLAME_WEIGHTS), device=device)
        self.reconstructor = chosen.from_weights({w: paths[w] for w in chosen.info.weights}, device=device)
