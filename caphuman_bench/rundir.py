"""The run directory: the only contract between the stages plan → generate → score → report.

    <runs-dir>/<method>-<split>-<config hash>/
      run.json          method card, resolved params, benchmark version + spec hash, versions, git, hashes
      tasks.jsonl       the planned tasks (written once; a resumed run checks it is unchanged)
      images/<task>.png generated images, written atomically
      status.jsonl      append-only per-task log: ok / failed with a reason (the last line per task wins)
      targets/          head-control targets per identity x condition (npz), when the method provides them
      cache/            per-run pre-computation (method: renders, identity tokens; metrics: reference features)
      scores.parquet    one row per image per metric family
      scoring.json      options of the last scoring pass (no-face policy, CLIP model) and metrics skipped
      results.json      aggregates with provenance
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

import numpy as np

from caphuman_bench.atomic import atomic_write, write_json_atomic, write_text_atomic
from caphuman_bench.errors import BenchError
from caphuman_bench.tasks import Task


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # -- layout -------------------------------------------------------------------------------
    run_json = property(lambda self: self.path / "run.json")
    tasks_file = property(lambda self: self.path / "tasks.jsonl")
    status_file = property(lambda self: self.path / "status.jsonl")
    images_dir = property(lambda self: self.path / "images")
    targets_dir = property(lambda self: self.path / "targets")
    cache_dir = property(lambda self: self.path / "cache")
    scores_file = property(lambda self: self.path / "scores.parquet")
    results_file = property(lambda self: self.path / "results.json")
    scoring_file = property(lambda self: self.path / "scoring.json")

    def image_path(self, task_id: str) -> Path:
        return self.images_dir / f"{task_id}.png"

    def target_path(self, identity_id: str, condition_id: str) -> Path:
        return self.targets_dir / f"{identity_id}__{condition_id}.npz"

    # -- creation / opening -------------------------------------------------------------------
    def initialise(self, info: dict, tasks: list[Task]) -> None:
        """Create the run, or check that an existing one was made with the same configuration."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.run_json.exists():
            old = self.info()
            if old.get("config_hash") != info["config_hash"]:
                raise BenchError(f"{self.run_json}: field 'config_hash' {old.get('config_hash')} != {info['config_hash']}: "
                                 "this folder holds a run of another configuration")
        else:
            write_json_atomic(self.run_json, info)
        lines = "".join(json.dumps(t.to_dict()) + "\n" for t in tasks)
        if self.tasks_file.exists():
            if self.tasks_file.read_text() != lines:
                raise BenchError(f"{self.tasks_file}: the planned tasks differ from the existing run's")
        else:
            write_text_atomic(self.tasks_file, lines)

    def exists(self) -> bool:
        return self.run_json.exists() and self.tasks_file.exists()

    def require(self) -> "RunDir":
        if not self.exists():
            raise BenchError(f"{self.path}: not a run directory (run.json or tasks.jsonl missing)")
        return self

    def info(self) -> dict:
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"{self.run_json}: unreadable ({exc})") from None

    def tasks(self) -> list[Task]:
        return [Task(**json.loads(line)) for line in self.tasks_file.read_text().splitlines() if line.strip()]

    # -- status log ---------------------------------------------------------------------------
    def append_status(self, task_id: str, status: str, reason: str = "", seconds: float | None = None, **extra) -> None:
        """One line per event, appended with a single write (atomic for lines this short)."""
        record = {"task_id": task_id, "status": status, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if seconds is not None:
            record["seconds"] = round(seconds, 3)
        record.update(extra)
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.status_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def latest_status(self) -> dict[str, dict]:
        if not self.status_file.exists():
            return {}
        latest = {}
        for line in self.status_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the task counts as not done
            latest[record["task_id"]] = record
        return latest

    def finished_ids(self) -> set[str]:
        """Tasks whose last status is ok and whose image is on disk."""
        return {tid for tid, rec in self.latest_status().items() if rec["status"] == "ok" and self.image_path(tid).exists()}

    # -- targets ------------------------------------------------------------------------------
    def write_target(self, identity_id: str, condition_id: str, target: dict[str, np.ndarray]) -> None:
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in target.items()}
        atomic_write(self.target_path(identity_id, condition_id), lambda fh: np.savez(fh, **arrays))

    def read_target(self, identity_id: str, condition_id: str) -> dict[str, np.ndarray] | None:
        path = self.target_path(identity_id, condition_id)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    @contextlib.contextmanager
    def lock(self, name: str):
        """An exclusive lock between processes writing the same run file (e.g. shards scoring)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f".{name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
