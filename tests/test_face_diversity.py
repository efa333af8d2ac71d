"""Face diversity (PhotoMaker's LPIPS between generated faces), with a random AlexNet backbone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from caphuman_bench.errors import BenchError
from caphuman_bench.metrics.base import ScoreContext, ScoreItem
from caphuman_bench.metrics.face_diversity import FaceDiversity, lpips_alex


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """torchvision AlexNet's `features.*` tensors, random (the classifier is not needed by LPIPS)."""
    import torchvision

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in torchvision.models.alexnet(weights=None).features.state_dict().items()}
    path = tmp_path_factory.mktemp("w") / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return Image.fromarray(data.astronaut())


def _item(task_id, image, siblings, reference):
    return ScoreItem(task_id=task_id, identity_id="a", prompt_id="p", condition_id="c", sample=0, image=image,
                     reference=reference, prompt="x", siblings=tuple(siblings))


def _score(alexnet_file, tmp_path, image, others, reference, conditions=None, options=None):
    """The row of `image` (head condition "c") among `others` (head conditions `conditions`, default all "c")."""
    paths = []
    for k, other in enumerate(others):
        paths.append((f"t{k}", (conditions or ["c"] * len(others))[k], tmp_path / f"t{k}.png"))
        other.save(paths[-1][2])
    metric = FaceDiversity(ScoreContext(weights={"lpips_alexnet": alexnet_file}, options=options or {}))
    metric.update([_item("me", image, paths, reference)])
    return metric.last_rows[0]


def test_identical_faces_have_zero_diversity_and_a_planted_difference_raises_it(alexnet_file, astronaut, tmp_path):
    same = _score(alexnet_file, tmp_path, astronaut, [astronaut, astronaut], astronaut)
    assert same.status == "ok" and same.extra["pairs"] == 2
    assert same.values["face_diversity"] == pytest.approx(0.0, abs=1e-6)
    slightly = ImageEnhance.Contrast(astronaut).enhance(0.8)
    strongly = ImageEnhance.Contrast(astronaut).enhance(0.4)
    small = _score(alexnet_file, tmp_path, astronaut, [slightly], astronaut).values["face_diversity"]
    large = _score(alexnet_file, tmp_path, astronaut, [strongly], astronaut).values["face_diversity"]
    assert 0 < small < large


def test_lpips_is_symmetric_and_the_mean_over_siblings(alexnet_file, astronaut):
    from caphuman_bench.faces.detection import aligned_crops_160, detect_faces

    a, b = astronaut, ImageEnhance.Brightness(astronaut).enhance(1.3)
    fa, fb = aligned_crops_160([a, b], detect_faces([a, b]))
    net = lpips_alex(alexnet_file, "cpu")
    with torch.inference_mode():
        ab, ba = float(net(fa[None], fb[None])), float(net(fb[None], fa[None]))
    assert ab == pytest.approx(ba, rel=1e-5) and ab > 0


def test_no_face_and_lonely_images_are_not_scored(alexnet_file, astronaut, tmp_path):
    blank = Image.new("RGB", (256, 256), (120, 120, 120))
    assert _score(alexnet_file, tmp_path, blank, [astronaut], astronaut).status == "no_face"
    alone = _score(alexnet_file, tmp_path, astronaut, [], astronaut)
    assert alone.status == "ok" and math.isnan(alone.values["face_diversity"])
    faceless_sibling = _score(alexnet_file, tmp_path, astronaut, [blank], astronaut)
    assert math.isnan(faceless_sibling.values["face_diversity"]) and faceless_sibling.extra["pairs"] == 0


def test_a_wrong_backbone_file_names_the_key(tmp_path):
    path = tmp_path / "alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, path)
    with pytest.raises(BenchError, match=r"features.0.weight' has shape"):
        lpips_alex(path, "cpu")


def test_groups_are_one_head_condition_by_default_and_all_of_them_as_an_option(alexnet_file, astronaut, tmp_path):
    """Two siblings: one of the image's own head condition (another seed, slightly different), one of
    another condition (very different). By default only the first is compared; `identity-prompt` takes both."""
    seed = ImageEnhance.Contrast(astronaut).enhance(0.8)
    other_condition = ImageEnhance.Contrast(astronaut).enhance(0.4)
    default = _score(alexnet_file, tmp_path, astronaut, [seed, other_condition], astronaut, ["c", "d"])
    alone = _score(alexnet_file, tmp_path, astronaut, [seed], astronaut)
    assert default.extra["pairs"] == 1 and default.values["face_diversity"] == pytest.approx(alone.values["face_diversity"])
    across = _score(alexnet_file, tmp_path, astronaut, [seed, other_condition], astronaut, ["c", "d"],
                    {"diversity_groups": "identity-prompt"})
    assert across.extra["pairs"] == 2 and across.values["face_diversity"] > default.values["face_diversity"]
    with pytest.raises(BenchError, match="diversity_groups"):
        FaceDiversity(ScoreContext(options={"diversity_groups": "prompt"}))


def test_the_score_stage_groups_samples_by_identity_prompt_and_condition(alexnet_file, tmp_path, capsys, monkeypatch):
    """The smoke split has one sample per head condition: alone in its group by default (NaN, 0 pairs);
    across conditions (`--diversity-groups identity-prompt`) the reference method's two identical photos
    of a prompt score 0."""
    import pandas as pd

    from tests.cli_helpers import cli, only_run

    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", runs,
                       "--metrics", "face_diversity", "--weights", f"lpips_alexnet={alexnet_file}")
    assert code == 0, err
    run = only_run(runs)
    rows = pd.read_parquet(run / "scores.parquet")
    assert len(rows) == 12 and set(rows["status"]) == {"ok"} and rows["face_diversity"].isna().all()
    assert set(rows["extra"]) == {'{"pairs": 0}'}

    code, _, err = cli(capsys, monkeypatch, "score", run, "--metrics", "face_diversity", "--diversity-groups", "identity-prompt",
                       "--weights", f"lpips_alexnet={alexnet_file}")
    assert code == 0, err
    rows = pd.read_parquet(run / "scores.parquet")
    assert np.allclose(rows["face_diversity"], 0.0, atol=1e-6) and set(rows["extra"]) == {'{"pairs": 1}'}
    scored_with = json.loads((run / "results.json").read_text())["scored_with"]["face_diversity"]
    assert scored_with["options"]["diversity_groups"] == "identity-prompt"
    code, _, err = cli(capsys, monkeypatch, "score", run, "--diversity-groups", "prompt")
    assert code == 2 and "--diversity-groups 'prompt'" in err
