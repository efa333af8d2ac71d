"""The CLI end to end on the demo split: resumability, sharding, reports, compare, bad input."""

from __future__ import annotations

import json

from caphuman_bench.rundir import RunDir
from caphuman_bench.stages.report import aggregate_run
from tests.cli_helpers import cli, image_digests, only_run

FAST_METRICS = "face_detection,id_sim_dlib"








def test_help_lists_every_command(capsys, monkeypatch):
    code, out, _ = cli(capsys, monkeypatch, "--help")
    assert code == 0
    for command in ("run", "score", "report", "compare", "ablate", "methods", "weights", "data"):
        assert command in out


def test_weights_status_runs_offline_and_lists_every_file(capsys, monkeypatch):
    from caphuman_bench import weights

    code, out, _ = cli(capsys, monkeypatch, "weights", "status", "--json")
    assert code == 0
    rows = json.loads(out)
    assert {r["id"] for r in rows} == set(weights.manifest())
    assert any(r["present"] for r in rows) and not all(r["present"] for r in rows)


def test_run_is_resumable_and_regenerates_exactly_a_deleted_image(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    args = ("run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs, "--metrics", FAST_METRICS)
    code, first_out, err = cli(capsys, monkeypatch, *args)
    assert code == 0, err
    run = only_run(runs)
    assert "generated 12, kept 0" in err
    before = image_digests(run)
    assert len(before) == 12
    board = (run / "results.json").read_text()

    code, second_out, err = cli(capsys, monkeypatch, *args)
    assert code == 0 and "generated 0, kept 12" in err
    assert image_digests(run) == before
    assert second_out == first_out
    assert json.loads((run / "results.json").read_text())["metrics"] == json.loads(board)["metrics"]

    victim = sorted((run / "images").glob("*.png"))[3]
    victim.unlink()
    code, _, err = cli(capsys, monkeypatch, *args)
    assert code == 0 and "generated 1, kept 11" in err
    assert image_digests(run) == before
    status = [json.loads(line) for line in (run / "status.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "ok" for r in status) == 13  # append-only: 12 + the one regenerated

    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "reference (smoke)" and results["split"] == "demo"
    assert "reference (smoke)" in (run / "leaderboard.md").read_text()
    assert results["images"] == {"planned": 12, "ok": 12, "failed": 0, "missing": 0}
    assert results["provenance"]["environment"]["versions"]["torch"]
    assert results["metrics"]["id_sim_dlib"]["mean"] >= 0.99  # the reference photo against itself


def test_corrupt_reference_photo_is_a_one_line_error_before_anything_is_written(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "spec"
    import shutil

    from caphuman_bench.benchmark import DEFAULT_SPEC_DIR

    shutil.copytree(DEFAULT_SPEC_DIR, spec)
    (spec / "identities.csv").write_text((spec / "identities.csv").read_text() + "broken,a person,folder,broken.jpg,,\n")
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (spec / "splits.yaml").write_text((spec / "splits.yaml").read_text() + "  bad:\n    identities: [broken]\n    prompts: [acc-red-hat]\n    conditions: [frontal]\n    samples: 1\n")
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--split", "bad",
                       "--spec", spec, "--identities-dir", faces, "--runs-dir", runs, "--no-score")
    assert code == 2
    assert "broken" in err and "broken.jpg" in err and "Traceback" not in err
    assert not runs.exists()  # the pre-flight reads every reference photo before the run folder is written


def test_unknown_method_and_split_are_clear_errors(tmp_path, capsys, monkeypatch):
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "nope", "--runs-dir", tmp_path)
    assert code == 2 and "unknown method 'nope'" in err
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--split", "nope", "--runs-dir", tmp_path)
    assert code == 2 and "unknown split 'nope'" in err


def test_compare_gates_on_regressions(tmp_path, capsys, monkeypatch):
    def board(value, lower_value):
        return {"rows": [
            {"method": "m", "split": "demo", "metric": "id_sim_dlib", "mean": value, "higher_is_better": True},
            {"method": "m", "split": "demo", "metric": "rmse_pose", "mean": lower_value, "higher_is_better": False},
        ]}

    old, same, worse, worse_lower = (tmp_path / f"{n}.json" for n in ("old", "same", "worse", "worse_lower"))
    old.write_text(json.dumps(board(0.80, 0.10)))
    same.write_text(json.dumps(board(0.795, 0.104)))
    worse.write_text(json.dumps(board(0.70, 0.10)))
    worse_lower.write_text(json.dumps(board(0.80, 0.30)))
    assert cli(capsys, monkeypatch, "compare", old, same, "--tolerance", "0.01")[0] == 0
    code, out, _ = cli(capsys, monkeypatch, "compare", old, worse, "--tolerance", "0.01")
    assert code == 1 and "REGRESSION" in out
    assert cli(capsys, monkeypatch, "compare", old, worse_lower, "--tolerance", "0.01")[0] == 1
    assert cli(capsys, monkeypatch, "compare", old, worse, "--tolerance", "0.2")[0] == 0
    assert cli(capsys, monkeypatch, "compare", old, worse, "--metric-tolerance", "id_sim_dlib=0.2")[0] == 0


def test_report_writes_leaderboards_and_html(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    assert cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs,
               "--metrics", "face_detection")[0] == 0
    out_dir = tmp_path / "reports"
    code, out, err = cli(capsys, monkeypatch, "report", "--runs-dir", runs, "--out", out_dir, "--html")
    assert code == 0, err
    assert "reference (smoke)" in out
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "report.html"):
        assert (out_dir / name).stat().st_size > 0
    assert (only_run(runs) / "leaderboard.md").exists()
    rows = json.loads((out_dir / "leaderboard.json").read_text())["rows"]
    assert {r["metric"] for r in rows} == {"face_detection"}


def test_shards_equal_the_unsharded_run_image_for_image(tmp_path, capsys, monkeypatch):
    """CapHuman's smoke model, --shard 0/2 + 1/2 into one run directory vs one unsharded run: same bytes."""
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    common = ("run", "--method", "caphuman", "--preset", "smoke", "--no-score")
    assert cli(capsys, monkeypatch, *common, "--runs-dir", whole)[0] == 0
    for shard in ("0/2", "1/2"):
        code, _, err = cli(capsys, monkeypatch, *common, "--runs-dir", sharded, "--shard", shard)
        assert code == 0 and "generated 6" in err, err
    assert image_digests(only_run(sharded)) == image_digests(only_run(whole))
    assert len(image_digests(only_run(whole))) == 12
    assert cli(capsys, monkeypatch, "report", sharded, "--out", tmp_path / "report")[0] == 0
    assert not (only_run(sharded) / "results.json").exists()  # report only reads run directories
    assert aggregate_run(RunDir(only_run(sharded)))["images"]["ok"] == 12


def test_caphuman_switches_change_the_smoke_output(tmp_path, capsys, monkeypatch):
    """--tau, --no-global, --no-local change CapHuman's image; --tau 1000 equals --tau 0 (never drops)."""
    import shutil

    from caphuman_bench.benchmark import DEFAULT_SPEC_DIR

    spec = tmp_path / "spec"
    shutil.copytree(DEFAULT_SPEC_DIR, spec)
    with open(spec / "splits.yaml", "a") as fh:
        fh.write("  one:\n    identities: [nasa-astronaut]\n    prompts: [acc-red-hat]\n    conditions: [frontal]\n    samples: 1\n")

    def image_with(*flags) -> str:
        runs = tmp_path / ("runs" + "".join(flags).replace("-", "_"))
        code, _, err = cli(capsys, monkeypatch, "run", "--method", "caphuman", "--preset", "smoke", "--split", "one",
                           "--spec", spec, "--runs-dir", runs, "--no-score", *flags)
        assert code == 0, err
        (digest,) = image_digests(only_run(runs)).values()
        return digest

    default = image_with()
    assert image_with("--tau", "0") == default
    assert image_with("--tau", "1000") == default
    assert len({default, image_with("--tau", "500"), image_with("--no-global"), image_with("--no-local")}) == 4


def test_missing_weights_stop_the_run_before_anything_is_written(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "caphuman", "--split", "demo", "--runs-dir", runs)
    assert code == 2
    for name in ("caphuman.ckpt", "generic_model.pkl", "deca_model.tar", "registration"):
        assert name in err
    assert not runs.exists()


def test_compare_fails_when_a_metric_disappears_or_stops_being_a_number(tmp_path, capsys, monkeypatch):
    row = {"method": "m", "split": "demo", "metric": "id_sim_dlib", "mean": 0.8, "higher_is_better": True}
    other = dict(row, metric="face_detection", mean=1.0)
    old, gone, nan, unrelated = (tmp_path / f"{n}.json" for n in ("old", "gone", "nan", "unrelated"))
    old.write_text(json.dumps({"rows": [row, other]}))
    gone.write_text(json.dumps({"rows": [other]}))
    nan.write_text(json.dumps({"rows": [dict(row, mean=None), other]}))
    unrelated.write_text(json.dumps({"rows": [dict(row, method="x")]}))
    code, out, _ = cli(capsys, monkeypatch, "compare", old, gone)
    assert code == 1 and "REGRESSION (missing)" in out
    code, out, _ = cli(capsys, monkeypatch, "compare", old, nan)
    assert code == 1 and "REGRESSION (no value)" in out
    code, _, err = cli(capsys, monkeypatch, "compare", old, unrelated)
    assert code == 2 and "nothing to compare" in err


def test_methods_lists_every_card_with_its_inputs_head_input_and_weights_status(capsys, monkeypatch):
    from caphuman_bench.cards import all_cards

    code, out, _ = cli(capsys, monkeypatch, "methods", "--json")
    assert code == 0
    rows = {r["method"]: r for r in json.loads(out)}
    assert set(rows) == set(all_cards()) and len(rows) >= 22
    assert {"sd15", "controlnet_head", "controlnet_landmarks", "textual_inversion", "dreambooth", "lora", "fastcomposer",
            "ip_adapter_faceid", "ip_adapter_faceid_plusv2", "photomaker", "photomaker_v2", "instantid", "arc2face",
            "arc2face_controlnet"} <= set(rows)
    assert rows["caphuman"]["head_input"] == "CapFace" and rows["sd15"]["head_input"] == "none"
    assert rows["instantid"]["head_input"] == "landmarks" and "head" in rows["instantid"]["inputs"]
    assert all(r["smoke"] for r in rows.values())
    assert rows["sd15"]["weights"] == {"stable_diffusion_v1_5": False}  # no weights here: reported, not an error
    code, table, _ = cli(capsys, monkeypatch, "methods")
    assert code == 0 and "sd15" in table and "missing" in table  # the same, as a table for a person


def test_a_shard_scores_its_part_of_the_plan_while_other_shards_are_still_generating(tmp_path, capsys, monkeypatch):
    """Scoring cuts the planned tasks into shards, not the finished ones: rank 0 scoring before rank 1 has
    generated anything still scores exactly its own six tasks (the torchrun race that lost a row)."""
    import pandas as pd

    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs,
                       "--shard", "0/2", "--no-score")
    assert code == 0, err
    run = only_run(runs)
    assert len(list((run / "images").glob("*.png"))) == 6
    code, _, err = cli(capsys, monkeypatch, "score", run, "--shard", "0/2", "--metrics", "face_detection")
    assert code == 0, err
    assert len(pd.read_parquet(run / "scores.parquet")) == 6
