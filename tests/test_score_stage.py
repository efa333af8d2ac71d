"""Incremental scoring: a stored row is reused only for the same image and the same settings."""

from __future__ import annotations

import json

import pandas as pd
from PIL import Image

from tests.cli_helpers import cli


def test_rows_follow_the_image_and_the_scoring_options(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    assert cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs,
               "--metrics", "id_sim_dlib")[0] == 0
    (run,) = list(runs.iterdir())

    def dlib():
        return json.loads((run / "results.json").read_text())["metrics"]["id_sim_dlib"]

    assert dlib()["n"] == 12 and dlib()["mean"] >= 0.99
    blank = sorted((run / "images").glob("*.png"))[0]
    Image.new("RGB", (256, 256), (128, 128, 128)).save(blank)  # no face any more

    assert cli(capsys, monkeypatch, "score", run, "--metrics", "id_sim_dlib", "--no-face", "skip")[0] == 0
    scores = pd.read_parquet(run / "scores.parquet")
    row = scores[scores["task_id"] == blank.stem].iloc[0]
    assert row["status"] == "no_face" and pd.isna(row["id_sim_dlib"])  # the changed image was rescored
    assert dlib()["n"] == 11
    results = json.loads((run / "results.json").read_text())
    assert results["scored_with"]["id_sim_dlib"]["options"]["no_face"] == "skip"

    assert cli(capsys, monkeypatch, "score", run, "--metrics", "id_sim_dlib")[0] == 0  # back to no_face=zero
    assert dlib()["n"] == 12 and dlib()["mean"] < 0.95  # every row rescored under the new rule
    assert json.loads((run / "results.json").read_text())["scored_with"]["id_sim_dlib"]["options"]["no_face"] == "zero"
    assert len(pd.read_parquet(run / "scores.parquet")) == 12
    assert json.loads((run / "results.json").read_text())["scored_with"]["id_sim_dlib"]["protocol"] == "fastcomposer"

    # the project's own conventions: every row rescored, the protocol named beside the numbers
    assert cli(capsys, monkeypatch, "score", run, "--metrics", "id_sim_dlib", "--protocol", "caphuman-bench")[0] == 0
    results = json.loads((run / "results.json").read_text())
    assert results["scored_with"]["id_sim_dlib"]["protocol"] == "caphuman-bench"
    assert "fastcomposer" in results["conventions"]["id_sim_dlib"]["protocol"]
    code, _, err = cli(capsys, monkeypatch, "score", run, "--protocol", "paper")
    assert code != 0 and "--protocol 'paper'" in err
