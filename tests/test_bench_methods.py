"""`benchmarks/bench_run.py generation --method NAME` and `compile-cache` run end to end on the CPU with
tiny models (the GPU measurement's dry run): stock and ours in one process, same outputs with the CPU levers;
the leaderboard-cost table is computed from such JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_run.py"


def _bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}, timeout=900)


@pytest.mark.parametrize("method", ["instantid", "controlnet_head"])
def test_stock_and_ours_in_one_process(method, tmp_path):
    out = tmp_path / "gen.json"
    done = _bench("generation", "--method", method, "--tiny", "--device", "cpu", "--dtype", "float32", "--batch", "1", "--steps", "2",
                  "--repeats", "1", "--levers", "fuse_qkv=1,channels_last=1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["method"] == method and data["controlnet"] and data["card_steps"] == (30 if method == "instantid" else 20)
    stock, ours = data["rows"]
    assert stock["label"] == "stock" and ours["label"] == "ours" and ours["levers"]["fuse_qkv"]
    assert ours["vs_stock"]["latent_max_abs_rel"] < 1e-4 and ours["speedup_vs_stock"] > 0
    assert data["torch"] and data["command"]


def test_an_unknown_method_is_one_line(tmp_path):
    done = _bench("generation", "--method", "reference", "--tiny", "--device", "cpu", "--out", str(tmp_path / "x.json"))
    assert done.returncode != 0 and "no family pipeline" in done.stderr


@pytest.mark.slow
def test_compile_cache_runs_cold_then_warm(tmp_path):
    out = tmp_path / "cache.json"
    done = _bench("compile-cache", "--method", "sd15", "--tiny", "--device", "cpu", "--dtype", "float32", "--batch", "1", "--repeats", "1",
                  "--steps", "2", "--levers", "compile=off", "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["attempt"] for r in data["rows"]] == ["cold", "warm"] and all("first_batch_s" in r for r in data["rows"])


def test_leaderboard_cost_measures_estimates_and_totals(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from leaderboard_cost import cost_rows, markdown, measurements

    def write(name, data):
        (tmp_path / name).write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", **data}))
        return tmp_path / name

    files = [
        write("cn.json", {"part": "generation-method", "method": "controlnet_head", "steps": 20, "rows": [
            {"label": "stock", "batch": 10, "seconds_per_batch": 2.0, "images_per_second": 5.0},
            {"label": "ours", "batch": 10, "seconds_per_batch": 1.0, "images_per_second": 10.0}]}),
        write("cap.json", {"part": "generation", "steps": 20, "rows": [
            {"label": "stock diffusers (eager)", "batch": 64, "seconds_per_batch": 11.0, "images_per_second": 5.8},
            {"label": "all + torch.compile (default)", "batch": 64, "seconds_per_batch": 6.4, "images_per_second": 10.0}]}),
        write("tiny.json", {"part": "generation-method", "method": "sd15", "steps": 2, "tiny": True, "rows": [
            {"label": "stock", "batch": 1, "seconds_per_batch": 1.0, "images_per_second": 1.0}]}),
    ]
    found, device = measurements(files)
    assert set(found) == {"controlnet_head", "caphuman"} and device == "NVIDIA H100 80GB HBM3"  # tiny runs are no cost figure
    rows = {r["card"]: r for r in cost_rows(found)}
    assert len(rows) == 21 and rows["controlnet_head"]["ours"] == 10.0
    # textual_inversion_controlnet_head: 50 steps at controlnet_head's 5 ms per image-step = 0.25 s per image
    assert rows["textual_inversion_controlnet_head"]["ours"] == pytest.approx(4.0) and "estimate from controlnet_head" in \
        rows["textual_inversion_controlnet_head"]["estimate"]
    assert "lower bound" not in rows["lora_controlnet_head"]["estimate"] and "upper bound" in rows["sd15"]["estimate"]
    assert rows["instantid"]["estimate"] == "not measured"
    text = markdown(list(rows.values()), device)
    assert "| `controlnet_head`¹ | 20 | 5.00 | 10.00 | 2.00× | 5.8 | 2.9 | measured |" in text
    assert "paper's Table 1 rows (¹), ours" in text and "3 card(s) without a figure left out" in text
