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

Each file is read through one validating reader here (scores.parquet: stages/score.py) whose
errors name the file, the line and what is wrong; every write is atomic or one complete appended
line; per-task claims keep two processes from generating the same task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from caphuman_bench.atomic import append_line, atomic_write, environment_fault, remove_stale_temps, write_json_atomic, write_text_atomic
from caphuman_bench.errors import BenchError
from caphuman_bench.tasks import Task

log = logging.getLogger(__name__)
STATUSES = ("ok", "failed")
TASK_FIELDS = {f.name: f.type for f in dataclasses.fields(Task)}
RUN_FIELDS = ("label", "method", "benchmark", "config_hash")
BENCHMARK_FIELDS = ("name", "version", "split", "spec_hash", "spec_root")


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.dropped_status_lines = 0  # torn or invalid trailing lines of status.jsonl, last read

    # -- layout -------------------------------------------------------------------------------
    run_json = property(lambda self: self.path / "run.json")
    tasks_file = property(lambda self: self.path / "tasks.jsonl")
    status_file = property(lambda self: self.path / "status.jsonl")
    images_dir = property(lambda self: self.path / "images")
    targets_dir = property(lambda self: self.path / "targets")
    cache_dir = property(lambda self: self.path / "cache")
    scores_file = property(lambda self: self.path / "scores.parquet")
    results_file = property(lambda self: self.path / "results.json")
    log_file = property(lambda self: self.path / "log.txt")  # appended by each command on the run (caphuman_bench.quiet)
    scoring_file = property(lambda self: self.path / "scoring.json")

    def image_path(self, task_id: str) -> Path:
        return self.images_dir / f"{task_id}.png"

    def target_path(self, identity_id: str, condition_id: str) -> Path:
        return self.targets_dir / f"{identity_id}__{condition_id}.npz"

    # -- creation / opening -------------------------------------------------------------------
    def initialise(self, info: dict, tasks: list[Task]) -> None:
        """Create the run, or check that an existing one was made with the same configuration.
        tasks.jsonl is derived from the configuration: a damaged one is rewritten, not trusted."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise environment_fault(exc, self.path) from None
        self.remove_stale_temps()
        old = None
        if self.run_json.exists():
            try:
                old = self.info()
            except BenchError as exc:  # the folder's name is this configuration's hash: write it again
                log.warning("%s; writing it again from this command's configuration", exc)
        if old is not None:
            if old.get("config_hash") != info["config_hash"]:
                raise BenchError(f"{self.run_json}: field 'config_hash' {old.get('config_hash')} != {info['config_hash']}: "
                                 "this folder holds a run of another configuration")
        else:
            write_json_atomic(self.run_json, info)
        lines = "".join(json.dumps(t.to_dict()) + "\n" for t in tasks)
        if self.tasks_file.exists():
            if self.tasks_file.read_bytes() != lines.encode():
                try:
                    self.tasks()
                except BenchError as exc:
                    log.warning("%s; rewriting it from the run's configuration", exc)
                    write_text_atomic(self.tasks_file, lines)
                else:
                    raise BenchError(f"{self.tasks_file}: the planned tasks differ from the existing run's")
        else:
            write_text_atomic(self.tasks_file, lines)

    def record_levers(self, device: str, levers: dict, fixed: tuple[str, ...] = ()) -> None:
        """Note in run.json the speed levers a generating process used on `device` (`acceleration` field,
        one entry per device; outside the configuration hash: they change kernels, not the model).
        The `fixed` ones change the numbers (float8): BenchError if an earlier process of this run used
        another setting, so one run never mixes images of both."""
        info = self.info()
        for earlier_device, earlier in info.get("acceleration", {}).items():
            for name in fixed:
                if bool(earlier.get(name, False)) != bool(levers.get(name, False)):
                    raise BenchError(f"{self.run_json}: its images were made with {name}={int(bool(earlier.get(name)))} on "
                                     f"{earlier_device}, this process has {name}={int(bool(levers.get(name)))}, which changes the "
                                     f"numbers: resume with the same $CAPHUMAN_BENCH_LEVERS, or start a new run")
        if info.get("acceleration", {}).get(device) != levers:
            info["acceleration"] = {**info.get("acceleration", {}), device: levers}
            write_json_atomic(self.run_json, info)

    def remove_stale_temps(self) -> None:
        removed = remove_stale_temps(self.path)
        if removed:
            log.warning("%s: removed %d temp file(s) left by an interrupted process", self.path, removed)

    def exists(self) -> bool:
        return self.run_json.exists() and self.tasks_file.exists()

    def require(self) -> "RunDir":
        if not self.exists():
            raise BenchError(f"{self.path}: not a run directory (run.json or tasks.jsonl missing)")
        return self

    def info(self) -> dict:
        """run.json, checked for the fields the stages read."""
        try:
            info = json.loads(self.run_json.read_bytes())
        except (OSError, ValueError) as exc:
            raise BenchError(f"{self.run_json}: unreadable ({exc})") from None
        if not isinstance(info, dict):
            raise BenchError(f"{self.run_json}: expected a JSON object")
        missing = [k for k in RUN_FIELDS if k not in info]
        if not missing and isinstance(info["benchmark"], dict):
            missing = [f"benchmark.{k}" for k in BENCHMARK_FIELDS if not isinstance(info["benchmark"].get(k), str)]
        elif not missing:
            missing = ["benchmark"]
        if not missing and not (isinstance(info["method"], dict) and isinstance(info["method"].get("name"), str)):
            missing = ["method.name"]
        if missing:
            raise BenchError(f"{self.run_json}: field {missing[0]!r} missing or of the wrong type")
        return info

    def tasks(self) -> list[Task]:
        """tasks.jsonl, every line checked: (file, line, what is wrong) in one line."""
        try:
            raw = self.tasks_file.read_bytes()
        except OSError as exc:
            raise environment_fault(exc, self.tasks_file) from None
        tasks, seen = [], set()
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            record = _json_line(line)
            problem = record if isinstance(record, str) else _task_problem(record)
            if problem:
                raise BenchError(f"{self.tasks_file}: line {number}: {problem}")
            if record["task_id"] in seen:
                raise BenchError(f"{self.tasks_file}: line {number}: duplicate task_id {record['task_id']!r}")
            seen.add(record["task_id"])
            tasks.append(Task(**record))
        if not tasks:
            raise BenchError(f"{self.tasks_file}: no tasks")
        if not raw.endswith(b"\n"):
            raise BenchError(f"{self.tasks_file}: truncated (no newline at its end)")
        return tasks

    # -- status log ---------------------------------------------------------------------------
    def append_status(self, task_id: str, status: str, reason: str = "", seconds: float | None = None, **extra) -> None:
        """One complete line per event, written with one checked `write` under the run's status
        lock; a line torn by a killed writer is cut off first, so no record is glued onto it."""
        record = {"task_id": task_id, "status": status, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if seconds is not None:
            record["seconds"] = round(seconds, 3)
        record.update(extra)
        with self.lock("status"):
            _cut_torn_tail(self.status_file)
            append_line(self.status_file, json.dumps(record))

    def latest_status(self) -> dict[str, dict]:
        """The last record per task. A torn or invalid line at the end (a kill, a full disk) is
        dropped and counted; one anywhere else is an error naming the file and line."""
        if not self.status_file.exists():
            return {}
        try:
            raw = self.status_file.read_bytes()
        except OSError as exc:
            raise environment_fault(exc, self.status_file) from None
        lines = raw.split(b"\n")  # the last element is b"" when the file ends with a newline
        parsed = []  # (line number, record or what is wrong with the line)
        for number, line in enumerate(lines, start=1):
            if number == len(lines) and line:
                parsed.append((number, "no newline at its end (torn)"))
            elif line.strip():
                record = _json_line(line)
                parsed.append((number, record if isinstance(record, str) else (_status_problem(record) or record)))
        last_valid = max((i for i, (_, r) in enumerate(parsed) if isinstance(r, dict)), default=-1)
        inner = [(n, p) for n, p in parsed[:last_valid] if isinstance(p, str)]
        if inner:
            number, problem = inner[0]
            raise BenchError(f"{self.status_file}: line {number}: {problem}; remove that line (its task is then redone)")
        dropped = len(parsed) - last_valid - 1
        if dropped and dropped != self.dropped_status_lines:  # once, not at every read
            log.warning("%s: dropped %d torn or invalid line(s) at its end (an interrupted write); those tasks are redone",
                        self.status_file, dropped)
        self.dropped_status_lines = dropped
        records = parsed[: last_valid + 1]
        latest = {}
        for _, record in records:
            latest[record["task_id"]] = record
        return latest

    def finished_ids(self) -> set[str]:
        """Tasks whose last status is ok and whose image is on disk."""
        return {tid for tid, rec in self.latest_status().items() if rec["status"] == "ok" and self.image_path(tid).exists()}

    def scoring(self) -> dict:
        """scoring.json (what the rows were scored with), {} when there is none; checked."""
        if not self.scoring_file.exists():
            return {}
        try:
            record = json.loads(self.scoring_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise BenchError(f"{self.scoring_file}: unreadable ({exc})") from None
        if not (isinstance(record, dict) and isinstance(record.get("metrics", {}), dict)
                and isinstance(record.get("skipped_metrics", {}), dict)):
            raise BenchError(f"{self.scoring_file}: fields 'metrics' and 'skipped_metrics' must be JSON objects")
        return record

    # -- targets ------------------------------------------------------------------------------
    def write_target(self, identity_id: str, condition_id: str, target: dict[str, np.ndarray]) -> None:
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in target.items()}
        atomic_write(self.target_path(identity_id, condition_id), lambda fh: np.savez(fh, **arrays))

    def read_target(self, identity_id: str, condition_id: str) -> dict[str, np.ndarray] | None:
        """The stored head-control target, None when there is none; a damaged file is an error."""
        path = self.target_path(identity_id, condition_id)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except Exception as exc:  # numpy raises ValueError, OSError, zipfile.BadZipFile, EOFError… on junk
            raise BenchError(f"{path}: damaged head-control target ({type(exc).__name__}: {exc}); "
                             f"delete it and rerun `caphuman-bench run` to rebuild it") from None

    @contextlib.contextmanager
    def lock(self, name: str):
        """An exclusive lock between processes writing the same run file (e.g. shards scoring)."""
        path = self.path / f".{name}.lock"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a")
        except OSError as exc:
            raise environment_fault(exc, path) from None
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def claims(self):
        """Per-task claims between processes generating this run: `claim(i)` takes a byte-range
        lock on byte i of `.claims.lock` without waiting, so two processes never generate the same
        task. The kernel drops a killed process's locks, so no claim ever goes stale."""
        path = self.path / ".claims.lock"
        try:
            fh = open(path, "a")
        except OSError as exc:
            raise environment_fault(exc, path) from None
        with fh:
            yield TaskClaims(fh)


class TaskClaims:
    def __init__(self, fh) -> None:
        self._fh = fh

    def claim(self, index: int) -> bool:
        try:
            fcntl.lockf(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, index, os.SEEK_SET)
        except OSError:  # another process holds it
            return False
        return True

    def release(self, index: int) -> None:
        fcntl.lockf(self._fh, fcntl.LOCK_UN, 1, index, os.SEEK_SET)


def _json_line(line: bytes):
    """The JSON value of one line, or a description of what is wrong with it."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except ValueError as exc:
        return f"not JSON ({exc})"


def _task_problem(record) -> str:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if set(record) != set(TASK_FIELDS):
        return f"fields must be exactly {', '.join(TASK_FIELDS)}"
    for name, kind in TASK_FIELDS.items():
        wanted = int if kind in (int, "int") else str
        if not isinstance(record[name], wanted) or isinstance(record[name], bool):
            return f"field {name!r} must be {'an integer' if wanted is int else 'a string'}"
    return ""


def _status_problem(record) -> str:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if not isinstance(record.get("task_id"), str):
        return "field 'task_id' missing or not a string"
    if record.get("status") not in STATUSES:
        return f"field 'status' must be one of {', '.join(STATUSES)}"
    return ""


def _cut_torn_tail(path: Path) -> None:
    """Cut an incomplete last line (a killed writer's) off an append-only log; the caller holds its lock."""
    try:
        with open(path, "r+b") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end == 0:
                return
            fh.seek(end - 1)
            if fh.read(1) == b"\n":
                return
            position = end
            while position > 0:
                step = min(4096, position)
                position -= step
                fh.seek(position)
                cut = fh.read(step).rfind(b"\n")
                if cut >= 0:
                    position += cut + 1
                    break
            log.warning("%s: cut off a torn last line (%d bytes) left by an interrupted write", path, end - position)
            fh.truncate(position)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise environment_fault(exc, path) from None
