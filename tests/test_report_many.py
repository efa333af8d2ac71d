"""The report for many methods: Holm's step-down against a hand-checked example, the win/tie/loss
matrix, the leaderboard (ranked, grouped, titled, best marked), `report --latex`'s structure, and the
per-run aggregate cache (reused while the inputs are unchanged, never after they change)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from caphuman_bench.report.stats import (
    PairedResult,
    holm_adjust,
    paired_comparison,
    win_tie_loss,
)
from caphuman_bench.stages.report import (
    aggregate_runs,
    board_labels,
    find_runs,
    paired_pairs,
    write_html,
)
from tests.cli_helpers import cli
from tests.report_helpers import make_run, smoke_like_values


def test_holm_step_down_matches_the_hand_checked_example():
    """Holm (1979), as in statsmodels' multipletests(method="holm") and R's p.adjust("holm"); the example
    of the Wikipedia article "Holm–Bonferroni method": p = 0.01, 0.04, 0.03, 0.005 at α = 0.05 rejects
    the first and the fourth. By hand: sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06,
    0.04·1 = 0.04 → max(0.06, 0.04) = 0.06 (step-down: never below an earlier adjusted p)."""
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, None, 0.4]) == pytest.approx([0.8, None, 0.8])  # None is not a test: m = 2
    assert holm_adjust([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    assert holm_adjust([]) == []


def _result(diff: float, p: float) -> PairedResult:
    return PairedResult("id_sim_facenet", True, 100, 0.5 + diff, 0.5, diff, [diff - 0.01, diff + 0.01], p, p)


def test_win_tie_loss_adjusts_over_every_pair_of_a_value():
    # Alone, p = 0.03 and p = 0.04 would each decide their pair; adjusted together both are 0.06: ties.
    cells = win_tie_loss({(0, 1): _result(0.1, 0.03), (0, 2): _result(-0.1, 0.04)})
    assert [cells[k].outcome for k in ((0, 1), (1, 0), (0, 2), (2, 0))] == ["tie"] * 4
    assert cells[(0, 1)].p_holm == pytest.approx(0.06)
    cells = win_tie_loss({(0, 1): _result(0.1, 0.001), (0, 2): _result(-0.1, 0.02), (1, 2): _result(0.0, 0.5)})
    assert cells[(0, 1)].outcome == "win" and cells[(1, 0)].outcome == "loss"  # 0.003
    assert cells[(0, 2)].outcome == "loss" and cells[(2, 0)].outcome == "win"  # 0.04
    assert cells[(1, 2)].outcome == "tie"
    # The interval must exclude 0 as well.
    straddling = PairedResult("x", True, 100, 0.6, 0.5, 0.1, [-0.01, 0.2], 1e-6, 1e-6)
    assert win_tie_loss({(0, 1): straddling})[(0, 1)].outcome == "tie"
    # Lower is better: a positive difference loses.
    worse = PairedResult("pose_error_deg", False, 100, 9.0, 5.0, 4.0, [3.0, 5.0], 1e-6, 1e-6)
    assert win_tie_loss({(0, 1): worse})[(0, 1)].outcome == "loss"


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Four runs with planted ID similarities: best (0.9), good (0.8), good twin (0.8 + noise), worst (0.3)."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    base = smoke_like_values(12, 0)
    for name, level in (("worst_method (smoke)", 0.3), ("good (smoke)", 0.8), ("best (smoke)", 0.9),
                        ("good_twin (smoke)", 0.8)):
        values = dict(base) | {"id_sim_facenet": level + np.linspace(0, 0.05, 12) + rng.normal(0, 1e-3, 12),
                               "pose_error_deg": np.full(12, 10.0 - 10 * level)}
        make_run(root / "runs", name, values)
    runs = find_runs([root / "runs"])
    return root, runs, aggregate_runs(runs)


def test_report_page_ranks_groups_titles_and_marks_the_best(many):
    root, runs, results = many
    text = write_html(results, runs, root / "out").read_text()
    board = text.split("<table class='board'")[1].split("</table>")[0]
    names = re.findall(r"<td class='l name' data-sort='([^']+)'", board)
    assert names == ["best (smoke)", "good_twin (smoke)", "good (smoke)", "worst_method (smoke)"] or \
        names == ["best (smoke)", "good (smoke)", "good_twin (smoke)", "worst_method (smoke)"]
    groups = re.findall(r"<th class='group' colspan='(\d+)'>([^<]+)</th>", board)
    assert [g for _, g in groups] == ["Identity", "Text", "Head control"]
    heads = re.findall(r"title='([a-z0-9_]+)'>([^<]+)</th>", board)
    assert heads[:3] == [("face_detection", "Face detected (MTCNN rate) ↑"),
                         ("id_sim_facenet", "ID similarity (FaceNet cosine) ↑"), ("id_sim_dlib", "ID similarity (dlib cosine) ↑")]
    assert ("pose_error_deg", "Pose error (DECA, degrees) ↓") in heads
    assert sum(int(n) for n, _ in groups) == len(heads)
    column = 2 + [h for h, _ in heads].index("id_sim_facenet")  # after the method's name and rank
    best_marks = [re.findall(r"<td([^>]*)data-sort='[^']*'>", row)[column].count("class='best'")
                  for row in board.split("<tbody>")[1].split("</tr>")[:-1]]
    assert best_marks == [1, 0, 0, 0]  # only the first row's ID similarity is the column's best
    heat = text.split("<h3>By head condition</h3>")[1].split("</figure>")[0]  # breakdowns: HTML heatmaps, ranked rows
    assert "<b>Face detected (MTCNN rate)</b>" in heat and "<th>frontal</th><th>yaw-r20</th>" in heat
    assert re.findall(r"<tr><td class='l'>([^<]+)</td>", heat) == names
    assert "aria-sort='descending' title='id_sim_facenet'" in board and "<script>" in text and "http" not in \
        text.split("<script>")[1].split("</script>")[0]  # sorting needs no network


def test_win_tie_loss_matrix_on_the_page(many):
    root, runs, results = many
    labels = board_labels(results)
    paired = paired_pairs(results, runs, labels)
    assert len(paired) == 6  # 4 runs: every pair
    text = write_html(results, runs, root / "out2").read_text()
    matrix = text.split("<h2 id='paired'>")[1]
    first = matrix.split("</table>")[0]  # the ranking's value first: ID similarity (FaceNet cosine)
    assert "<summary>ID similarity (FaceNet cosine) ↑</summary>" in matrix.split("<table")[0]
    rows = {re.search(r"\d+\. ([^<]+)</td>", r).group(1): re.findall(r"<td class='(win|loss|tie|self)'", r)
            for r in first.split("<tbody>")[1].split("</tr>")[:-1]}
    assert rows["best (smoke)"].count("win") == 3 and rows["worst_method (smoke)"].count("loss") == 3
    assert rows["good (smoke)"].count("tie") == 1 and rows["good_twin (smoke)"].count("tie") == 1  # the twins
    assert "Holm-adjusted" in matrix and "<details><summary>The 6 comparisons in words</summary>" in matrix


def test_latex_table_structure(many, tmp_path, capsys, monkeypatch):
    root, _, _ = many
    code, _, err = cli(capsys, monkeypatch, "report", "--runs-dir", root / "runs", "--out", tmp_path, "--latex")
    assert code == 0, err
    tex = (tmp_path / "leaderboard.tex").read_text()
    lines = tex.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(cmd))
             for cmd in (r"\begin{table}", r"\begin{tabular}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}",
                         r"\end{table}")]
    assert order == sorted(order)
    spec = re.search(r"\\begin\{tabular\}\{([^}]*)\}", tex).group(1).replace(" ", "")
    columns = len(spec)
    body = lines[order[3] + 1:order[4]]
    header = lines[order[3] - 1]
    assert len(body) == 4 and all(line.endswith(r"\\") for line in body + [header])
    for line in body + [header]:
        assert line.count(" & ") == columns - 1, line
    spans = [int(n) for n in re.findall(r"\\multicolumn\{(\d+)\}\{c\}", tex)]
    assert sum(spans) == columns - 1 and "{Identity}" in tex and "{Head control}" in tex
    assert re.findall(r"\\cmidrule\(lr\)\{(\d+)-(\d+)\}", tex)[0][0] == "2"
    assert body[0].startswith("best (smoke) & ") and body[-1].startswith(r"worst\_method (smoke) & ")  # ranked, escaped
    assert re.search(r"\\textbf\{0\.9\d\d \$\\pm\$ 0\.\d+\}", body[0])  # best ID similarity in bold, mean ± half-CI
    assert r"ID similarity (FaceNet cosine) $\uparrow$" in header and "_" not in header.replace(r"\_", "")


def test_aggregates_are_cached_and_recomputed_when_an_input_changes(tmp_path, capsys, monkeypatch):
    import caphuman_bench.stages.report as stage

    run = make_run(tmp_path / "runs", "m (smoke)", smoke_like_values(12, 3))
    out = tmp_path / "out"
    assert cli(capsys, monkeypatch, "report", "--runs-dir", tmp_path / "runs", "--out", out)[0] == 0
    calls = []
    real = stage.aggregate_run
    monkeypatch.setattr(stage, "aggregate_run", lambda r: calls.append(r) or real(r))
    assert cli(capsys, monkeypatch, "report", "--runs-dir", tmp_path / "runs", "--out", out)[0] == 0
    assert calls == []  # unchanged inputs: read from <out>/.cache
    scores = pd.read_parquet(run.scores_file)
    scores.loc[scores["metric"] == "id_sim_facenet", "id_sim_facenet"] = 0.25
    scores.to_parquet(run.scores_file, index=False)
    code, _, _ = cli(capsys, monkeypatch, "report", "--runs-dir", tmp_path / "runs", "--out", out)
    assert code == 0 and len(calls) == 1  # scores.parquet changed: aggregated again
    assert "0.2500 [0.2500, 0.2500]" in (out / "leaderboard.md").read_text()
    (run.path / "status.jsonl").write_text((run.path / "status.jsonl").read_text().splitlines(keepends=True)[0])
    assert cli(capsys, monkeypatch, "report", "--runs-dir", tmp_path / "runs", "--out", out)[0] == 0
    assert len(calls) == 2  # status.jsonl changed (11 images no longer finished)


def test_paired_comparison_on_planted_runs_matches_the_direct_computation(many):
    _, runs, results = many
    paired = paired_pairs(results, runs, board_labels(results))
    from caphuman_bench.stages.report import per_image_scores

    a, b = per_image_scores(runs[0])[0], per_image_scores(runs[1])[0]
    direct = paired_comparison(a["id_sim_facenet"].to_numpy(), b.loc[a.index, "id_sim_facenet"].to_numpy(), "id_sim_facenet", True)
    (cached,) = [r for r in paired[(0, 1)] if r.metric == "id_sim_facenet"]
    assert cached == direct
