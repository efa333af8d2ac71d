"""Synthetic run directories for the report tests: real run files (run.json, tasks, status, images,
scores.parquet) with planted per-image scores, made in milliseconds instead of generated."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from caphuman_bench.benchmark import DEFAULT_SPEC_DIR, Benchmark
from caphuman_bench.registry import all_metrics
from caphuman_bench.rundir import RunDir
from caphuman_bench.tasks import Task


def make_run(root, name: str, values: dict[str, np.ndarray] | None = None, *, split: str = "demo", samples: int = 1,
             params: dict | None = None, seed: int = 0, drop_tasks: int = 0) -> RunDir:
    """A scored run of the spec's `split` (× `samples`); `values[name]` gives each task's score of that
    value (id_sim_dlib family: id_sim_dlib, id_dist_dlib, id_match_dlib; face_detection), else random."""
    bench = Benchmark.load(DEFAULT_SPEC_DIR)
    s = bench.split(split)
    tasks = [Task(f"{i}__{p}__{c}__s{k}", i, p, c, k, 1000 + n)
             for n, (i, p, c, k) in enumerate((i, p, c, k) for i in s.identities for p in s.prompts
                                             for c in s.conditions for k in range(samples))]
    tasks = tasks[: len(tasks) - drop_tasks]
    rng = np.random.default_rng(seed)
    values = dict(values or {})
    values.setdefault("face_detection", (rng.random(len(tasks)) < 0.8).astype(float))
    values.setdefault("id_sim_dlib", rng.uniform(0.6, 0.95, len(tasks)))
    info = {"label": name, "method": {"name": name.split(" ")[0].split("[")[0], "head_input": "CapFace"},
            "params": params or {}, "config_hash": f"{abs(hash(name)) % 10**12:012d}", "card_hash": "c" * 12,
            "benchmark": {"name": "humaniphc", "version": bench.version, "split": split, "spec_hash": bench.spec_hash,
                          "spec_root": str(DEFAULT_SPEC_DIR), "identities_dir": None}}
    run = RunDir(root / name.replace(" ", "_"))
    run.initialise(info, tasks)
    run.images_dir.mkdir(parents=True, exist_ok=True)
    family_of = {value: family for family, cls in all_metrics().items() for value in cls.info.higher_is_better}
    families: dict[str, list[str]] = {}
    for value in values:
        families.setdefault(family_of[value], []).append(value)
    rows = []
    for n, task in enumerate(tasks):
        shade = int(40 + 200 * n / max(len(tasks), 1))
        Image.new("RGB", (64, 64), (shade, 90, 255 - shade)).save(run.image_path(task.task_id))
        run.append_status(task.task_id, "ok")
        base = {"task_id": task.task_id, "image_sha256": "0" * 64, "scored_with": "s", "identity_id": task.identity_id,
                "prompt_id": task.prompt_id, "condition_id": task.condition_id, "sample": task.sample,
                "status": "ok", "reason": "", "extra": "{}"}
        for family, members in families.items():  # one row per image per metric family, as scoring writes
            rows.append(base | {"metric": family} | {v: values[v][n] for v in members})
    pd.DataFrame(rows).to_parquet(run.scores_file, index=False)
    return run


def smoke_like_values(tasks: int, seed: int) -> dict[str, np.ndarray]:
    """Planted scores of the headline values a smoke run of the paper's metrics reports, one method
    a little better or worse than another (seeded)."""
    rng = np.random.default_rng(seed)
    skill = rng.uniform(-0.1, 0.1)
    return {"face_detection": (rng.random(tasks) < 0.85).astype(float),
            "id_sim_facenet": np.clip(rng.normal(0.6 + skill, 0.08, tasks), -1, 1),
            "id_sim_dlib": np.clip(rng.normal(0.8 + skill, 0.05, tasks), -1, 1),
            "clip_score": rng.normal(0.22 - skill / 10, 0.02, tasks),
            "prompt_acc_top1": (rng.random(tasks) < 0.7 - skill).astype(float),
            "pose_error_deg": np.abs(rng.normal(8 - 20 * skill, 3, tasks)),
            "rmse_pose": np.abs(rng.normal(0.1, 0.03, tasks))}
