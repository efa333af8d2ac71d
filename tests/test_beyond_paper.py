"""Benchmark axes beyond the paper (issue 13): extreme poses, FastComposer's protocol as a spec."""

from __future__ import annotations

import json
from pathlib import Path

from caphuman_bench.benchmark import Benchmark, axis_angle_to_euler
from caphuman_bench.stages.plan import plan_tasks
from tests.cli_helpers import cli, only_run

FASTCOMPOSER_SPEC = Path(__file__).resolve().parents[1] / "benchmark_data" / "fastcomposer"
PAPER_CONDITIONS = {"frontal", "yaw-l45", "yaw-l20", "yaw-r20", "yaw-r45", "pitch-up20", "pitch-down20", "roll-15",
                    "jaw-open", "side-light"}


def test_the_paper_protocol_keeps_its_ten_head_conditions():
    bench = Benchmark.load()
    assert set(bench.split("full").conditions) == PAPER_CONDITIONS
    assert set(bench.split("pose").conditions) == PAPER_CONDITIONS


def test_pose_extreme_reaches_ninety_degrees_of_yaw_and_plans_every_condition():
    bench = Benchmark.load()
    split = bench.split("pose-extreme")
    yaws = sorted({round(bench.conditions[c].yaw) for c in split.conditions})
    assert yaws == [-90, -75, -60, -45, -20, 0, 20, 45, 60, 75, 90]
    assert max(abs(bench.conditions[c].pitch) for c in split.conditions) == 35
    combined = [c for c in split.conditions if bench.conditions[c].yaw and bench.conditions[c].pitch]
    assert len(combined) == 4
    for cid in split.conditions:  # the stored axis-angle is the rotation its angles name
        condition = bench.conditions[cid]
        yaw, pitch, roll = axis_angle_to_euler(condition.pose[:3])
        assert abs(yaw - condition.yaw) < 1e-3 and abs(pitch - condition.pitch) < 1e-3
    tasks = plan_tasks(bench, "pose-extreme")
    assert len(tasks) == len(split.identities) * len(split.conditions) == 2 * 19
    assert {t.condition_id for t in tasks} == set(split.conditions)


def test_pose_extreme_runs_on_the_smoke_preset(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--split", "pose-extreme",
                       "--runs-dir", runs, "--metrics", "face_detection")
    assert code == 0, err
    results = json.loads((only_run(runs) / "results.json").read_text())
    assert results["images"] == {"planned": 38, "ok": 38, "failed": 0, "missing": 0}


def test_fastcomposer_spec_is_its_evaluation_protocol():
    bench = Benchmark.load(FASTCOMPOSER_SPEC)
    full = bench.split("full")
    assert (len(full.identities), len(full.prompts), full.samples) == (15, 40, 4)
    assert len(plan_tasks(bench, "full")) == 15 * 40 * 4
    categories = [bench.prompts[p].category for p in full.prompts]
    assert [categories.count(c) for c in ("accessory", "style", "action", "context")] == [10, 10, 10, 10]
    # FastComposer's template 'a {unique} {class} ...' with the class word as the subject phrase
    assert bench.prompts["acc-00"].text.replace("{subject}", "a man") == "a man wearing a red hat"
    assert bench.prompts["sty-08"].text.replace("{subject}", "a woman") == "a Japanese woodblock print of a woman"
    assert {bench.identities[i].subject for i in full.identities} == {"a man", "a woman"}
    assert sum(bench.identities[i].subject == "a man" for i in full.identities) == 6  # IMAGE_TO_GENDER_EVAL: 6 men, 9 women


def test_fastcomposer_spec_runs_on_the_smoke_preset(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--spec", FASTCOMPOSER_SPEC,
                       "--runs-dir", runs, "--metrics", "face_detection")
    assert code == 0, err
    results = json.loads((only_run(runs) / "results.json").read_text())
    assert results["images"]["ok"] == 4 and results["benchmark_version"] == "fastcomposer-eval-1.0"
