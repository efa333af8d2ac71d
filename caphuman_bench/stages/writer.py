"""PNG encoding and status lines off the generation critical path.

Encoding a 512×512 PNG takes ~20 ms of CPU; at batch 32 that is most of a second per batch during
which the GPU would wait. `ImageWriter` hands each finished image to a small thread pool (PIL's
encoder releases the GIL), keeps at most `max_pending` images in flight so memory stays bounded,
and re-raises the first write error when it closes, so a failed write still ends the run as it did
when writes were inline. An image's `ok` status is appended only after its file is in place.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from PIL import Image

from caphuman_bench.images import save_png_atomic


class ImageWriter:
    def __init__(self, workers: int = 4, max_pending: int = 256) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="png-writer")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []

    def submit(self, image: Image.Image, path, then: Callable[[], None] | None = None) -> None:
        """Write `image` to `path` atomically in a worker, then call `then` (e.g. append its status)."""
        self._slots.acquire()

        def job():
            try:
                save_png_atomic(image, path)
                if then is not None:
                    then()
            finally:
                self._slots.release()

        self._futures.append(self._pool.submit(job))

    def close(self) -> None:
        """Wait for every write; raise the first error."""
        self._pool.shutdown(wait=True)
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
