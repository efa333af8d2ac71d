"""Methods from outside this package reach the leaderboard: through an entry point of an installed
package, and through `--include FOLDER` (the example plugin in examples/outside_method)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from caphuman_bench import plugins
from caphuman_bench.registry import METHODS
from tests.cli_helpers import cli, only_run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "outside_method"


@pytest.fixture(autouse=True)
def forget_outside_modules(monkeypatch):
    """Each test sees only the plugins it sets up."""
    for name in (plugins.INCLUDE_ENV, plugins.CARDS_ENV):  # set, then removed: the teardown restores the variable
        monkeypatch.setenv(name, "")  # even after --include wrote it for child processes
        monkeypatch.delenv(name)
    monkeypatch.setattr(plugins, "_loaded", {})
    yield
    METHODS.pop("head_overlay", None)
    for name in [n for n in sys.modules if n.startswith(("caphuman_bench_include.", "head_overlay_bench"))]:
        del sys.modules[name]


def installed_example(tmp_path, monkeypatch) -> Path:
    """The example package as pip would leave it: the package and a dist-info with its entry points."""
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE / "head_overlay_bench", site / "head_overlay_bench")
    info = site / "head_overlay_bench-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: head-overlay-bench\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[caphuman_bench.methods]\nhead_overlay = head_overlay_bench.head_overlay\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def smoke_run_reaches_the_leaderboard(capsys, monkeypatch, tmp_path, *prefix):
    runs, out = tmp_path / "runs", tmp_path / "report"
    code, _, err = cli(capsys, monkeypatch, *prefix, "run", "--method", "head_overlay", "--preset", "smoke",
                       "--runs-dir", runs, "--metrics", "face_detection,id_sim_dlib")
    assert code == 0, err
    info = json.loads((only_run(runs) / "run.json").read_text())
    assert info["environment"]["plugins"] and info["environment"]["plugins"][0]["sha256"]
    code, stdout, err = cli(capsys, monkeypatch, *prefix, "report", "--runs-dir", runs, "--out", out)
    assert code == 0, err
    board = json.loads((out / "leaderboard.json").read_text())
    assert "head_overlay" in json.dumps(board)
    return info


def test_entry_point_method_and_its_card_reach_the_leaderboard(tmp_path, monkeypatch, capsys):
    installed_example(tmp_path, monkeypatch)
    code, stdout, _ = cli(capsys, monkeypatch, "methods", "--json")
    assert code == 0 and "head_overlay" in {row["method"] for row in json.loads(stdout)}
    info = smoke_run_reaches_the_leaderboard(capsys, monkeypatch, tmp_path)
    assert info["environment"]["plugins"][0]["source"].startswith("entry point caphuman_bench.methods: head_overlay")


def test_include_folder_method_reaches_the_leaderboard(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mine"
    shutil.copytree(EXAMPLE / "head_overlay_bench", folder)
    info = smoke_run_reaches_the_leaderboard(capsys, monkeypatch, tmp_path, "--include", folder)
    assert info["environment"]["plugins"][0]["source"] == f"--include {folder.resolve()}"


def test_an_edited_outside_adapter_is_a_new_run(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mine"
    shutil.copytree(EXAMPLE / "head_overlay_bench", folder)
    runs = tmp_path / "runs"
    args = ("--include", folder, "run", "--method", "head_overlay", "--preset", "smoke", "--runs-dir", runs, "--no-score")
    assert cli(capsys, monkeypatch, *args)[0] == 0
    module = folder / "head_overlay.py"
    module.write_text(module.read_text().replace('"opacity", 0.5', '"opacity", 0.25'))
    monkeypatch.setattr(plugins, "_loaded", {})  # a new process would import the edited file
    METHODS.pop("head_overlay", None)
    assert cli(capsys, monkeypatch, *args)[0] == 0
    assert len([p for p in runs.iterdir() if p.is_dir()]) == 2


def test_broken_plugin_and_missing_folder_are_one_line_errors(tmp_path, monkeypatch, capsys):
    code, _, err = cli(capsys, monkeypatch, "--include", tmp_path / "nowhere", "methods")
    assert code == 2 and "nowhere: not a folder" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "oops.py").write_text("raise RuntimeError('half-written plugin')\n")
    code, _, err = cli(capsys, monkeypatch, "--include", broken, "methods")
    assert code == 2 and "oops.py: could not be imported: RuntimeError: half-written plugin" in err
    assert "Traceback" not in err


def test_cards_env_adds_to_the_shipped_cards(tmp_path, monkeypatch, capsys):
    extra = tmp_path / "cards"
    extra.mkdir()
    card = (Path(plugins.__file__).parent / "method_cards" / "reference.yaml").read_text()
    (extra / "reference_copy.yaml").write_text(card.replace("name: reference", "name: reference_copy"))
    monkeypatch.setenv(plugins.CARDS_ENV, str(extra))
    code, stdout, _ = cli(capsys, monkeypatch, "methods", "--json")
    names = {row["method"] for row in json.loads(stdout)}
    assert code == 0 and {"reference", "reference_copy", "caphuman"} <= names
