"""Per-run aggregates, paired comparisons and figures kept between `report` calls, under the hash of
every input they were computed from, so a number is never shown from inputs that changed since.
(A figure's key is its drawing function's arguments and figures.py's bytes: `pages._drawn`.)

The key of a run is the sha256 of its run.json, tasks.jsonl, status.jsonl, scores.parquet and
scoring.json, of the spec files it names, of the metrics' directions and of `FORMAT` (raise it when
aggregation changes). A changed byte gives another key, so a stale entry is never read (only left
behind). Entries live in the report's folder (`<out>/.cache/`), never in a run directory: reading a
run does not write into it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from caphuman_bench.atomic import write_json_atomic
from caphuman_bench.benchmark import DEFAULT_SPEC_DIR, SPEC_ENV, spec_files_hash
from caphuman_bench.registry import all_metrics
from caphuman_bench.rundir import RunDir

FORMAT = 2  # 2: families scored by other reconstructors (head_control[NAME]) and their conventions


def run_key(run: RunDir) -> str:
    h = hashlib.sha256(f"caphuman-bench aggregate {FORMAT}\0".encode())
    for path in (run.run_json, run.tasks_file, run.status_file, run.scores_file, run.scoring_file):
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes() if path.exists() else b"(absent)")
    root = Path(run.info()["benchmark"].get("spec_root") or os.environ.get(SPEC_ENV, DEFAULT_SPEC_DIR))
    try:
        h.update(spec_files_hash(root).encode())
    except OSError:
        h.update(b"(spec unreadable)")
    directions = {f: cls.info.higher_is_better for f, cls in sorted(all_metrics().items())}
    h.update(json.dumps(directions, sort_keys=True).encode())
    return h.hexdigest()


class AggregateCache:
    """JSON entries under `folder`, named by key; None as `folder` keeps nothing."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = Path(folder) if folder else None

    def get(self, kind: str, key: str):
        if self.folder is None:
            return None
        path = self.folder / kind / f"{key}.json"
        try:
            return json.loads(path.read_bytes())
        except (OSError, ValueError):  # absent or torn: computed again
            return None

    def put(self, kind: str, key: str, value) -> None:
        if self.folder is not None:
            (self.folder / kind).mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder / kind / f"{key}.json", value)
