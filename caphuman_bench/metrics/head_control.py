"""Head control, the paper's way: DECA coefficients of the generated face vs the condition's.

Each generated image goes through MTCNN (DECA's FAN detector needs downloaded weights; the box type
is then DECA's 'bbox'), DECA's test-time crop and DECA's coarse encoder `E_flame`; its shape, pose,
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
import torch

from caphuman_bench.faces.detection import DETECTOR_CONVENTION, detect_faces
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreContext, ScoreItem
from caphuman_bench.metrics.geometry import RMSE_GROUPS, coefficient_rmse, euler_differences, pose_errors
from caphuman_bench.models.deca_encoder import DecaEncoder, deca_crop, encode_crops, load_deca_encoder
from caphuman_bench.registry import register_metric

VALUE_NAMES = ("rmse_shape", "rmse_pose", "rmse_exp", "rmse_light",
               "pose_error_deg", "yaw_error_deg", "pitch_error_deg", "roll_error_deg")
DETECTOR = "mtcnn"


@register_metric("head_control", higher_is_better={name: False for name in VALUE_NAMES}, weights=("deca_model", "mtcnn"))
class HeadControl(BenchMetric):
    """Head control: DECA-coefficient RMSE per group and pose angle error (the paper's metric)."""

    convention: ClassVar[dict] = {
        "paper_metric": True,
        "encoder": "DECA E_flame = ResnetEncoder(outsize=236) from deca_model.tar, strict layout",
        "detector": DETECTOR_CONVENTION,
        "crop": "DECA TestData, bbox type: size (w+h)/2, centre + 0.12 size down, side int(1.25 size), "
                "similarity warp to 224x224, bilinear, RGB in [0, 1], no mean/std",
        "rmse": "per image sqrt(|c_gen - c_target|^2 / d_g); shape 100, pose 6 (global+jaw), exp 50, light 27; mean over images",
        "pose_error": "geodesic angle between global rotations pose[0:3], degrees",
        "axis_errors": "|yaw|,|pitch|,|roll| differences, R = R_y(yaw) R_x(pitch) R_z(roll), FLAME camera frame, degrees",
        "no_face": "status no_face, values NaN (excluded from means)",
        "missing_target_group": "shape: the reference photo's DECA shape code; other groups: NaN, named in the row's reason",
    }

    def __init__(self, context: ScoreContext | None = None, encoder: DecaEncoder | None = None) -> None:
        super().__init__(context)
        # A plain dict, not a submodule: the encoder's weights must not enter the metric's state.
        self._models: dict[str, DecaEncoder] = {} if encoder is None else {"encoder": encoder.eval()}

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
        mtcnn = self.context.weights.get("mtcnn")
        detections = detect_faces([items[i].image for i in pending], self.device_name, mtcnn.parent if mtcnn else None)
        found = []
        for index, detection in zip(pending, detections):
            if detection is None:
                rows[index] = ItemScore(dict(unscored), "no_face", "MTCNN found no face", {"detector": DETECTOR})
            else:
                found.append((index, detection))
        if found:
            crops = torch.stack([deca_crop(items[i].image, detection.box) for i, detection in found])
            for (index, detection), code in zip(found, encode_crops(self.encoder, crops)):
                try:
                    rows[index] = self._compare(code, items[index].target, detection)
                except ValueError as exc:  # a target group of the wrong size
                    rows[index] = ItemScore(dict(unscored), "error", f"head-control target: {exc}")
        return rows

    def _reference_shape(self, image) -> np.ndarray | None:
        """DECA's shape code of a reference photo (None when MTCNN finds no face in it)."""
        mtcnn = self.context.weights.get("mtcnn")
        (detection,) = detect_faces([image], self.device_name, mtcnn.parent if mtcnn else None)
        if detection is None:
            return None
        (code,) = encode_crops(self.encoder, deca_crop(image, detection.box)[None])
        return np.asarray(code["shape"], dtype=np.float64)

    @staticmethod
    def _compare(code: dict[str, np.ndarray], target: dict[str, np.ndarray], detection) -> ItemScore:
        values = {}
        for group in RMSE_GROUPS:
            try:
                values[f"rmse_{group}"] = coefficient_rmse(code[group], target[group]) if group in target else math.nan
            except ValueError as exc:
                raise ValueError(f"{group}: {exc}") from None
        extra = {"detector": DETECTOR, "face_prob": detection.prob, "n_faces": detection.n_faces}
        missing = [group for group in RMSE_GROUPS if group not in target]
        if "pose" in target:
            generated_rotvec, target_rotvec = code["pose"][:3], np.asarray(target["pose"]).reshape(-1)[:3]
            values.update(pose_errors(generated_rotvec, target_rotvec))
            extra["signed_deg"] = euler_differences(generated_rotvec, target_rotvec)
        else:
            values.update({name: math.nan for name in VALUE_NAMES if name.endswith("_deg")})
        reason = f"target has no {', '.join(missing)}" if missing else ""
        return ItemScore(values, "ok", reason, extra)
