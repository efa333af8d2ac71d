"""CurricularFace IR-101: the authors' architecture and key layout, strict loading, the identity metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from caphuman_bench.errors import BenchError
from caphuman_bench.faces.arcface import ARCFACE_TEMPLATE, arcface_align
from caphuman_bench.metrics.base import ScoreContext, ScoreItem
from caphuman_bench.metrics.id_sim_curricularface import CurricularFaceIdentity
from caphuman_bench.models import curricularface
from caphuman_bench.models.curricularface import IRBackbone, load_curricularface

TINY_STAGES = ((8, 1), (8, 1), (16, 1), (16, 1))


def test_ir101_has_the_authors_shape_and_key_layout():
    """backbone/model_irse.py: IR_101 = 3 + 13 + 30 + 3 units; ~65.1 M parameters; BN1d without affine."""
    with torch.device("meta"):
        model = IRBackbone()
    state = model.state_dict()
    assert len(model.body) == 49
    assert sum(p.numel() for p in model.parameters()) == 65_128_768
    assert tuple(state["input_layer.0.weight"].shape) == (64, 3, 3, 3)
    assert "body.0.shortcut_layer.0.weight" not in state  # 64 → 64: identity (max-pool) shortcut
    assert tuple(state["body.3.shortcut_layer.0.weight"].shape) == (128, 64, 1, 1)  # stage 2's first unit
    assert tuple(state["body.16.shortcut_layer.0.weight"].shape) == (256, 128, 1, 1)  # stage 3 after 3 + 13 units
    assert tuple(state["body.46.shortcut_layer.0.weight"].shape) == (512, 256, 1, 1)  # stage 4 after 3 + 13 + 30
    assert tuple(state["body.5.res_layer.2.weight"].shape) == (128,)  # PReLU between the two convs
    assert tuple(state["output_layer.3.weight"].shape) == (512, 512 * 7 * 7)
    assert "output_layer.4.running_mean" in state and "output_layer.4.weight" not in state


def test_loading_is_strict_and_names_what_is_wrong(tmp_path):
    torch.manual_seed(0)
    state = IRBackbone(TINY_STAGES).state_dict()
    path = tmp_path / "r101.bin"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel prefix is accepted
    loaded = load_curricularface(path, TINY_STAGES)
    assert torch.equal(loaded.state_dict()["output_layer.3.weight"], state["output_layer.3.weight"])
    del state["body.2.res_layer.1.weight"]
    torch.save(state, path)
    with pytest.raises(BenchError, match=r"missing \['body.2.res_layer.1.weight'\]"):
        load_curricularface(path, TINY_STAGES)


def test_alignment_at_224_puts_landmarks_on_the_doubled_template():
    """insightface's norm_crop(image_size=224) scales the ArcFace template by 2."""
    landmarks = ARCFACE_TEMPLATE * 1.7 + np.array([50.0, 30.0])
    canvas = Image.new("RGB", (400, 400), "black")
    draw = ImageDraw.Draw(canvas)
    for x, y in landmarks:
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(255, 255, 255))
    aligned = arcface_align(canvas, landmarks, size=224)
    for x, y in ARCFACE_TEMPLATE * 2:
        assert aligned[int(round(y)), int(round(x))].min() > 200


@pytest.fixture()
def tiny_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(curricularface, "IR101_STAGES", TINY_STAGES)
    torch.manual_seed(1)
    model = IRBackbone()
    for module in model.modules():  # non-trivial running statistics, as a trained network has
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "glint360k_curricular_face_r101_backbone.bin"
    torch.save(model.state_dict(), path)
    return path


def test_the_metric_scores_the_same_face_one_and_a_blank_image_zero(tiny_weights):
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    metric = CurricularFaceIdentity(ScoreContext(weights={"curricularface_ir101": tiny_weights}))
    items = [ScoreItem(task_id=str(k), identity_id="a", prompt_id="p", condition_id="c", sample=0, image=image,
                       reference=astronaut, prompt="x")
             for k, image in enumerate([astronaut, ImageOps.mirror(astronaut), Image.new("RGB", (256, 256), "grey")])]
    metric.update(items)
    same, mirrored, blank = metric.last_rows
    assert same.status == "ok" and same.values["id_sim_curricularface"] == pytest.approx(1.0, abs=1e-5)
    assert mirrored.status == "ok" and mirrored.values["id_sim_curricularface"] < 1.0 - 1e-4
    assert blank.status == "no_face" and blank.values["id_sim_curricularface"] == 0.0


def test_recogniser_rank_agreement_is_kendalls_tau_over_the_methods_both_scored():
    from caphuman_bench.report.stats import recogniser_agreement

    means = {
        "id_sim_facenet": {"a": 0.9, "b": 0.5, "c": 0.3, "d": 0.1},
        "id_sim_arcface": {"a": 0.8, "b": 0.6, "c": 0.2, "d": 0.0},  # the same ranking: τ = 1
        "id_sim_dlib": {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4},  # reversed: τ = -1
        "id_sim_curricularface": {"a": 0.5, "b": 0.4},  # two methods: no τ
    }
    rows = {(r["recogniser_a"], r["recogniser_b"]): r for r in recogniser_agreement(means)}
    assert rows[("id_sim_facenet", "id_sim_arcface")]["kendall_tau"] == pytest.approx(1.0)
    assert rows[("id_sim_facenet", "id_sim_dlib")]["kendall_tau"] == pytest.approx(-1.0)
    assert rows[("id_sim_facenet", "id_sim_dlib")]["p_value"] == pytest.approx(2 / 24)  # exact test: 2 of 4! orderings as extreme
    curricular = rows[("id_sim_facenet", "id_sim_curricularface")]
    assert curricular["methods"] == 2 and curricular["kendall_tau"] is None
    # one swapped pair among four methods: (6 - 2 * 1) / 6
    swapped = recogniser_agreement({"id_sim_facenet": means["id_sim_facenet"],
                                    "id_sim_arcface": {"a": 0.8, "b": 0.2, "c": 0.6, "d": 0.0}})
    assert swapped[0]["kendall_tau"] == pytest.approx(4 / 6)


def test_the_metric_runs_in_a_smoke_run_through_the_cli(tiny_weights, tmp_path, capsys, monkeypatch):
    """`run --preset smoke` with the recogniser's file given by --weights (IR-101's layout at toy width)."""
    import json

    from tests.cli_helpers import cli, only_run

    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs,
                       "--metrics", "id_sim_curricularface", "--weights", f"curricularface_ir101={tiny_weights}")
    assert code == 0, err
    results = json.loads((only_run(runs) / "results.json").read_text())
    assert results["metrics"]["id_sim_curricularface"]["n"] == 12
    assert results["metrics"]["id_sim_curricularface"]["mean"] > 0.9  # the reference photo against itself, resized
