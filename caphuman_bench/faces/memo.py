"""Per-image results shared between the metrics of one scoring pass.

Several metric families look at the same generated image (four face metrics run MTCNN on it, two
CLIP metrics embed it). Keying a small bounded memo by the image's pixels lets them share that work
without the metrics knowing about each other (torchmetrics' `FeatureShare` idea, at the level of
per-image outputs rather than one wrapper object).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Hashable

from PIL import Image


def image_digest(image: Image.Image) -> str:
    """A key that is equal exactly when mode, size and pixels are equal."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class BoundedMemo:
    """A least-recently-used dict with a fixed capacity (one scoring batch fits many times over)."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, default: Any = None) -> Any:
        if key not in self._data:
            return default
        self._data.move_to_end(key)
        return self._data[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def put(self, key: Hashable, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()
