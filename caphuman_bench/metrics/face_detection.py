"""Face detection rate: the share of generated images in which MTCNN finds a face.

Reported beside every identity mean, because under the default no-face policy (`no_face=zero`) an
image without a face pulls the identity mean down, and under `skip` it silently would not.
"""

from __future__ import annotations

import math
from typing import ClassVar

from caphuman_bench.faces.detection import DETECTOR_CONVENTION, mtcnn_weights_dir
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreItem
from caphuman_bench.metrics.protocol import scoring_protocol
from caphuman_bench.registry import register_metric


@register_metric("face_detection", higher_is_better=True, weights=("mtcnn",))
class FaceDetectionRate(BenchMetric):
    """1 when MTCNN detects a face in the generated image, else 0; extra: n_faces, prob of the chosen face."""

    convention: ClassVar[dict] = {
        "value": "1 if MTCNN keeps a face (output-network probability > 0.7), else 0; the mean is the detection rate",
        "unreadable": "unreadable images are not scored (NaN, status unreadable)",
        **DETECTOR_CONVENTION,
    }

    def measure(self, items: list[ScoreItem]) -> list[ItemScore]:
        readable = [i for i, item in enumerate(items) if item.image is not None]
        images = [items[i].image for i in readable]
        protocol = scoring_protocol(self.context.options)
        detections = dict(zip(readable, protocol.detect(images, self.device_name, mtcnn_weights_dir(self.context.weights))))
        rows = []
        for i, item in enumerate(items):
            if i not in detections:
                rows.append(ItemScore({self.metric_name: math.nan}, "unreadable", item.image_error or "image could not be read"))
            elif detections[i] is None:
                rows.append(ItemScore({self.metric_name: 0.0}, "ok", "", {"n_faces": 0, "prob": None}))
            else:
                found = detections[i]
                rows.append(ItemScore({self.metric_name: 1.0}, "ok", "", {"n_faces": found.n_faces, "prob": round(found.prob, 6)}))
        return rows
