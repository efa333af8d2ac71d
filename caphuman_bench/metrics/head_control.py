"""Head control, the paper's way: a FLAME reconstructor's coefficients of the generated face vs the condition's.

Each generated image goes through DECA's test-time crop — under protocol `fastcomposer` (the paper's
columns) DECA's default and CapHuman's, the `kpt68` square of 68 landmarks (FAN when `fan_2dfan4` is
present, dlib's 68-point predictor as stand-in: `faces/landmarks.py`); under `caphuman-bench` DECA's
'bbox' rule on MTCNN's box — and DECA's coarse encoder `E_flame`; its shape, pose,
expression and lighting coefficients are compared with the target stored with the run (shape of the
reference identity's encoding; pose, expression and light of the condition):

- `rmse_<g>` = sqrt(‖c_gen − c_target‖² / d_g) per image, g ∈ shape (100), pose (6: global + jaw,
  axis-angle), exp (50), light (27); the aggregate is the mean over images.
- `pose_error_deg`: geodesic angle between generated and target global rotation (pose[0:3]);
  `yaw/pitch/roll_error_deg`: absolute differences of their Euler angles
  (`caphuman_bench.benchmark.euler_to_axis_angle`'s convention).

No face in the generated image → status `no_face`, every value NaN: these are distances, and a zero
would read as a perfect score.

Other reconstructors (issue 26, `models/reconstructors.py`): `score --head-reconstructor NAME` (the
scoring option `head_reconstructors`) scores one family per reconstructor named. DECA's keeps the plain
names (`head_control`, `rmse_pose`: the paper's columns); another's is `head_control[NAME]` with values
`rmse_pose[NAME]`, … (`registry.split_variant`), so several scorers of one run coexist. A reconstructor
with `crop == "deca"` sees the same square as DECA; one with `crop == "own"` finds and crops the face
itself. A group it does not estimate (SMIRK: light) is NaN, named in the row's reason.

The target in the scorer's space. Pose, expression and light a head condition sets are FLAME parameters,
the same for every reconstructor (one FLAME). What a run's target took from the reference photo — shape
always, and with CapHuman's default mixing `position,pose` also expression, jaw and light — is that
photo as the *condition* reconstructor read it (run.json params `reconstructor`, default deca). A scorer
compares within its own space: where it is the condition reconstructor, the stored target as is (the
paper's columns, unchanged); otherwise those parts are the scorer's own reading of the reference photo
(its crop of the photo, not the method's resize), so shape is never compared across two reconstructors'
spaces. A target without shape (a method that stores none) takes the scorer's reading of the reference,
as before. Kept as stored: the tiny setting's neutral code (no photo read) and a pose photo's parts.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from caphuman_bench.errors import BenchError
from caphuman_bench.faces.detection import DETECTOR_CONVENTION
from caphuman_bench.metrics.base import FAMILY_OPTIONS, BenchMetric, ItemScore, ScoreContext, ScoreItem
from caphuman_bench.metrics.geometry import RMSE_GROUPS, coefficient_rmse, euler_differences, pose_errors
from caphuman_bench.metrics.protocol import PROTOCOL_CONVENTION, scoring_protocol
from caphuman_bench.models.deca_encoder import (
    DecaEncoder,
    DecaReconstructor,
    bbox2point,
    deca_crops,
    landmark_square,
)
from caphuman_bench.models.reconstructors import Reconstructor, checked_code, reconstructor_class
from caphuman_bench.registry import DEFAULT_RECONSTRUCTOR, register_metric, split_variant, variant_name

VALUE_NAMES = ("rmse_shape", "rmse_pose", "rmse_exp", "rmse_light",
               "pose_error_deg", "yaw_error_deg", "pitch_error_deg", "roll_error_deg")
FAN_WEIGHTS = "fan_2dfan4"
RECONSTRUCTORS_OPTION = "head_reconstructors"  # the scoring option naming the scorers (`score --head-reconstructor`)
# Where each part of a target lives: (group, slice of it); `methods.head_renders.target_sources` names the parts.
TARGET_PARTS = {"shape": ("shape", slice(None)), "exp": ("exp", slice(None)), "light": ("light", slice(None)),
                "rotation": ("pose", slice(0, 3)), "jaw": ("pose", slice(3, 6))}
CODE_LAYOUT = (("shape", (100,)), ("exp", (50,)), ("pose", (6,)), ("light", (9, 3)))  # a cached reference code, flat


@register_metric("head_control", higher_is_better={name: False for name in VALUE_NAMES}, weights=("deca_model", "mtcnn"))
class HeadControl(BenchMetric):
    """Head control: DECA-coefficient RMSE per group and pose angle error (the paper's metric)."""

    convention: ClassVar[dict] = {
        "paper_metric": True,
        "encoder": "DECA E_flame = ResnetEncoder(outsize=236) from deca_model.tar, strict layout",
        "detector": DETECTOR_CONVENTION,
        "crop": "DECA TestData: protocol fastcomposer kpt68 (68 landmarks: FAN, or dlib's predictor as stand-in; "
                "size (w+h)/2*1.1 of the landmark box, its centre); protocol caphuman-bench bbox (MTCNN box: size (w+h)/2, "
                "centre + 0.12 size down); side int(1.25 size), similarity warp to 224x224, bilinear, RGB in [0, 1], no mean/std",
        "landmarks": "row extra 'landmarks' names the source (fan or dlib)",
        "rmse": "per image sqrt(|c_gen - c_target|^2 / d_g); shape 100, pose 6 (global+jaw), exp 50, light 27; mean over images",
        "pose_error": "geodesic angle between global rotations pose[0:3], degrees",
        "axis_errors": "|yaw|,|pitch|,|roll| differences, R = R_y(yaw) R_x(pitch) R_z(roll), FLAME camera frame, degrees",
        "no_face": "status no_face, values NaN (excluded from means)",
        "missing_target_group": "shape: the reference photo's shape code as the scorer reads it; other groups: NaN, named in the row's reason",
        "reconstructor": "deca (the paper's); score --head-reconstructor NAME adds family head_control[NAME], values <value>[NAME]; "
                         "row extra 'reconstructor' names it",
        "target_space": "the condition's FLAME parameters as set; the parts a run's target read from the reference photo "
                        "(shape; with mixing position,pose also exp, jaw, light) as stored where the scorer is the run's "
                        "condition reconstructor (run.json params reconstructor, default deca), else the scorer's own "
                        "reading of the reference photo; kept as stored: the tiny setting's neutral code, a pose photo's parts",
        "not_estimated": "a group the reconstructor does not estimate: NaN, named in the row's reason",
        **PROTOCOL_CONVENTION,
    }

    def __init__(self, context: ScoreContext | None = None, encoder: DecaEncoder | None = None,
                 reconstructor: Reconstructor | None = None) -> None:
        super().__init__(context)
        self.scorer = str(self.context.options.get("reconstructor", DEFAULT_RECONSTRUCTOR))
        self.scorer_info = reconstructor_class(self.scorer).info  # an unknown name: one-line BenchError
        variant = None if self.scorer == DEFAULT_RECONSTRUCTOR else self.scorer
        self.metric_name = variant_name(type(self).metric_name, variant)  # this instance's family
        self._names = {name: variant_name(name, variant) for name in VALUE_NAMES}
        self.value_names = list(self._names.values())
        if encoder is not None:
            reconstructor = DecaReconstructor(encoder.eval(), "deca:given")
        # A plain dict, not a submodule: the reconstructor's weights must not enter the metric's state.
        self._models: dict[str, Reconstructor] = {} if reconstructor is None else {"reconstructor": reconstructor}
        self.protocol = scoring_protocol(self.context.options)
        self._landmarks = None

    # -- families: one per scoring reconstructor ------------------------------------------------
    @classmethod
    def scorers(cls, options: dict[str, Any]) -> list[str]:
        return list(options.get(RECONSTRUCTORS_OPTION) or [DEFAULT_RECONSTRUCTOR])

    @classmethod
    def families(cls, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        base = {k: v for k, v in options.items() if k not in FAMILY_OPTIONS}
        return {variant_name(cls.metric_name, None if name == DEFAULT_RECONSTRUCTOR else name):
                base if name == DEFAULT_RECONSTRUCTOR else {**base, "reconstructor": name} for name in cls.scorers(options)}

    @classmethod
    def named_families(cls, options: dict[str, Any]) -> list[str]:
        return list(cls.families(options)) if options.get(RECONSTRUCTORS_OPTION) else []

    @classmethod
    def required_weights(cls, options: dict[str, Any]) -> tuple[str, ...]:
        """The scorer's files, and MTCNN where it takes DECA's square (the landmark detectors find faces with it)."""
        info = reconstructor_class(str(options.get("reconstructor", DEFAULT_RECONSTRUCTOR))).info
        return tuple(info.weights) + (("mtcnn",) if info.crop == "deca" else ())

    @classmethod
    def family_convention(cls, family: str) -> dict[str, Any]:
        name = split_variant(family)[1]
        if name is None:
            return dict(cls.convention)
        try:
            info = reconstructor_class(name).info
        except BenchError:  # scored where it is installed, reported where it is not: the rows still read
            return {**cls.convention, "paper_metric": False, "reconstructor": f"{name} (not registered in this install)"}
        own = {"paper_metric": False, "reconstructor": f"{name}: {info.title}; row extra 'reconstructor' names it",
               "encoder": f"{info.title}, code after {info.source}; weights {', '.join(info.weights)}; groups {', '.join(info.groups)}"}
        if info.crop == "own":  # neither MTCNN nor the 68 landmarks decide its crop
            own["crop"] = f"{name}'s own face detection and crop (the DECA square rules do not apply)"
            return {k: v for k, v in {**cls.convention, **own}.items() if k not in ("detector", "landmarks")}
        return {**cls.convention, **own}

    def record(self) -> dict[str, Any]:
        info = self.scorer_info
        return {"reconstructor": {"name": info.name, "title": info.title, "crop": info.crop, "groups": list(info.groups),
                                  "source": info.source}}

    @property
    def reconstructor(self) -> Reconstructor:
        if "reconstructor" not in self._models:
            paths = {wid: self.context.weights[wid] for wid in self.scorer_info.weights}
            self._models["reconstructor"] = reconstructor_class(self.scorer).from_weights(paths, self.device_name)
        return self._models["reconstructor"]

    # -- scoring --------------------------------------------------------------------------------
    def measure(self, items: list[ScoreItem]) -> list[ItemScore]:
        unscored = {name: math.nan for name in VALUE_NAMES}
        rows: list[ItemScore | None] = [None] * len(items)
        pending = []
        for index, item in enumerate(items):
            if item.image is None:
                rows[index] = ItemScore(dict(unscored), "unreadable", item.image_error or "image could not be read")
            elif not item.target:
                rows[index] = ItemScore(dict(unscored), "error", "no head-control target stored for this item")
            else:
                pending.append((index, self._target(item)))
        for (index, target), (code, how) in zip(pending, self._codes([items[i].image for i, _ in pending])):
            if code is None:
                rows[index] = ItemScore(dict(unscored), "no_face", how.pop("no_face"), how)
                continue
            try:
                rows[index] = self._compare(code, target, how)
            except ValueError as exc:  # a target group of the wrong size
                rows[index] = ItemScore(dict(unscored), "error", f"head-control target: {exc}")
        return [ItemScore({self._names[k]: v for k, v in row.values.items()}, row.status, row.reason,
                          {**row.extra, "reconstructor": self.scorer}) for row in rows]

    def _codes(self, images) -> list[tuple[dict[str, np.ndarray] | None, dict]]:
        """Per image the scorer's code (None without a face; `how` then says who found none) and how it was cropped."""
        if self.scorer_info.crop == "own":
            codes = self.reconstructor.encode_images(images)
            how = {"detector": self.scorer, "crop": "own"}
            return [(None, {**how, "no_face": f"{self.scorer} found no face"}) if code is None else
                    (checked_code(code, self.scorer), dict(how)) for code in codes]
        out: list = [None] * len(images)
        found = []
        for index, (square, how) in enumerate(self._squares(images)):
            if square is None:
                finder = "MTCNN" if how["crop"] == "bbox" else f"{how['landmarks']} (68 landmarks)"
                out[index] = (None, {**how, "no_face": f"{finder} found no face"})
            else:
                found.append((index, square, how))
        if found:
            crops = deca_crops([images[index] for index, _, _ in found], [square for _, square, _ in found], self.device_name)
            for (index, _, how), code in zip(found, self.reconstructor.encode_crops(crops)):
                out[index] = (checked_code(code, self.scorer), how)
        return out

    def _squares(self, images) -> list[tuple]:
        """Per image DECA's crop square under the protocol (None without a face) and how it was found."""
        from caphuman_bench.faces.detection import mtcnn_weights_dir

        if self.protocol.deca_crop == "kpt68":
            if self._landmarks is None:
                from caphuman_bench.faces.landmarks import LandmarkDetector
                from caphuman_bench.weights import locate

                fan = self.context.weights.get(FAN_WEIGHTS) or locate(FAN_WEIGHTS)
                self._landmarks = LandmarkDetector.create(fan, self.device_name, mtcnn_weights_dir(self.context.weights),
                                                          self.protocol.detect_max_side)
            how = {"detector": f"{self._landmarks.source} 68 landmarks", "crop": "kpt68", "landmarks": self._landmarks.source}
            return [(None if points is None else landmark_square(points), dict(how))
                    for points in self._landmarks.landmarks(images)]
        detections = self.protocol.detect(images, self.device_name, mtcnn_weights_dir(self.context.weights))
        return [(None, {"detector": "mtcnn", "crop": "bbox"}) if d is None else
                (bbox2point(d.box[0], d.box[2], d.box[1], d.box[3], "bbox"),
                 {"detector": "mtcnn", "crop": "bbox", "face_prob": d.prob, "n_faces": d.n_faces})
                for d in detections]

    def _target(self, item: ScoreItem) -> dict[str, np.ndarray]:
        """The item's target in the scorer's space (module docstring): the parts read from the reference
        photo by another reconstructor, and a missing shape, become the scorer's reading of that photo."""
        parts = list(item.target_from_reference) if item.target_reconstructor not in (None, self.scorer) else []
        if "shape" not in item.target and "shape" not in parts:
            parts.append("shape")
        if not parts:
            return item.target
        reference = self._reference_code(item)
        target = {k: np.asarray(v, dtype=np.float64) for k, v in item.target.items()}
        for part in parts:
            group, where = TARGET_PARTS[part]
            if reference is None:  # no face in the photo: that part has no target
                target.pop(group, None)
            elif group not in reference:  # a group the scorer does not estimate: NaN all the same, named so
                continue
            elif group in target:
                value = target[group].copy()
                value.reshape(-1)[where] = reference[group].reshape(-1)[where]
                target[group] = value
            elif where == slice(None):
                target[group] = reference[group]
        return target

    def _reference_code(self, item: ScoreItem) -> dict[str, np.ndarray] | None:
        """The scorer's code of the item's reference photo, once per identity (cached under the run)."""
        flat = self.reference_features(f"{item.identity_id}.code", item.reference, self._flat_code, item.reference_sha256)
        if flat is None:
            return None
        code, start = {}, 0
        for group, shape in CODE_LAYOUT:
            size = int(np.prod(shape))
            value = np.asarray(flat[start : start + size], dtype=np.float64).reshape(shape)
            start += size
            if not np.isnan(value).all():
                code[group] = value
        return code

    def _flat_code(self, image) -> np.ndarray | None:
        """The scorer's code of one photo as one vector (`CODE_LAYOUT`, NaN for a group it lacks); None without a face."""
        ((code, _),) = self._codes([image])
        if code is None:
            return None
        return np.concatenate([np.asarray(code[group], dtype=np.float64).reshape(-1) if group in code
                               else np.full(int(np.prod(shape)), np.nan) for group, shape in CODE_LAYOUT])

    def _compare(self, code: dict[str, np.ndarray], target: dict[str, np.ndarray], how: dict) -> ItemScore:
        values = {}
        for group in RMSE_GROUPS:
            try:
                values[f"rmse_{group}"] = (coefficient_rmse(code[group], target[group]) if group in target and group in code
                                           else math.nan)
            except ValueError as exc:
                raise ValueError(f"{group}: {exc}") from None
        extra = dict(how)
        if "pose" in target and "pose" in code:
            generated_rotvec, target_rotvec = code["pose"][:3], np.asarray(target["pose"]).reshape(-1)[:3]
            values.update(pose_errors(generated_rotvec, target_rotvec))
            extra["signed_deg"] = euler_differences(generated_rotvec, target_rotvec)
        else:
            values.update({name: math.nan for name in VALUE_NAMES if name.endswith("_deg")})
        missing = [group for group in RMSE_GROUPS if group not in target]
        lacking = [group for group in RMSE_GROUPS if group not in code]
        reasons = ([f"target has no {', '.join(missing)}"] if missing else []) + \
                  ([f"{self.scorer} estimates no {', '.join(lacking)}"] if lacking else [])
        return ItemScore(values, "ok", "; ".join(reasons), extra)
