"""The benchmark spec, cards, planner and weights resolver: structure and clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

from caphuman_bench import weights
from caphuman_bench.benchmark import (
    DEFAULT_SPEC_DIR,
    Benchmark,
    axis_angle_to_euler,
    euler_to_axis_angle,
)
from caphuman_bench.cards import all_cards, load_card
from caphuman_bench.errors import BenchError, MissingWeightsError
from caphuman_bench.stages.plan import Shard, parse_shard, plan_tasks


def test_shipped_spec_has_the_papers_shape():
    bench = Benchmark.load()
    full = bench.split("full")
    assert len(bench.prompts) == 35 and len(full.prompts) == 35 and len(full.conditions) == 10 and full.samples == 3
    assert {p.category for p in bench.prompts.values()} == {"accessory", "style", "action", "context"}
    demo = bench.split("demo")
    assert (len(demo.identities), len(demo.prompts), len(demo.conditions), demo.samples) == (2, 3, 2, 1)
    assert {"full", "identity", "prompt", "pose", "demo"} <= set(bench.splits)
    yaws = sorted(bench.conditions[c].yaw for c in full.conditions)
    assert yaws[0] == -45 and yaws[-1] == 45  # the paper tests within about ±45° yaw; pose-extreme goes further
    for cond in bench.conditions.values():
        assert np.allclose(cond.pose[:3], euler_to_axis_angle(cond.yaw, cond.pitch, cond.roll))
        assert cond.light.shape == (9, 3) and cond.exp.shape == (50,)


def test_euler_axis_angle_round_trip():
    for angles in [(30, 0, 0), (-45, 10, 5), (0, -20, 15)]:
        assert np.allclose(axis_angle_to_euler(euler_to_axis_angle(*angles)), angles, atol=1e-9)


def test_demo_reference_photos_come_from_packages():
    bench = Benchmark.load()
    for ident in bench.split("demo").identities:
        image = bench.reference_image(ident)
        assert image.mode == "RGB" and min(image.size) >= 256


@pytest.fixture
def spec_copy(tmp_path):
    dst = tmp_path / "spec"
    shutil.copytree(DEFAULT_SPEC_DIR, dst)
    return dst


def _edit_yaml(path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))


def test_condition_with_inconsistent_axis_angle_is_refused(spec_copy):
    _edit_yaml(spec_copy / "head_conditions.yaml", lambda d: d["conditions"][1].update(global_axis_angle=[0, 0.1, 0]))
    with pytest.raises(BenchError, match=r"head_conditions.yaml.*yaw-l45.*global_axis_angle"):
        Benchmark.load(spec_copy)


def test_prompt_without_placeholder_is_refused(spec_copy):
    _edit_yaml(spec_copy / "prompts.yaml", lambda d: d["prompts"][0].update(text="a photo of nobody"))
    with pytest.raises(BenchError, match=r"prompts.yaml.*acc-red-hat.*'text'"):
        Benchmark.load(spec_copy)


def test_identity_file_that_leaves_its_folder_is_refused(spec_copy):
    path = spec_copy / "identities.csv"
    path.write_text(path.read_text() + "evil,a person,folder,../../etc/passwd,,\n")
    with pytest.raises(BenchError, match=r"identities.csv.*evil.*'file'"):
        Benchmark.load(spec_copy)


def test_split_naming_an_unknown_identity_is_refused(spec_copy):
    _edit_yaml(spec_copy / "splits.yaml", lambda d: d["splits"]["demo"].update(identities=["nobody"]))
    with pytest.raises(BenchError, match=r"split 'demo'.*unknown id.*nobody"):
        Benchmark.load(spec_copy)


def test_unknown_split_is_refused():
    with pytest.raises(BenchError, match="unknown split 'nope'"):
        Benchmark.load().split("nope")


def test_a_card_says_how_the_head_condition_reaches_the_method(tmp_path):
    assert {name: card.head_input for name, card in all_cards().items()}.items() >= {
        "caphuman": "CapFace", "ip_adapter_controlnet": "normals", "reference": "none"}.items()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nadapter: reference\ndescription: x\ninputs: [reference, head]\nhead_input: none\n")
    with pytest.raises(BenchError, match=r"bad.yaml: .*head_input 'none' and inputs .* disagree"):
        load_card(bad)
    bad.write_text("name: bad\nadapter: reference\ndescription: x\ninputs: [reference]\nhead_input: depth\n")
    with pytest.raises(BenchError, match=r"bad.yaml: field 'head_input'"):
        load_card(bad)


def test_cards_load_and_a_wrong_field_names_file_and_field(tmp_path):
    cards = all_cards()
    assert {"caphuman", "reference"} <= set(cards)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nadapter: reference\ndescription: x\ninputs: [reference]\nhead_input: none\nsampler_steps: 3\n")
    with pytest.raises(BenchError, match=r"bad.yaml: field 'sampler_steps'"):
        load_card(bad)
    with pytest.raises(BenchError, match="has no parameter 'nope'"):
        cards["reference"].resolve_params(None, {"nope": 1})


def test_plan_seeds_are_per_task_and_shards_partition_the_plan():
    bench = Benchmark.load()
    tasks = plan_tasks(bench, "demo")
    assert len({t.task_id for t in tasks}) == len(tasks) == 12
    assert len({t.seed for t in tasks}) == 12
    assert [t.seed for t in plan_tasks(bench, "demo")] == [t.seed for t in tasks]
    assert [t.seed for t in plan_tasks(bench, "demo", base_seed=1)] != [t.seed for t in tasks]
    parts = Shard(0, 3).select(tasks) + Shard(1, 3).select(tasks) + Shard(2, 3).select(tasks)
    assert sorted(t.task_id for t in parts) == sorted(t.task_id for t in tasks)


def test_shard_parsing(monkeypatch):
    assert parse_shard("1/4") == Shard(1, 4)
    with pytest.raises(BenchError):
        parse_shard("4/4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == Shard(2, 3)


def test_celeba_split_needs_prepared_identities():
    with pytest.raises(BenchError, match="data prepare"):
        plan_tasks(Benchmark.load(), "full")


def test_weights_resolver_never_downloads_and_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path))
    assert weights.locate("mtcnn") is not None  # ships inside facenet-pytorch
    assert weights.locate("dlib_face_recognition") is not None
    with pytest.raises(MissingWeightsError, match=r"generic_model.pkl.*registration"):
        weights.require(["flame_model"])
    (tmp_path / "generic_model.pkl").write_bytes(b"x")
    assert weights.resolve("flame_model") == tmp_path / "generic_model.pkl"
    rows = weights.status_rows()
    assert {r["id"] for r in rows} == set(weights.manifest())


@pytest.mark.parametrize("field, value, message", [
    ("cam", [-6.0, 0.0, 0.0], "positive orthographic scale"),
    ("light", [[float("nan")] * 3] + [[0.0] * 3] * 8, "not a finite number"),
    ("jaw", [0.1, 0.2], "needs 3 numbers"),
])
def test_condition_with_a_bad_number_is_refused(spec_copy, field, value, message):
    _edit_yaml(spec_copy / "head_conditions.yaml", lambda d: d["conditions"][0].update({field: value}))
    with pytest.raises(BenchError, match=rf"frontal.*'{field}'.*{message}"):
        Benchmark.load(spec_copy)
