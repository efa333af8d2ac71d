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
    numerics = results["scored_with"]["id_sim_dlib"]["numerics"]  # how the rows were scored
    assert numerics["device"] == "cpu" and numerics["dtype"] == "float32" and numerics["batch_size"] == 8
    assert numerics["tf32"] == {"matmul": False, "cudnn": False, "float32_matmul_precision": "highest"}
    board = json.loads((run / "leaderboard.json").read_text())["rows"]
    assert {r["precision"] for r in board if r["metric"] == "id_sim_dlib"} == {"cpu float32, TF32 off"}

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


def test_merges_wait_for_enough_items_and_stay_a_tenth_of_the_pass(monkeypatch):
    from caphuman_bench.stages import score as stage

    clock = [100.0]
    monkeypatch.setattr(stage.time, "monotonic", lambda: clock[0])
    flushes = stage._Flushes()
    flushes.items = stage.FLUSH_EVERY - 1
    assert not flushes.due()  # too few items, however long ago
    flushes.items = stage.FLUSH_EVERY
    assert flushes.due()  # nothing merged yet: a merge costs nothing known
    flushes.merge_seconds, flushes.last = 2.0, clock[0]  # the last merge took 2 s
    clock[0] += 17.9
    assert not flushes.due()  # 2 s of merging per 18 s of scoring: 10 %
    clock[0] += 0.1
    assert flushes.due()


def test_read_ahead_keeps_the_order_and_reads_one_chunk_ahead():
    from concurrent.futures import ThreadPoolExecutor

    from caphuman_bench.stages.score import _read_ahead

    read = []
    chunks = [[1, 2], [3, 4], [5]]
    with ThreadPoolExecutor(2) as pool:
        for index, (chunk, items) in enumerate(_read_ahead(chunks, lambda t: read.append(t) or t * 10, pool)):
            assert chunk == chunks[index] and items == [t * 10 for t in chunk]
            ahead = sum(len(c) for c in chunks[: index + 2])
            assert len(read) <= ahead  # never more than one chunk beyond the current one
    assert sorted(read) == [1, 2, 3, 4, 5]


def test_image_digest_follows_the_pixels_and_is_computed_once_per_image(monkeypatch):
    import hashlib

    from caphuman_bench.faces import memo

    a, b = Image.new("RGB", (8, 8), (1, 2, 3)), Image.new("RGB", (8, 8), (1, 2, 3))
    assert memo.image_digest(a) == memo.image_digest(b)
    assert memo.image_digest(Image.new("RGB", (8, 8), (1, 2, 4))) != memo.image_digest(a)
    assert memo.image_digest(Image.new("L", (8, 8), 1)) != memo.image_digest(Image.new("L", (4, 16), 1))
    calls, sha256 = [], hashlib.sha256
    monkeypatch.setattr(memo.hashlib, "sha256", lambda *a: calls.append(1) or sha256(*a))
    c = Image.new("RGB", (8, 8), (9, 9, 9))
    first = memo.image_digest(c)
    assert memo.image_digest(c) == first and len(calls) == 1
    key = id(c)
    del c
    assert key not in memo._DIGESTS  # forgotten with its image


def test_a_pass_hands_the_gil_over_every_millisecond_and_restores_the_interval():
    import sys

    import pytest

    from caphuman_bench.stages.score import SWITCH_INTERVAL_S, prompt_gil_handover

    before = sys.getswitchinterval()
    with prompt_gil_handover():
        assert sys.getswitchinterval() == pytest.approx(min(before, SWITCH_INTERVAL_S), abs=2e-6)
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), prompt_gil_handover():
        raise RuntimeError("a metric fails")
    assert sys.getswitchinterval() == before
    sys.setswitchinterval(0.0002)
    try:
        with prompt_gil_handover():  # a shorter interval set by the caller is kept
            assert sys.getswitchinterval() == pytest.approx(0.0002, abs=2e-6)  # kept in whole microseconds
    finally:
        sys.setswitchinterval(before)
