"""MediaPipe's face mesh on still images, below the metrics and models that read it.

MediaPipe 0.10.21's legacy `solutions.face_mesh` ships its detector and mesh models in the wheel, so it
runs offline. Two users: `pose_mediapipe` (head pose by Kabsch, in the FLAME camera frame) and SMIRK's
crop (`models/smirk.py`, the box of the points in pixels). One reader, so both see the same points.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from caphuman_bench.quiet import native_stderr_logged

N_LANDMARKS = 468


class FaceMeshReader:
    """MediaPipe's legacy face mesh on still images → the first face's 468 landmarks."""

    convention = {"model": "mediapipe 0.10.21 solutions.face_mesh", "static_image_mode": True,
                  "refine_landmarks": False, "max_num_faces": 1, "min_detection_confidence": 0.5}

    def __init__(self) -> None:
        import mediapipe as mp

        # MediaPipe's C++ side prints TFLite's "Created TensorFlow Lite XNNPACK delegate", absl's
        # "All log messages before absl::InitializeLog()", and "Feedback manager requires a model with a single
        # signature" / "Using NORM_RECT without IMAGE_DIMENSIONS" warnings about its own graph: none is about
        # the image or the score, so they go to the run's log file, not the console.
        with native_stderr_logged("mediapipe"):
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, refine_landmarks=False, max_num_faces=1, min_detection_confidence=0.5
            )

    def pixel_landmarks(self, image: Image.Image) -> np.ndarray | None:
        """[468, 3] float64: (x·W, y·H, z·W) — x, y in pixels of the image, z MediaPipe's depth at x's scale."""
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        with native_stderr_logged("mediapipe"):  # the graph's threads print on the first image and the first face
            found = self._mesh.process(pixels).multi_face_landmarks
        if not found:
            return None
        height, width = pixels.shape[:2]
        points = np.array([(p.x, p.y, p.z) for p in found[0].landmark[:N_LANDMARKS]], dtype=np.float64)
        return points * np.array([width, height, width], dtype=np.float64)

    def landmarks(self, image: Image.Image) -> np.ndarray | None:
        """[468, 3] in the FLAME camera frame (x right, y up, z towards the camera): (x·W, −y·H, −z·W)."""
        points = self.pixel_landmarks(image)
        return None if points is None else points * np.array([1.0, -1.0, -1.0])

    def close(self) -> None:
        self._mesh.close()
