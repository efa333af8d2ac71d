"""Per-image host work of a batch (crops, resizes, warps, hashes) spread over the machine's cores.

A scoring batch runs its metrics one after another on the main thread, which also feeds the GPU;
the per-image preparation between network calls (DECA's skimage warp, FAN's and FaceNet's crops,
CLIP's resize, pixel digests) is what kept a GPU pass near 55 images/s. PIL, OpenCV, skimage's warp,
hashlib and numpy release the GIL while they work, so a thread pool runs them on every core with no
pickling and no change to the arithmetic: `thread_map(fn, items)` returns exactly `[fn(x) for x in
items]`. The standard library's `ThreadPoolExecutor`: a process pool would pickle every image.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

from caphuman_bench.launch import THREADS_ENV, env_number

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_inside = threading.local()


def host_threads() -> int:
    """Threads of the pool: $CAPHUMAN_BENCH_HOST_THREADS, else the usable CPUs (at most 32) — shared out
    when torchrun starts several processes on this machine ($LOCAL_WORLD_SIZE): twice each one's share,
    since a process's threads also wait on its GPU (8 scoring processes on 16 cores: 4 threads each,
    the setting measured in reports/perf/h200_2026-11-29_s3)."""
    threads = env_number(THREADS_ENV, 0)
    if threads:
        return threads
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, min(32, usable if processes == 1 else max(2, 2 * usable // processes)))


def thread_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`[fn(x) for x in items]`, computed on the process's host pool; the first exception is raised.

    Runs inline for fewer than two items, with one thread, and when called from a pool thread
    (nesting would wait on the pool from inside it)."""
    items = list(items)
    if len(items) < 2 or getattr(_inside, "active", False) or host_threads() == 1:
        return [fn(item) for item in items]
    return list(_shared_pool().map(_marked(fn), items))


def _marked(fn: Callable[[T], R]) -> Callable[[T], R]:
    def run(item: T) -> R:
        _inside.active = True
        try:
            return fn(item)
        finally:
            _inside.active = False

    return run


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(host_threads(), thread_name_prefix="host")
        return _pool
