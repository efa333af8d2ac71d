"""Atomic file writes: a temp file in the same folder, the usual permissions, then a rename.

An interrupted process never leaves a half-written file, and other users of a shared runs folder
can read what is written (mkstemp alone would leave files private, mode 0600). Temp names are
unique per write and carry the writing host and process, so a later start can remove the ones a
killed process left behind (`remove_stale_temps`). A full disk, a read-only folder or a missing
permission is one `EnvironmentFault` naming the path and what to do.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from caphuman_bench.errors import BenchError

log = logging.getLogger(__name__)
TEMP_SUFFIX = ".tmp"
_HINTS = {
    errno.ENOSPC: "the disk is full: free space, then rerun the same command (finished work is kept)",
    errno.EDQUOT: "the disk quota is exceeded: free space, then rerun the same command (finished work is kept)",
    errno.EROFS: "the file system is read-only: choose a writable folder (e.g. --runs-dir / --out)",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
}


class EnvironmentFault(BenchError):
    """The machine, not the input, stopped a write or read: disk full, read-only, no permission."""


def environment_fault(exc: OSError, path: str | os.PathLike) -> BenchError:
    """One line naming the path, what happened and the fix."""
    hint = _HINTS.get(exc.errno, "check the path and the disk, then rerun the same command")
    return EnvironmentFault(f"{path}: {exc.strerror or exc}; {hint}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return socket.gethostname().replace(".", "_")  # no dots: temp names are split on them


def _temp_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_temp_tag()}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise environment_fault(exc, path) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: str | os.PathLike) -> None:
    """Stop before long work whose results could not be saved: `folder` is made and a small file is
    written, synced and removed in it. A read-only folder, a missing permission or a full disk is one
    `EnvironmentFault` naming the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".probe.{_temp_tag()}.", suffix=TEMP_SUFFIX, dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(bytes(4096))
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        raise environment_fault(exc, folder) from None


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one complete line with a single `write`, checked: a short write (full disk) is an
    error, never a silently torn record. The caller serialises writers (see RunDir.append_status)."""
    data = line.rstrip("\n").encode() + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise environment_fault(exc, path) from None
    if written != len(data):
        raise environment_fault(OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)"), path)


def read_cached(path: str | os.PathLike, load: Callable[[Path], Any]) -> Any:
    """A cache entry, or None when absent or unreadable: a damaged entry is a miss (recomputed and
    rewritten), never an error that stops every later run."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except Exception as exc:  # numpy, safetensors, json: each fails on junk in its own way
        log.warning("%s: unreadable cache entry (%s: %s); recomputing it", path, type(exc).__name__, exc)
        return None


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Remove temp files under `folder` left by killed processes of this host; returns how many.
    A temp file of a process that is still running, or of another host, is left alone."""
    host = _host()
    removed = 0
    for tmp in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        owner = tmp.name.rsplit(".", 3)[-3] if tmp.name.count(".") >= 3 else ""
        tmp_host, _, pid = owner.rpartition("-")
        if tmp_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no NaN, and a reader must not mistake it for a number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    text = json.dumps(json_safe(payload), indent=1, default=str, allow_nan=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))
