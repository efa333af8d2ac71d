"""Head control scored by several FLAME reconstructors (issue 26): one family per scorer side by side in
scores.parquet, results.json, scoring.json and the leaderboard; the target's reference-photo parts read
by the scorer; unknown names and missing weights refused in one line; `ablate --reconstructor`; the
report's condition × scoring reconstructor matrix with its |yaw| bins.

Random weights only: DECA's `deca_model.tar` in its official layout (benchmarks/make_random_weights.py)
and two reconstructors registered here for the test, both reading that file: `twin` (DECA's crop, its
expression shifted by 0.5) and `bare` (its own crop: the whole image; no light)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data

from caphuman_bench.benchmark import DEFAULT_SPEC_DIR, euler_to_axis_angle
from caphuman_bench.metrics.base import ScoreContext, ScoreItem
from caphuman_bench.metrics.head_control import HeadControl
from caphuman_bench.models.deca_encoder import DecaReconstructor, encode_crops, load_deca_encoder
from caphuman_bench.models.reconstructors import RECONSTRUCTORS, ReconstructorInfo
from tests.cli_helpers import cli, only_run

ROOT = Path(__file__).resolve().parents[1]
EXP_SHIFT = 0.5


class Twin(DecaReconstructor):
    info = ReconstructorInfo(name="twin", title="DECA, expression shifted (test)", weights=("deca_model",), crop="deca",
                             groups=("shape", "exp", "pose", "cam", "light"), source="tests", licence="test")

    def encode_crops(self, crops):
        return [{**code, "exp": code["exp"] + EXP_SHIFT} for code in super().encode_crops(crops)]


class Bare(DecaReconstructor):
    info = ReconstructorInfo(name="bare", title="DECA on the whole image, no light (test)", weights=("deca_model",),
                             crop="own", groups=("shape", "exp", "pose", "cam"), source="tests", licence="test")

    def encode_crops(self, crops):
        raise NotImplementedError

    def encode_images(self, images):
        codes = []
        for image in images:
            pixels = np.asarray(image.convert("RGB").resize((224, 224)), dtype=np.float32) / 255
            if pixels.std() < 0.01:  # a blank image: no face
                codes.append(None)
                continue
            (code,) = encode_crops(self.encoder, torch.from_numpy(pixels).permute(2, 0, 1)[None])
            code.pop("light")
            codes.append(code)
        return codes


@pytest.fixture(autouse=True)
def fake_reconstructors(monkeypatch):
    monkeypatch.setitem(RECONSTRUCTORS, "twin", Twin)
    monkeypatch.setitem(RECONSTRUCTORS, "bare", Bare)


@pytest.fixture(scope="module")
def deca_file(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_random_weights as mrw

    return mrw.write_all(tmp_path_factory.mktemp("weights"), layout="tiny", only=["deca_model"])["deca_model"]


def small_spec(tmp_path) -> Path:
    """The shipped spec plus a split of one identity × one prompt × three yaws (0, 20, 45°)."""
    spec = tmp_path / "spec"
    shutil.copytree(DEFAULT_SPEC_DIR, spec)
    with open(spec / "splits.yaml", "a") as fh:
        fh.write("  yaws:\n    identities: [nasa-astronaut]\n    prompts: [acc-red-hat]\n"
                 "    conditions: [frontal, yaw-r20, yaw-r45]\n    samples: 1\n")
    return spec


# -- scoring -------------------------------------------------------------------------------------

def test_two_reconstructors_score_one_run_side_by_side(tmp_path, capsys, monkeypatch, deca_file):
    runs, spec = tmp_path / "runs", small_spec(tmp_path)
    common = ("--weights", f"deca_model={deca_file}", "--device", "cpu")
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--split", "yaws",
                       "--spec", spec, "--runs-dir", runs, "--metrics", "head_control", *common)
    assert code == 0, err
    run = only_run(runs)
    before = pd.read_parquet(run / "scores.parquet")
    signature = json.loads((run / "scoring.json").read_text())["metrics"]["head_control"]["signature"]

    code, out, err = cli(capsys, monkeypatch, "score", run, "--metrics", "head_control", *common,
                         "--head-reconstructor", "deca", "--head-reconstructor", "twin", "--head-reconstructor", "bare")
    assert code == 0, err
    scores = pd.read_parquet(run / "scores.parquet")
    assert sorted(set(scores["metric"])) == ["head_control", "head_control[bare]", "head_control[twin]"]
    deca = scores[scores["metric"] == "head_control"].set_index("task_id")
    twin = scores[scores["metric"] == "head_control[twin]"].set_index("task_id")
    bare = scores[scores["metric"] == "head_control[bare]"].set_index("task_id")
    # DECA's family is the paper's columns, untouched: same signature, rows kept from the first pass
    recorded = json.loads((run / "scoring.json").read_text())["metrics"]
    assert recorded["head_control"]["signature"] == signature
    pd.testing.assert_frame_equal(deca[["rmse_pose", "rmse_exp"]], before.set_index("task_id")[["rmse_pose", "rmse_exp"]])
    assert (deca["status"] == "ok").all() and len(deca) == 3
    # twin reads pose and shape as DECA (its shape target: its own reading of the reference) and exp shifted
    np.testing.assert_allclose(twin["rmse_pose[twin]"], deca["rmse_pose"], rtol=1e-6)
    np.testing.assert_allclose(twin["rmse_shape[twin]"], deca["rmse_shape"], rtol=1e-6)
    assert (twin["rmse_exp[twin]"] > deca["rmse_exp"] + 0.1).all()
    assert twin["rmse_pose"].isna().all() and deca["rmse_pose[twin]"].isna().all()  # each family only its own columns
    # bare estimates no light: NaN, the reason in the row; every row names its reconstructor
    assert bare["rmse_light[bare]"].isna().all() and np.isfinite(bare["pose_error_deg[bare]"]).all()
    assert set(bare["reason"]) == {"bare estimates no light"}
    assert {json.loads(e)["reconstructor"] for e in bare["extra"]} == {"bare"}
    assert {json.loads(e)["reconstructor"] for e in twin["extra"]} == {"twin"}

    for family, name in (("head_control", "deca"), ("head_control[twin]", "twin"), ("head_control[bare]", "bare")):
        assert recorded[family]["reconstructor"]["name"] == name and "numerics" in recorded[family]
    assert recorded["head_control[bare]"]["reconstructor"]["crop"] == "own"
    assert recorded["head_control[twin]"]["options"]["reconstructor"] == "twin"
    assert "reconstructor" not in recorded["head_control"]["options"]  # the paper's family's options as before

    results = json.loads((run / "results.json").read_text())
    assert results["metrics"]["rmse_exp[twin]"]["family"] == "head_control[twin]"
    assert results["metrics"]["rmse_exp[twin]"]["higher_is_better"] is False
    assert results["conventions"]["head_control[bare]"]["paper_metric"] is False
    assert "bare" in results["conventions"]["head_control[bare]"]["crop"]
    header = (run / "leaderboard.md").read_text().splitlines()[0]
    assert "| rmse_pose ↓ |" in header and "| rmse_pose[twin] ↓ |" in header and "| rmse_exp[bare] ↓ |" in header
    assert header.index("roll_error_deg ↓") < header.index("rmse_shape[bare]") < header.index("rmse_shape[twin]")

    reports = tmp_path / "reports"
    code, _, err = cli(capsys, monkeypatch, "report", run, "--out", reports, "--html", "--latex")
    assert code == 0, err
    page = (reports / "report.html").read_text()
    assert "Head control by reconstructor" in page and "How to read" in page and "scored by" in page
    assert "Pose error (twin, degrees)" in page  # the leaderboard's title of a twin column
    assert "15–30°" in page and "30–50°" in page and "0–15°" in page
    tex = (reports / "leaderboard.tex").read_text()
    assert "scored by" in tex and "30--50$^\\circ$" in tex and tex.count(r"\begin{table}") == 3

    monkeypatch.delitem(RECONSTRUCTORS, "bare")  # reported where a scorer is not installed: its rows still read
    code, _, err = cli(capsys, monkeypatch, "report", run, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    rows = json.loads((tmp_path / "elsewhere" / "leaderboard.json").read_text())["rows"]
    assert {"rmse_exp", "rmse_exp[twin]", "rmse_exp[bare]"} <= {r["metric"] for r in rows}


def test_an_unknown_reconstructor_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, out, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs,
                         "--head-reconstructor", "nope")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--head-reconstructor 'nope': unknown reconstructor; known:" in err and "deca" in err and "twin" in err
    assert not runs.exists()
    code, _, err = cli(capsys, monkeypatch, "ablate", "--method", "reference", "--preset", "smoke", "--runs-dir", runs,
                       "--reconstructor", "deca", "--reconstructor", "nope")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--reconstructor 'nope': unknown reconstructor" in err


def test_a_named_reconstructor_without_its_weights_stops_before_anything_is_written(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs,
                       "--metrics", "face_detection", "--head-reconstructor", "twin")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--head-reconstructor: head_control[twin]: missing weights: deca_model.tar" in err
    assert not runs.exists()


def test_the_target_s_reference_parts_are_read_by_the_scorer(deca_file):
    """A run whose condition DECA made (mixing position,pose: shape, exp, jaw, light from the reference):
    scored by DECA the stored target as is; by twin, those parts are twin's reading of the reference, so an
    image that is the reference itself matches them exactly, while pose and rotation stay the condition's."""
    photo = Image.fromarray(data.astronaut())
    rng = np.random.default_rng(0)
    stored = {"shape": rng.normal(size=100), "exp": rng.normal(size=50), "cam": np.array([8.0, 0.0, 0.0]),
              "pose": np.concatenate([euler_to_axis_angle(20, 0, 0), rng.normal(size=3) * 0.1]), "light": rng.normal(size=(9, 3))}
    item = ScoreItem("t", "astronaut", "p", "c", 0, photo, photo, "a person", target=stored, target_reconstructor="deca",
                     target_from_reference=("shape", "exp", "jaw", "light"))
    encoder = load_deca_encoder(deca_file)
    options = {"protocol": "caphuman-bench"}
    deca = HeadControl(ScoreContext(options=options), reconstructor=DecaReconstructor(encoder.eval(), "deca:test"))
    twin = HeadControl(ScoreContext(options={**options, "reconstructor": "twin"}), reconstructor=Twin(encoder.eval(), "twin:test"))
    deca.update([item])
    twin.update([item])
    (by_deca,), (by_twin,) = deca.last_rows, twin.last_rows
    assert twin.metric_name == "head_control[twin]" and set(by_twin.values) == {f"{v}[twin]" for v in by_deca.values}
    assert by_deca.values["rmse_shape"] > 0.5 and by_deca.values["rmse_exp"] > 0.5  # the stored random target
    for group in ("shape", "exp", "light"):
        assert by_twin.values[f"rmse_{group}[twin]"] == pytest.approx(0.0, abs=1e-6)
    # pose: rotation the condition's (20° yaw), jaw the reference's: only the rotation differs from the image's
    assert by_twin.values["pose_error_deg[twin]"] == pytest.approx(by_deca.values["pose_error_deg"], abs=1e-4)
    assert by_twin.values["rmse_pose[twin]"] < by_deca.values["rmse_pose"]
    same = ScoreItem("t", "astronaut", "p", "c", 0, photo, photo, "a person", target=stored, target_reconstructor="twin",
                     target_from_reference=("shape", "exp", "jaw", "light"))
    twin.update([same])  # twin made this condition: the stored target as is
    assert twin.last_rows[0].values["rmse_shape[twin]"] == pytest.approx(by_deca.values["rmse_shape"], rel=1e-6)


def test_target_sources_follow_the_mixing_and_the_reconstructor_param():
    from caphuman_bench.methods.head_renders import target_sources

    assert target_sources({}, {"mixing": "position,pose"}) == ("deca", ("shape", "exp", "jaw", "light"))
    assert target_sources({"reconstructor": "twin"}, {"mixing": "all"}) == ("twin", ("shape",))
    assert target_sources({}, {"mixing": "position,pose,expression"}) == ("deca", ("shape", "light"))
    assert target_sources({}, {"mixing": "lighting"}) == ("deca", ("shape", "rotation", "exp", "jaw"))
    assert target_sources({"tiny": True}, {"tiny": "FLAME's neutral code"}) == (None, ())
    assert target_sources({}, None) == (None, ())


# -- the report's matrix -------------------------------------------------------------------------

def test_yaw_bins_on_a_hand_made_table():
    from caphuman_bench.report.reconstructors import ALL, by_yaw, yaw_bin

    assert [yaw_bin(y) for y in (0.0, -14.9, 15.0, 20.0, -44.99999, 45.0, 60.0, -75.0, 90.0)] == [
        "0–15°", "0–15°", "15–30°", "15–30°", "30–50°", "30–50°", "50–70°", "≥ 70°", "≥ 70°"]
    assert yaw_bin(float("nan")) is None
    table = pd.DataFrame({"target_yaw": [0.0, 0.0, 20.0, -20.0, 45.0, -90.0, 90.0],
                          "pose_error_deg": [1.0, 3.0, 5.0, 7.0, np.nan, 20.0, 30.0]})
    summary = by_yaw(table, "pose_error_deg")
    assert list(summary) == [ALL, "0–15°", "15–30°", "≥ 70°"]  # 30–50° has no scored image: left out
    assert summary[ALL]["mean"] == pytest.approx(66.0 / 6) and summary[ALL]["n"] == 6
    assert (summary["0–15°"]["mean"], summary["15–30°"]["mean"], summary["≥ 70°"]["mean"]) == (2.0, 6.0, 25.0)
    assert summary["15–30°"]["n"] == 2 and summary["15–30°"]["ci95"][0] >= 5.0 and summary["15–30°"]["ci95"][1] <= 7.0


def _results(condition: str | None, scorers: dict[str, float], label: str) -> dict:
    params = {"tau": 0} | ({"reconstructor": condition} if condition else {})
    metrics = {}
    for judge, mean in scorers.items():
        suffix = "" if judge == "deca" else f"[{judge}]"
        family = "head_control" + suffix
        metrics[f"pose_error_deg{suffix}"] = {"mean": mean, "ci95": [mean - 1, mean + 1], "n": 4, "higher_is_better": False,
                                              "family": family, "std": 1.0}
    return {"method": label, "split": "demo", "metrics": metrics, "provenance": {"params": params}}


def _table(scorers: dict[str, float]) -> pd.DataFrame:
    yaws = [0.0, 20.0, 60.0, 75.0]
    columns = {("pose_error_deg" + ("" if j == "deca" else f"[{j}]")): [m - 3, m - 1, m + 1, m + 3] for j, m in scorers.items()}
    return pd.DataFrame({"target_yaw": yaws, **columns})


def test_the_matrix_groups_a_method_s_runs_by_condition_and_scoring_reconstructor():
    from caphuman_bench.report.pages import reconstructor_section
    from caphuman_bench.report.reconstructors import ALL, matrices, method_name, shown

    plain = {"deca": 10.0, "twin": 12.0}
    other = {"deca": 20.0, "twin": 14.0}
    results = [_results(None, plain, "caphuman[tau=0] (smoke)"), _results("twin", other, "caphuman[reconstructor=twin,tau=0] (smoke)"),
               _results(None, {"deca": 5.0}, "sd15 (smoke)")]
    assert method_name(results[1]["method"]) == "caphuman[tau=0] (smoke)" and method_name("a[reconstructor=x] (s)") == "a (s)"
    assert shown(results) and not shown([results[2]])
    found = matrices(results, [r["method"] for r in results], [_table(plain), _table(other), _table({"deca": 5.0})])
    (caphuman,) = found  # sd15's one cell (deca by deca) is its leaderboard number: no matrix
    assert caphuman["conditions"] == ["deca", "twin"] and caphuman["scorers"] == ["deca", "twin"]
    cells = caphuman["values"]["pose_error_deg"]
    assert cells[("twin", "deca")][ALL]["mean"] == 20.0 and cells[("deca", "twin")][ALL]["mean"] == 12.0
    assert cells[("twin", "twin")]["50–70°"]["mean"] == 15.0 and cells[("twin", "twin")]["≥ 70°"]["n"] == 1
    assert "rmse_exp" not in caphuman["values"]  # not scored: no table

    html = "".join(reconstructor_section(found))
    assert html.count("<table class='recon'>") == 1 and "How to read" in html
    assert html.count("class='home'") == 2 * 5  # the diagonal: deca by deca, twin by twin, all images and 4 bins each
    assert "Pose error (degrees)" in html and "lower is better" in html and "≥ 70°" in html


# -- ablate --------------------------------------------------------------------------------------

def test_ablate_sweeps_the_condition_reconstructor_and_scores_each_variant_with_every_one(tmp_path, capsys, monkeypatch,
                                                                                         deca_file):
    """A variant per condition reconstructor (the `reconstructor` parameter, declared here on a copy of the
    reference card), each scored by deca and twin; ablation.html shows the matrix."""
    import yaml

    from caphuman_bench.cards import CARDS_ENV, DEFAULT_CARDS_DIR
    from caphuman_bench.methods.reference import ReferenceMethod

    cards = tmp_path / "cards"
    cards.mkdir()
    raw = yaml.safe_load((DEFAULT_CARDS_DIR / "reference.yaml").read_text())
    raw["params"]["reconstructor"] = "deca"
    (cards / "reference.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv(CARDS_ENV, str(cards))
    monkeypatch.setitem(ReferenceMethod.param_types, "reconstructor", str)
    board = tmp_path / "board"
    code, out, err = cli(capsys, monkeypatch, "ablate", "--method", "reference", "--preset", "smoke", "--split", "yaws",
                         "--spec", small_spec(tmp_path), "--runs-dir", tmp_path / "runs", "--out", board,
                         "--metrics", "head_control", "--weights", f"deca_model={deca_file}", "--device", "cpu",
                         "--reconstructor", "deca", "--reconstructor", "twin")
    assert code == 0, err
    assert "variant 1 of 2: reference[reconstructor=deca] (smoke)" in err and "variant 2 of 2: reference[reconstructor=twin]" in err
    rows = json.loads((board / "leaderboard.json").read_text())["rows"]
    for method in ("reference[reconstructor=deca] (smoke)", "reference[reconstructor=twin] (smoke)"):
        assert {"rmse_exp", "rmse_exp[twin]"} <= {r["metric"] for r in rows if r["method"] == method}
    page = (board / "ablation.html").read_text()
    assert "Head control by reconstructor" in page and "τ = 0 · global + local features · condition by twin" in page
    assert page.count("<td class='l cond' rowspan=") == 2 * 2  # two condition rows in each of the two tables
    for run_dir in (tmp_path / "runs").iterdir():
        assert set(pd.read_parquet(run_dir / "scores.parquet")["metric"]) == {"head_control", "head_control[twin]"}
    assert math.isfinite(next(r["mean"] for r in rows if r["metric"] == "rmse_exp[twin]"))
