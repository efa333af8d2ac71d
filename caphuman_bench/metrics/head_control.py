"""Head control, the paper's way: DECA coefficients of the generated face vs the condition's.

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
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from caphuman_bench.faces.detection import DETECTOR_CONVENTION
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreContext, ScoreItem
from caphuman_bench.metrics.geometry import RMSE_GROUPS, coefficient_rmse, euler_differences, pose_errors
from caphuman_bench.metrics.protocol import PROTOCOL_CONVENTION, scoring_protocol
from caphuman_bench.models.deca_encoder import (
    DecaEncoder,
    bbox2point,
    deca_crop_square,
    deca_crops,
    encode_crops,
    landmark_square,
    load_deca_encoder,
)
from caphuman_bench.registry import register_metric

VALUE_NAMES = ("rmse_shape", "rmse_pose", "rmse_exp", "rmse_light",
               "pose_error_deg", "yaw_error_deg", "pitch_error_deg", "roll_error_deg")
FAN_WEIGHTS = "fan_2dfan4"


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
        "missing_target_group": "shape: the reference photo's DECA shape code; other groups: NaN, named in the row's reason",
        **PROTOCOL_CONVENTION,
    }

    def __init__(self, context: ScoreContext | None = None, encoder: DecaEncoder | None = None) -> None:
        super().__init__(context)
        # A plain dict, not a submodule: the encoder's weights must not enter the metric's state.
        self._models: dict[str, DecaEncoder] = {} if encoder is None else {"encoder": encoder.eval()}
        self.protocol = scoring_protocol(self.context.options)
        self._landmarks = None

    @property
    def encoder(self) -> DecaEncoder:
        if "encoder" not in self._models:
            self._models["encoder"] = load_deca_encoder(self.context.weights["deca_model"], self.device_name)
        return self._models["encoder"]

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
                if "shape" not in item.target:  # a method that knows no target: shape of the reference's encoding
                    shape = self.reference_features(item.identity_id, item.reference, self._reference_shape, item.reference_sha256)
                    if shape is not None:
                        item.target = {**item.target, "shape": shape}
                pending.append(index)
        found = []
        for index, (square, how) in zip(pending, self._squares([items[i].image for i in pending])):
            if square is None:
                finder = "MTCNN" if how["crop"] == "bbox" else f"{how['landmarks']} (68 landmarks)"
                rows[index] = ItemScore(dict(unscored), "no_face", f"{finder} found no face", how)
            else:
                found.append((index, square, how))
        if found:
            crops = deca_crops([items[index].image for index, _, _ in found], [square for _, square, _ in found], self.device_name)
            for (index, _, how), code in zip(found, encode_crops(self.encoder, crops)):
                try:
                    rows[index] = self._compare(code, items[index].target, how)
                except ValueError as exc:  # a target group of the wrong size
                    rows[index] = ItemScore(dict(unscored), "error", f"head-control target: {exc}")
        return rows

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

    def _reference_shape(self, image) -> np.ndarray | None:
        """DECA's shape code of a reference photo (None when no face is found in it)."""
        ((square, _),) = self._squares([image])
        if square is None:
            return None
        (code,) = encode_crops(self.encoder, deca_crop_square(image, square)[None])
        return np.asarray(code["shape"], dtype=np.float64)

    @staticmethod
    def _compare(code: dict[str, np.ndarray], target: dict[str, np.ndarray], how: dict) -> ItemScore:
        values = {}
        for group in RMSE_GROUPS:
            try:
                values[f"rmse_{group}"] = coefficient_rmse(code[group], target[group]) if group in target else math.nan
            except ValueError as exc:
                raise ValueError(f"{group}: {exc}") from None
        extra = dict(how)
        missing = [group for group in RMSE_GROUPS if group not in target]
        if "pose" in target:
            generated_rotvec, target_rotvec = code["pose"][:3], np.asarray(target["pose"]).reshape(-1)[:3]
            values.update(pose_errors(generated_rotvec, target_rotvec))
            extra["signed_deg"] = euler_differences(generated_rotvec, target_rotvec)
        else:
            values.update({name: math.nan for name in VALUE_NAMES if name.endswith("_deg")})
        reason = f"target has no {', '.join(missing)}" if missing else ""
        return ItemScore(values, "ok", reason, extra)
