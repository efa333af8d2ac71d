"""Bring your own images: `plan --export` writes the tasks, `ingest` turns a folder of images named by
task id into a run directory that `score`, `report` and `compare` treat like any other."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.cli_helpers import cli


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo split's tasks, exported once, with stand-in renders."""
    import sys

    from _pytest.monkeypatch import MonkeyPatch

    from caphuman_bench.cli import main

    out = tmp_path_factory.mktemp("export")
    with MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["caphuman-bench", "plan", "--export", str(out), "--split", "demo",
                                 "--renders", "synthetic", "--size", "64"])
        with pytest.raises(SystemExit) as done:
            main()
    assert done.value.code in (0, None)
    return out


def images_for(exported, folder, size=(64, 64)):
    """What a method run elsewhere hands back: one image per task, named by its id."""
    folder.mkdir()
    for line in (exported / "tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        Image.open(exported / task["references"][0]).convert("RGB").resize(size).save(folder / f"{task['task_id']}.png")
    return folder


def test_export_has_every_task_with_prompt_seed_reference_and_condition(exported):
    tasks = [json.loads(line) for line in (exported / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == len({t["task_id"] for t in tasks}) > 0
    first = tasks[0]
    assert {"task_id", "identity_id", "prompt", "seed", "references", "condition", "condition_renders"} <= set(first)
    assert first["subject"] in first["prompt"] and len(first["condition"]["exp"]) == 50
    assert (exported / first["references"][0]).is_file()
    assert all((exported / p).is_file() for p in first["condition_renders"].values())


def test_ingested_folder_reaches_the_leaderboard(exported, tmp_path, monkeypatch, capsys):
    folder = images_for(exported, tmp_path / "mine")
    runs, report = tmp_path / "runs", tmp_path / "report"
    code, _, err = cli(capsys, monkeypatch, "ingest", folder, "--name", "my_method", "--split", "demo", "--runs-dir", runs,
                       "--metrics", "face_detection,id_sim_dlib")
    assert code == 0, err
    (run,) = runs.iterdir()
    assert len(list((run / "images").glob("*.png"))) == len(list(folder.glob("*.png")))
    code, _, err = cli(capsys, monkeypatch, "report", "--runs-dir", runs, "--out", report)
    assert code == 0, err
    board = json.loads((report / "leaderboard.json").read_text())
    assert "my_method" in json.dumps(board)
    # another image in the folder is another run, never mixed into the first
    first = sorted(folder.glob("*.png"))[0]
    Image.new("RGB", (64, 64), "white").save(first)
    code, _, err = cli(capsys, monkeypatch, "ingest", folder, "--name", "my_method", "--split", "demo", "--runs-dir", runs, "--no-score")
    assert code == 0, err
    assert len([p for p in runs.iterdir() if p.is_dir()]) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda f: sorted(f.glob("*.png"))[0].unlink(), "planned tasks have no image"),
    (lambda f: Image.new("RGB", (64, 64)).save(f / "not_a_task.png"), "match no task of this split"),
    (lambda f: Image.new("RGB", (64, 64)).save(f / (sorted(f.glob("*.png"))[0].stem + ".jpg")), "two images for one task"),
    (lambda f: Image.new("RGB", (32, 64)).save(sorted(f.glob("*.png"))[-1]), "every image must be 64x64"),
    (lambda f: sorted(f.glob("*.png"))[-1].write_bytes(b"not a png"), "not a readable image"),
])
def test_a_bad_folder_stops_before_any_run_folder(exported, tmp_path, monkeypatch, capsys, damage, message):
    folder = images_for(exported, tmp_path / "mine")
    damage(folder)
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "ingest", folder, "--name", "my_method", "--split", "demo", "--runs-dir", runs)
    assert code == 2 and message in err and err.count("error:") == 1
    assert not runs.exists()
