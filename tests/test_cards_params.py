"""Card parameters are declared and typed by their adapter and checked before a run is planned;
failed tasks make `run` / `ablate` exit 1; ablation variants are labelled by their overrides."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from caphuman_bench.benchmark import DEFAULT_SPEC_DIR
from caphuman_bench.cards import CARDS_ENV, DEFAULT_CARDS_DIR, get_card
from caphuman_bench.errors import BenchError
from caphuman_bench.methods.reference import ReferenceMethod
from caphuman_bench.registry import get_method
from tests.cli_helpers import cli, only_run


def card_copy(tmp_path, monkeypatch, name: str, edit) -> str:
    """Copy the shipped card `name` into a cards folder of its own, let `edit` change its YAML; its path."""
    cards = tmp_path / "cards"
    cards.mkdir(exist_ok=True)
    raw = yaml.safe_load((DEFAULT_CARDS_DIR / f"{name}.yaml").read_text())
    edit(raw)
    path = cards / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv(CARDS_ENV, str(cards))
    return str(path)


def one_image_spec(tmp_path):
    """The shipped spec plus a split of one identity × one prompt × one condition."""
    spec = tmp_path / "spec"
    shutil.copytree(DEFAULT_SPEC_DIR, spec)
    with open(spec / "splits.yaml", "a") as fh:
        fh.write("  one:\n    identities: [nasa-astronaut]\n    prompts: [acc-red-hat]\n    conditions: [frontal]\n    samples: 1\n")
    return spec


def validated(card_name: str, preset=None, overrides=None):
    card = get_card(card_name)
    return get_method(card.adapter).validated_params(card, preset, overrides or {})


def test_shipped_cards_declare_every_parameter_with_its_type():
    for name in ("caphuman", "ip_adapter_controlnet", "reference"):
        card = get_card(name)
        assert set(card.params) == set(get_method(card.adapter).param_types), name
        assert validated(name, "smoke") == card.resolve_params("smoke", {})


def test_an_unknown_preset_key_names_the_card_file_and_field(tmp_path, capsys, monkeypatch):
    path = card_copy(tmp_path, monkeypatch, "caphuman", lambda raw: raw["presets"]["smoke"].update(tua=0))
    with pytest.raises(BenchError, match=r"caphuman.yaml: field 'presets.smoke.tua': adapter 'caphuman' has no such parameter"):
        validated("caphuman")  # every preset is checked, chosen or not
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "caphuman", "--preset", "smoke", "--runs-dir", runs)
    assert code == 2 and path in err and "'presets.smoke.tua'" in err
    assert not runs.exists()


def test_wrong_typed_card_values_name_the_card_file_and_field(tmp_path, monkeypatch):
    card_copy(tmp_path, monkeypatch, "caphuman", lambda raw: raw["params"].update(guidance_scale="seven"))
    with pytest.raises(BenchError, match=r"caphuman.yaml: field 'params.guidance_scale': expected float, got 'seven' \(str\)"):
        validated("caphuman")
    card_copy(tmp_path, monkeypatch, "caphuman", lambda raw: raw["presets"]["smoke"].update(height=True))
    with pytest.raises(BenchError, match=r"field 'presets.smoke.height': expected int, got True \(bool\)"):
        validated("caphuman", "smoke")  # a bool is no int
    card_copy(tmp_path, monkeypatch, "caphuman", lambda raw: raw["params"].update(guidance_scale=7))
    assert validated("caphuman")["guidance_scale"] == 7  # an int is a fine float
    card_copy(tmp_path, monkeypatch, "caphuman", lambda raw: raw["params"].update(tau=-1))
    with pytest.raises(BenchError, match=r"caphuman.yaml: field 'params': parameter 'tau' must be >= 0"):
        validated("caphuman")


@pytest.mark.parametrize(("flags", "message"), [
    (("-p", "tua=3"), "parameter 'tua': adapter 'caphuman' has no such parameter"),
    (("-p", "guidance_scale=seven"), "parameter 'guidance_scale': expected float, got 'seven' (str)"),
    (("-p", "use_global=1"), "parameter 'use_global': expected bool, got 1 (int)"),
    (("-p", "tau=-5"), "parameter 'tau' must be >= 0"),
    (("--tau", "-5"), "parameter 'tau' must be >= 0"),
])
def test_bad_command_line_parameters_blame_the_command_line_not_the_card(tmp_path, capsys, monkeypatch, flags, message):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "caphuman", "--preset", "smoke", "--runs-dir", runs, *flags)
    assert code == 2, err
    assert "error: the command line" in err and message in err
    assert "caphuman.yaml" not in err
    assert not runs.exists()


def test_a_switch_the_method_lacks_is_a_command_line_error(tmp_path, capsys, monkeypatch):
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--no-global", "--runs-dir", tmp_path / "runs")
    assert code == 2 and "the command line" in err and "'use_global': adapter 'reference' has no such parameter" in err


def test_a_corrupt_reference_photo_stops_the_run_before_its_folder_is_written(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "spec"
    shutil.copytree(DEFAULT_SPEC_DIR, spec)
    (spec / "identities.csv").write_text((spec / "identities.csv").read_text() + "broken,a person,folder,broken.jpg,,\n")
    with open(spec / "splits.yaml", "a") as fh:
        fh.write("  bad:\n    identities: [nasa-astronaut, broken]\n    prompts: [acc-red-hat]\n    conditions: [frontal]\n    samples: 1\n")
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--split", "bad",
                       "--spec", spec, "--identities-dir", faces, "--runs-dir", runs, "--no-score")
    assert code == 2
    assert "identity 'broken'" in err and "broken.jpg" in err and "Traceback" not in err
    assert not runs.exists()


def test_failed_tasks_make_run_exit_1_after_scoring_what_succeeded(tmp_path, capsys, monkeypatch):
    real_generate = ReferenceMethod.generate

    def fails_for_grace_hopper(self, requests):
        if any(r.identity_id == "grace-hopper" for r in requests):
            raise RuntimeError("adapter exploded")
        return real_generate(self, requests)

    monkeypatch.setattr(ReferenceMethod, "generate", fails_for_grace_hopper)
    runs = tmp_path / "runs"
    # demo: 2 identities × 6 tasks, identity-major; batches of 6 keep the identities apart
    code, out, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "-p", "batch_size=6",
                         "--runs-dir", runs, "--metrics", "face_detection")
    assert code == 1, err
    run = only_run(runs)
    statuses = [json.loads(line) for line in (run / "status.jsonl").read_text().splitlines()]
    failed = [s for s in statuses if s["status"] == "failed"]
    assert len(failed) == 6 and all("adapter exploded" in s["reason"] for s in failed)
    assert len(list((run / "images").glob("*.png"))) == 6
    results = json.loads((run / "results.json").read_text())
    assert results["images"] == {"planned": 12, "ok": 6, "failed": 6, "missing": 6}
    assert results["metrics"]["face_detection"]["n"] == 6
    assert "reference[batch_size=6] (smoke)" in out  # the leaderboard is still printed
    last = err.strip().splitlines()[-1]
    assert "6 task(s) failed" in last and str(run / "status.jsonl") in last


def test_a_run_whose_tasks_all_fail_exits_1_and_keeps_its_folder(tmp_path, capsys, monkeypatch):
    def explode(self, requests):
        raise RuntimeError("adapter exploded")

    monkeypatch.setattr(ReferenceMethod, "generate", explode)
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs,
                       "--no-score")
    assert code == 1
    run = only_run(runs)
    assert (run / "run.json").exists() and (run / "tasks.jsonl").exists()
    assert len((run / "status.jsonl").read_text().splitlines()) == 12
    assert "12 task(s) failed" in err.strip().splitlines()[-1]


def test_ablation_labels_each_variant_by_its_overrides_even_when_it_reuses_a_run(tmp_path, capsys, monkeypatch):
    """τ=0 is the card's default: the variant reuses the plain smoke run, yet the board says tau=0."""
    spec, runs, board = one_image_spec(tmp_path), tmp_path / "runs", tmp_path / "board"
    common = ("--method", "caphuman", "--preset", "smoke", "--split", "one", "--spec", spec, "--runs-dir", runs)
    assert cli(capsys, monkeypatch, "run", *common, "--seed", "3", "--metrics", "face_detection")[0] == 0
    code, out, err = cli(capsys, monkeypatch, "ablate", *common, "--seed", "3", "--tau", "0", "-p", "num_inference_steps=4",
                         "--metrics", "face_detection", "--out", board)
    assert code == 0, err
    assert "caphuman[num_inference_steps=4,tau=0] (smoke)" in out and "caphuman (smoke)" not in out
    assert json.loads((only_run(runs) / "run.json").read_text())["seed"] == 3  # one run: same parameters, same seed
    rows = json.loads((board / "leaderboard.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"caphuman[num_inference_steps=4,tau=0] (smoke)"}


def test_ablate_names_each_variant_as_it_starts(tmp_path, capsys, monkeypatch):
    spec, runs = one_image_spec(tmp_path), tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "ablate", "--method", "caphuman", "--preset", "smoke", "--split", "one", "--spec",
                       spec, "--runs-dir", runs, "--tau", "0", "--tau", "500", "-p", "num_inference_steps=1",
                       "--metrics", "face_detection", "--out", tmp_path / "board")
    assert code == 0, err
    first = "variant 1 of 2: caphuman[num_inference_steps=1,tau=0] (smoke)"
    second = "variant 2 of 2: caphuman[num_inference_steps=1,tau=500] (smoke)"
    assert first in err and second in err and err.index(first) < err.index(second)
    assert err.index(first) < err.index("generated") < err.index(second)  # each name before its own run


def test_report_names_the_runs_without_scores(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    assert cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs, "--no-score")[0] == 0
    code, _, err = cli(capsys, monkeypatch, "report", "--runs-dir", runs, "--out", tmp_path / "reports")
    assert code == 0
    assert "no scores yet" in err and str(only_run(runs)) in err and "caphuman-bench score RUN" in err


def test_every_option_of_run_score_and_ablate_has_help(capsys, monkeypatch):
    import typer.main

    from caphuman_bench.cli import app

    group = typer.main.get_command(app)
    for name in ("run", "score", "ablate"):
        undocumented = [p.name for p in group.commands[name].params if not p.help and p.param_type_name == "option"]
        assert undocumented == [], name
