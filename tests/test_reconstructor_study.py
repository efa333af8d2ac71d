"""Issue 26 end to end: smoke runs of `caphuman` and `controlnet_head` with each registered reconstructor
(`deca`, `emoca_v2`, `smirk`) as the head condition's source, each scored with all three, reach the
report's condition × scoring reconstructor matrix.

Random weights in each release layout (benchmarks/make_random_weights.py). The tiny models' 64² images
hold no face, so after generation each image is replaced by a face photo (skimage's astronaut, moved per
image): the head targets stay the runs' own, only the pixels the scorers read are swapped."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from tests.cli_helpers import cli

ROOT = Path(__file__).resolve().parents[1]
RECONSTRUCTORS = ("deca", "emoca_v2", "smirk")
METHODS = ("caphuman", "controlnet_head")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_random_weights as mrw

    written = mrw.write_all(tmp_path_factory.mktemp("weights"), layout="tiny", seed=0, only=["deca_model", "emoca_v2", "smirk"])
    return [f"{wid}={path}" for wid, path in written.items()]


def _faces_in(run_dir: Path) -> None:
    photo = Image.fromarray(data.astronaut()).crop((96, 0, 352, 256))
    for index, path in enumerate(sorted((run_dir / "images").glob("*.png"))):
        photo.rotate(3 * (index % 5) - 6, resample=Image.BILINEAR).save(path)


@pytest.mark.slow
def test_every_condition_and_scoring_reconstructor_reaches_the_matrix(tmp_path, capsys, monkeypatch, weights):
    runs, board = tmp_path / "runs", tmp_path / "board"
    pinned = [arg for pair in weights for arg in ("--weights", pair)]
    judges = [arg for name in RECONSTRUCTORS for arg in ("--head-reconstructor", name)]
    for method in METHODS:
        for name in RECONSTRUCTORS:
            code, _, err = cli(capsys, monkeypatch, "run", "--method", method, "--preset", "smoke", "--param",
                               f"reconstructor={name}", "--runs-dir", runs, "--device", "cpu", "--no-score")
            assert code == 0, err
    for run_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        _faces_in(run_dir)
        code, _, err = cli(capsys, monkeypatch, "score", run_dir, "--metrics", "head_control", *judges, *pinned, "--device", "cpu")
        assert code == 0, err
        scoring = json.loads((run_dir / "scoring.json").read_text())
        assert {"head_control", "head_control[emoca_v2]", "head_control[smirk]"} <= set(json.dumps(scoring).split('"'))
    code, _, err = cli(capsys, monkeypatch, "report", "--runs-dir", runs, "--out", board, "--html")
    assert code == 0, err

    rows = json.loads((board / "leaderboard.json").read_text())["rows"]
    labels = {r["method"] for r in rows}
    assert len(labels) == len(METHODS) * len(RECONSTRUCTORS)
    for label in labels:  # every run scored by every reconstructor, with numbers (faces were found)
        means = {r["metric"]: r["mean"] for r in rows if r["method"] == label}
        for value in ("pose_error_deg", "pose_error_deg[emoca_v2]", "pose_error_deg[smirk]", "rmse_exp[smirk]"):
            assert math.isfinite(means[value]), (label, value)
        assert means.get("rmse_light[smirk]") is None or not math.isfinite(means["rmse_light[smirk]"])  # SMIRK has no light
    page = (board / "report.html").read_text()
    assert "Head control by reconstructor" in page
    for method in METHODS:
        assert f"{method} (smoke)" in page or f"{method}</" in page
    # per method and shown value, one row per condition reconstructor
    assert page.count("<td class='l cond' rowspan=") >= len(METHODS) * len(RECONSTRUCTORS)
    targets = {json.loads((d / "run.json").read_text())["params"]["reconstructor"] for d in runs.iterdir() if d.is_dir()}
    assert targets == set(RECONSTRUCTORS)
    assert np.all([(d / "scores.parquet").exists() for d in runs.iterdir() if d.is_dir()])
