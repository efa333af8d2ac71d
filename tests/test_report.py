"""The report: paired comparison (known answers), breakdowns that sum back, byte-identical rounding,
`compare --paired` refusing runs of other tasks, and the ablation page's variants."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from caphuman_bench.report.breakdowns import AXES, YAW_LABELS, breakdown, per_image, run_spec, yaw_bin
from caphuman_bench.report.numbers import fmt, round_sig
from caphuman_bench.report.stats import paired_comparison, paired_sentence
from caphuman_bench.stages.report import aggregate_run, compare_paired, read_scores, scored_values
from tests.cli_helpers import cli
from tests.report_helpers import make_run


def test_paired_comparison_finds_a_planted_difference_with_its_sign_and_interval():
    rng = np.random.default_rng(1)
    b = rng.normal(0.6, 0.05, 400)
    a = b + 0.03 + rng.normal(0, 0.01, 400)  # A better by 0.03 per image
    r = paired_comparison(a, b, "id_sim_facenet", higher_is_better=True)
    assert r.n == 400 and r.difference == pytest.approx(0.03, abs=0.002)
    assert r.ci95[0] < 0.03 < r.ci95[1] and r.ci95[0] > 0.025 and r.ci95[1] < 0.035
    assert r.p_wilcoxon < 1e-6 and r.p_sign < 1e-6 and r.significant
    sentence = paired_sentence(r, "A", "B")
    assert re.match(r"A beats B on id_sim_facenet \(higher is better\) by 0\.0(29|30|31) \[0\.0\d\d, 0\.0\d\d\], "
                    r"p < 0\.001, n = 400$", sentence), sentence

    # Lower is better: A's larger error makes B the winner, and the improvement is stated positive.
    r = paired_comparison(b + 2.0, b, "pose_error_deg", higher_is_better=False)
    assert r.difference == pytest.approx(2.0) and not r.a_is_better()
    assert paired_sentence(r, "A", "B").startswith("B beats A on pose_error_deg (lower is better) by 2.0 [2.0, 2.0]")


def test_identical_runs_give_p_one_and_no_significance():
    values = np.random.default_rng(2).random(50)
    r = paired_comparison(values, values.copy(), "id_sim_dlib", True)
    assert r.p_wilcoxon == 1.0 and r.p_sign == 1.0 and r.ci95 == [0.0, 0.0] and not r.significant
    assert "do not differ significantly" in paired_sentence(r, "A", "B")


def test_noise_alone_is_not_significant():
    rng = np.random.default_rng(3)
    r = paired_comparison(rng.normal(0, 1, 300), rng.normal(0, 1, 300), "id_sim_dlib", True)
    assert r.ci95[0] < 0 < r.ci95[1] and r.p_wilcoxon > 0.05 and not r.significant


def test_pairs_with_a_missing_value_are_left_out():
    a = np.array([0.5, np.nan, 0.7, 0.9])
    b = np.array([0.4, 0.5, np.nan, 0.8])
    assert paired_comparison(a, b, "x", True).n == 2


def test_breakdowns_sum_back_to_the_overall_mean(tmp_path):
    run = make_run(tmp_path, "m (smoke)", samples=3)  # 2 identities × 3 prompts × 2 conditions × 3
    scores = read_scores(run)
    names, _ = scored_values(scores)
    table = per_image(run, scores, names, run_spec(run))
    assert len(table) == 36 and set(table["yaw_bin"]) == {YAW_LABELS[0], YAW_LABELS[1]}  # frontal 0°, yaw-r20
    assert set(table["category"]) == {"accessory", "style", "context"}
    for axis in AXES:
        frame = breakdown(table, axis, names)
        for name in names:
            part = frame[frame["metric"] == name]
            overall = np.nanmean(table[name])
            assert (part["mean"] * part["n"]).sum() / part["n"].sum() == pytest.approx(overall, rel=1e-12)
            assert part["n"].sum() == table[name].notna().sum()

    results = aggregate_run(run)
    by_condition = results["breakdowns"]["condition"]
    assert list(by_condition) == ["frontal", "yaw-r20"]  # the spec's order
    assert by_condition["frontal"]["id_sim_dlib"]["n"] == 18
    assert set(results["breakdowns"]) == {"condition", "abs_yaw", "category", "identity"}
    from caphuman_bench.stages.report import breakdowns_table

    long = breakdowns_table([results])
    frontal = long[(long["axis"] == "condition") & (long["group"] == "frontal") & (long["metric"] == "id_sim_dlib")]
    assert frontal["n"].tolist() == [18]


def test_yaw_bins():
    assert [yaw_bin(y) for y in (0, -9.9, 20, -45, 90)] == [YAW_LABELS[0], YAW_LABELS[0], YAW_LABELS[1], YAW_LABELS[2], YAW_LABELS[3]]


def test_numbers_are_written_rounded_and_reruns_are_byte_identical(tmp_path, capsys, monkeypatch):
    assert round_sig(0.123456789) == 0.1235 and round_sig(12345.678) == 12350.0 and round_sig(float("nan")) is None
    assert fmt(1.0) == "1.000" and fmt(12.3456) == "12.35" and fmt(None) == "–"
    runs = tmp_path / "runs"
    make_run(runs, "a (smoke)", seed=1)
    make_run(runs, "b (smoke)", seed=2)
    written = []
    for out in ("r1", "r2"):
        assert cli(capsys, monkeypatch, "report", "--runs-dir", runs, "--out", tmp_path / out, "--html")[0] == 0
        written.append({p.name: p.read_bytes() for p in sorted((tmp_path / out).iterdir()) if p.is_file()})
    assert written[0] == written[1] and set(written[0]) == {"leaderboard.md", "leaderboard.csv", "leaderboard.json",
                                                           "breakdowns.csv", "recognisers.csv", "report.html"}
    # The same again from the aggregates cached in r1: the same bytes.
    assert cli(capsys, monkeypatch, "report", "--runs-dir", runs, "--out", tmp_path / "r1", "--html")[0] == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "r1").iterdir() if p.is_file()} == written[0]
    rows = json.loads(written[0]["leaderboard.json"])["rows"]
    for row in rows:
        for key in ("mean", "std", "ci95_low", "ci95_high"):
            if row[key] is not None:
                assert row[key] == round_sig(row[key])
    md = written[0]["leaderboard.md"].decode()
    assert "[" in md and "face_detection ↑ | id_sim_dlib ↑" in md  # intervals; detection rate beside identity


def test_compare_paired_cli_and_refusal_of_other_tasks(tmp_path, capsys, monkeypatch):
    n = 12
    base = np.linspace(0.5, 0.8, n)
    a = make_run(tmp_path, "a (smoke)", {"id_sim_dlib": base + 0.1, "face_detection": np.ones(n)})
    b = make_run(tmp_path, "b (smoke)", {"id_sim_dlib": base, "face_detection": np.ones(n)})
    code, out, err = cli(capsys, monkeypatch, "compare", "--paired", a.path, b.path)
    assert code == 0, err
    assert "a (smoke) beats b (smoke) on id_sim_dlib (higher is better) by 0.10 [0.10, 0.10], p < 0.001, n = 12" in out
    assert "do not differ significantly on face_detection" in out
    results = {r.metric: r for r in compare_paired(a, b)}
    assert results["id_sim_dlib"].difference == pytest.approx(0.1)

    short = make_run(tmp_path / "other", "c (smoke)", drop_tasks=2)
    code, _, err = cli(capsys, monkeypatch, "compare", "--paired", a.path, short.path)
    assert code == 2 and "tasks differ" in err and "2 only in the first" in err and "Traceback" not in err


def test_ablation_page_reads_each_variant_from_its_parameters(tmp_path):
    from caphuman_bench.stages.report import write_ablation

    runs = tmp_path / "runs"
    results, variant_runs = [], []
    for tau, use_local, shift in ((0, True, 0.0), (500, True, -0.1), (0, False, -0.2), (500, False, -0.3)):
        run = make_run(runs, f"caphuman[tau={tau},local={use_local}] (smoke)",
                       {"id_sim_dlib": np.linspace(0.7, 0.9, 12) + shift},
                       params={"tau": tau, "use_global": True, "use_local": use_local}, seed=tau)
        results.append(aggregate_run(run))
        variant_runs.append(run)
    page = write_ablation(results, tmp_path / "ablation", variant_runs)
    text = page.read_text()  # each variant against the first, image by image, named by what was swept
    assert "τ = 0 · global + local features beats τ = 500 · global feature only on id_sim_dlib" in text
    assert "by 0.30 [0.30, 0.30], p &lt; 0.001, n = 12" in text
    assert "<h2 id='samples-tau-0'>Images at τ = 0</h2>" in text and "<h2 id='samples-tau-500'>Images at τ = 500</h2>" in text
    grid = text.split("Images at τ = 500")[1].split("</section>")[0]  # that τ's two variants side by side
    assert grid.count("<figcaption>global + local features</figcaption>") == 1
    assert grid.count("<figcaption>global feature only</figcaption>") == 1
    assert "<code>caphuman[tau=500,local=False] (smoke)</code>" in text  # the run label, one click away
    names = sorted(p.name for p in page.parent.iterdir())
    assert names == ["ablation.html", "ablation_features_id_sim_dlib.png", "ablation_features_id_sim_dlib.svg",
                     "ablation_tau.png", "ablation_tau.svg"]
    svg = (page.parent / "ablation_tau.svg").read_text()
    assert "<dc:date>" not in svg  # no timestamp: reruns write the same bytes


def test_a_scoring_protocol_in_the_conventions_is_shown(tmp_path):
    from caphuman_bench.stages.report import write_html, write_leaderboard

    run = make_run(tmp_path / "runs", "m (smoke)")
    results = aggregate_run(run)
    results["conventions"]["id_sim_dlib"]["protocol"] = "FastComposer's, no face scores 0"
    results["scored_with"]["face_detection"] = {"protocol": "caphuman-bench"}  # as scoring.json records it
    write_leaderboard([results], tmp_path / "out")
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "| protocol |" in md and "FastComposer's, no face scores 0, caphuman-bench" in md
    rows = {r["metric"]: r for r in json.loads((tmp_path / "out" / "leaderboard.json").read_text())["rows"]}
    assert rows["face_detection"]["protocol"] == "caphuman-bench"
    page = write_html([results], [run], tmp_path / "out", grid_tasks=2).read_text()
    assert "FastComposer&#x27;s, no face scores 0" in page


def test_results_are_aggregated_and_written_under_the_scores_lock(tmp_path, monkeypatch):
    """Shards scoring one run each write results.json: aggregating while holding the lock that
    merges into scores.parquet take means the last writer saw every merged row."""
    import fcntl

    import caphuman_bench.stages.report as report_stage

    run = make_run(tmp_path, "m (smoke)", samples=1)
    held = []

    def aggregate_checking_the_lock(r):
        with open(r.path / ".scores.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
                fcntl.flock(fh, fcntl.LOCK_UN)
            except BlockingIOError:
                held.append(True)
        return aggregate_run(r)

    monkeypatch.setattr(report_stage, "aggregate_run", aggregate_checking_the_lock)
    results = report_stage.write_run_results(run)
    assert held == [True]
    assert json.loads(run.results_file.read_text())["metrics"] == json.loads(json.dumps(results["metrics"]))


def test_paper_row_is_the_summarys_key_results():
    """The headline row: ID sim 0.8363, CLIP score 0.2256, prompt accuracy 74.17 % (shared/seed summary,
    Key Results), each under the metric of the same scale; no value without a checkable source."""
    from caphuman_bench.report.paper import load_paper

    paper = load_paper()
    (row,) = paper["rows"]
    assert row["card"] == "caphuman"
    assert row["values"] == {"id_sim_facenet": 0.8363, "clip_score": 0.2256, "prompt_acc_top1": 0.7417}
    assert paper["columns"] == {"ID sim": "id_sim_facenet", "CLIP score": "clip_score", "Prompt acc": "prompt_acc_top1"}
    assert "74.17" in paper["source"] and "seed" in paper["transcribed_from"]
