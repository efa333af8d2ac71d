"""The head condition's reconstructor as a method parameter (issue 26): recorded in run.json and the
configuration hash, checked before any image, only its weights required, and it changes the head the
method is steered to. DECA and a stand-in registered here (crops the face itself as SMIRK, no light)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import all_cards, get_card
from caphuman_bench.errors import BenchError, FaceNotFoundError
from caphuman_bench.methods.base import MethodContext
from caphuman_bench.methods.head_renders import HeadRenderMixin, target_sources, with_chosen_reconstructor
from caphuman_bench.models.reconstructors import RECONSTRUCTORS, Reconstructor, ReconstructorInfo, reconstructor_names
from caphuman_bench.registry import get_method
from tests.cli_helpers import cli, only_run

HEAD_CARDS = sorted(name for name, card in all_cards().items() if card.head_input != "none")


def photo_digest(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def stand_in_level(image: Image.Image) -> float:
    return float(np.asarray(image.convert("RGB"), dtype=np.float64).mean() / 255.0)


class StandIn(Reconstructor):
    """Finds and crops the face itself; its shape follows the photo's mean brightness; no light; sees no face
    in the photos of `blind_to`."""

    info = ReconstructorInfo(name="stand_in", title="a test stand-in", weights=("stand_in_weights",), crop="own",
                             groups=("shape", "exp", "pose", "cam"), source="tests", licence="none")
    blind_to: set[str] = set()

    def __init__(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint

    @classmethod
    def from_weights(cls, paths, device="cpu"):
        return cls(f"stand_in:{paths['stand_in_weights']}")

    @classmethod
    def tiny(cls, seed=0, device="cpu"):
        return cls(f"stand_in:tiny-{seed}")

    def encode_images(self, images):
        codes = []
        for image in images:
            level = stand_in_level(image)
            codes.append(None if photo_digest(image) in self.blind_to else
                         {"shape": np.full(100, 2 * level), "exp": np.full(50, -level), "pose": np.zeros(6),
                          "cam": np.array([5.0, 0.1, 0.0])})
        return codes

    def fingerprint(self):
        return self._fingerprint


@pytest.fixture
def stand_in(monkeypatch):
    reconstructor_names()  # the built-in ones first, as the registry loads them
    monkeypatch.setitem(RECONSTRUCTORS, "stand_in", StandIn)
    monkeypatch.setattr(StandIn, "blind_to", set())
    return StandIn


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return Benchmark.load()


def test_every_head_aware_card_names_its_reconstructor():
    assert {"caphuman", "controlnet_head", "instantid", "arc2face_controlnet", "ip_adapter_controlnet",
            "ip_adapter_faceid_controlnet_head", "lora_controlnet_head"} <= set(HEAD_CARDS)
    for name in HEAD_CARDS:
        assert get_card(name).params.get("reconstructor") == "deca", name


def test_param_reaches_run_json_and_the_configuration_hash(stand_in, bench, tmp_path):
    from caphuman_bench.runner import plan_run

    card = get_card("caphuman")
    runs = {name: plan_run(card, bench, "demo", tmp_path, preset="smoke", overrides=overrides).run
            for name, overrides in (("default", {}), ("deca", {"reconstructor": "deca"}), ("stand_in", {"reconstructor": "stand_in"}))}
    info = {name: run.info() for name, run in runs.items()}
    assert info["default"]["config_hash"] == info["deca"]["config_hash"] != info["stand_in"]["config_hash"]
    assert runs["default"].path == runs["deca"].path != runs["stand_in"].path
    for name in ("deca", "stand_in"):
        assert info[name]["params"]["reconstructor"] == name
        recorded = info[name]["head_inputs"]["reconstructor"]
        assert recorded["name"] == name and recorded["weights"].startswith("random")  # the smoke preset: tiny model
    assert info["deca"]["head_inputs"]["reconstructor"]["title"].startswith("DECA (Feng et al.")

    full = {name: get_method(card.adapter).head_inputs(card.resolve_params(None, {"reconstructor": name}))
            for name in ("deca", "stand_in")}
    assert full["deca"]["reconstructor"]["weights"] == ["deca_model"] and full["deca"]["head_frame"] == "reference"
    assert full["deca"]["reconstructor"]["not_estimated"] is None and full["deca"]["deca_crop"] == "kpt68"
    assert full["stand_in"]["reconstructor"]["weights"] == ["stand_in_weights"]
    assert full["stand_in"]["reconstructor"]["not_estimated"] == {"light": "the head condition's value"}
    assert full["stand_in"]["head_frame"].startswith("crop") and "deca_crop" not in full["stand_in"]
    # scoring reads which target parts the reference gave: not the light the stand-in never estimated
    assert target_sources({"reconstructor": "stand_in"}, full["stand_in"]) == ("stand_in", ("shape", "exp", "jaw"))
    assert target_sources({}, full["deca"]) == ("deca", ("shape", "exp", "jaw", "light"))
    assert target_sources({"tiny": True}, info["deca"]["head_inputs"]) == (None, ())  # a random tiny model read it


def test_unknown_reconstructor_stops_the_run_before_any_image(capsys, monkeypatch, tmp_path):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "caphuman", "--preset", "smoke", "--runs-dir", runs,
                       "--param", "reconstructor=emoca_v9")
    assert code == 2, err
    assert not runs.exists() or not any(runs.iterdir())
    assert "Traceback" not in err and err.count("error:") == 1
    assert "parameter 'reconstructor': unknown reconstructor 'emoca_v9'; known: " in err and "deca" in err
    with pytest.raises(BenchError, match=r"caphuman.yaml: field 'params': parameter 'reconstructor': unknown"):
        card = get_card("caphuman")
        get_method(card.adapter).validated_params(card.model_copy(update={"params": {**card.params, "reconstructor": "x"}}),
                                                  None, {})


@pytest.mark.parametrize("name", HEAD_CARDS)
def test_only_the_chosen_reconstructors_weights_are_required(stand_in, name):
    card = get_card(name)
    adapter = get_method(card.adapter)
    default = adapter.required_weights(card, card.resolve_params(None, {}))
    chosen = adapter.required_weights(card, card.resolve_params(None, {"reconstructor": "stand_in"}))
    assert "deca_model" in default and "stand_in_weights" not in default
    assert "stand_in_weights" in chosen and "deca_model" not in chosen
    assert set(chosen) - {"stand_in_weights"} == set(default) - {"deca_model"}
    assert adapter.required_weights(card, card.resolve_params("smoke", {"reconstructor": "stand_in"})) == []


def test_a_cards_own_list_swaps_the_reconstructors_entries(stand_in):
    params = {"reconstructor": "stand_in"}
    assert with_chosen_reconstructor(["deca_model", "flame_model"], params) == ["flame_model", "stand_in_weights"]
    assert with_chosen_reconstructor(["stable_diffusion_v1_5"], params) == ["stable_diffusion_v1_5"]  # no head: nothing added
    assert with_chosen_reconstructor(["deca_model", "flame_model"], {}) == ["flame_model", "deca_model"]


def smoke_targets(capsys, monkeypatch, runs, method: str, reconstructor: str) -> tuple[int, dict, dict]:
    """(exit code, {target file: arrays}, {task: last status}) of a generate-only smoke run."""
    code, _, err = cli(capsys, monkeypatch, "run", "--method", method, "--preset", "smoke", "--no-score",
                       "--runs-dir", runs, "--param", f"reconstructor={reconstructor}")
    run = only_run(runs)
    targets = {}
    for path in sorted((run / "targets").glob("*.npz")):
        with np.load(path) as data:
            targets[path.stem] = {k: data[k] for k in data.files}
    statuses = {}
    for line in (run / "status.jsonl").read_text().splitlines():
        record = json.loads(line)
        statuses[record["task_id"]] = record
    return code, targets, statuses


@pytest.mark.slow
@pytest.mark.parametrize("method", ["caphuman", "controlnet_head"])
def test_smoke_runs_steer_to_the_chosen_reconstructors_head(stand_in, capsys, monkeypatch, tmp_path, bench, method):
    code, deca, _ = smoke_targets(capsys, monkeypatch, tmp_path / "deca", method, "deca")
    assert code == 0
    code, other, _ = smoke_targets(capsys, monkeypatch, tmp_path / "stand_in", method, "stand_in")
    assert code == 0
    assert set(deca) == set(other) == {f"{i}__{c}" for i in ("nasa-astronaut", "grace-hopper") for c in ("frontal", "yaw-r20")}
    for key, target in other.items():
        identity_id, condition_id = key.split("__")
        level = stand_in_level(bench.reference_image(identity_id))
        np.testing.assert_allclose(target["shape"], 2 * level, rtol=1e-6)  # the reference's shape is the stand-in's
        np.testing.assert_allclose(target["exp"], -level, rtol=1e-6)
        assert not np.allclose(target["shape"], deca[key]["shape"]) and not np.allclose(target["exp"], deca[key]["exp"])
        # the smoke head's camera and rotation stay the condition's explicit ones, whoever reads the reference
        np.testing.assert_allclose(target["cam"], bench.conditions[condition_id].cam)
        np.testing.assert_allclose(deca[key]["cam"], target["cam"])
        np.testing.assert_allclose(deca[key]["pose"], target["pose"])


@pytest.mark.slow
def test_no_face_fails_that_identitys_tasks_and_the_run_goes_on(stand_in, capsys, monkeypatch, tmp_path, bench):
    stand_in.blind_to = {photo_digest(bench.reference_image("grace-hopper"))}
    code, targets, statuses = smoke_targets(capsys, monkeypatch, tmp_path, "controlnet_head", "stand_in")
    assert code == 1  # a failed task
    assert set(targets) == {"nasa-astronaut__frontal", "nasa-astronaut__yaw-r20"}
    for task_id, record in statuses.items():
        if task_id.startswith("grace-hopper"):
            assert record["status"] == "failed" and "'grace-hopper': stand_in found no face in the photo" in record["reason"]
        else:
            assert record["status"] == "ok", record


class _Host(HeadRenderMixin):
    """The head-render mixin on its own, with a stand-in or DECA reconstructor and the synthetic FLAME head."""

    def __init__(self, workdir, reconstructor: Reconstructor, **params) -> None:
        from caphuman_bench.render.head_condition import HeadConditionRenderer

        self.params = {"height": 64, **params}
        self.context = MethodContext(device="cpu", workdir=workdir)
        self.renderer, self.reconstructor, self._codes = HeadConditionRenderer.synthetic(device="cpu"), reconstructor, {}


def test_own_crop_draws_in_the_crop_frame_with_the_conditions_light(stand_in, bench, tmp_path):
    reference, condition = bench.reference_image("nasa-astronaut"), bench.conditions["yaw-r20"]
    host = _Host(tmp_path, stand_in("stand_in:test"), head_frame="reference")
    code, frame = host.photo_code("nasa-astronaut", reference)
    assert frame is None and "light" not in code  # no crop transform, no light estimate
    target = host.head_target("nasa-astronaut", reference, condition)
    np.testing.assert_allclose(target["cam"], condition.cam)  # crop-frame semantics whatever head_frame says
    np.testing.assert_allclose(target["light"], condition.light)  # not estimated: the condition's value
    np.testing.assert_allclose(target["shape"], 2 * stand_in_level(reference), rtol=1e-6)

    blank = Image.new("RGB", (64, 64), (90, 90, 90))
    stand_in.blind_to = {photo_digest(blank)}
    with pytest.raises(FaceNotFoundError, match=r"^'blank': stand_in found no face in the photo"):
        host.identity_code("blank", blank)
    stand_in.blind_to = set()
    with pytest.raises(FaceNotFoundError):  # remembered for the run, not searched again for every task
        host.identity_code("blank", blank)


def test_cached_codes_are_keyed_by_the_reconstructor(stand_in, bench, tmp_path):
    from caphuman_bench.models.deca_encoder import DecaReconstructor

    reference = bench.reference_image("nasa-astronaut")
    hosts = {"deca": _Host(tmp_path, DecaReconstructor.tiny(seed=0), tiny=True),
             "deca-1": _Host(tmp_path, DecaReconstructor.tiny(seed=1), tiny=True),
             "stand_in": _Host(tmp_path, stand_in.tiny(seed=0), tiny=True)}
    keys = {name: host._code_fingerprint(reference) for name, host in hosts.items()}
    assert len(set(keys.values())) == 3
    codes = {name: host.identity_code("nasa-astronaut", reference) for name, host in hosts.items()}
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == sorted(f"nasa-astronaut.{k}.npz" for k in keys.values())
    assert not np.allclose(codes["deca"]["shape"], codes["deca-1"]["shape"])
    again = _Host(tmp_path, DecaReconstructor.tiny(seed=0), tiny=True).identity_code("nasa-astronaut", reference)  # from the cache
    np.testing.assert_array_equal(again["shape"], codes["deca"]["shape"])


def test_every_registered_reconstructor_makes_its_own_smoke_head(bench, tmp_path):
    """The built-in ones (deca, emoca_v2, smirk where installed) through their tiny models: one shape per reconstructor."""
    card = get_card("controlnet_head")
    reference, condition = bench.reference_image("nasa-astronaut"), bench.conditions["yaw-r20"]
    shapes = {}
    for name in reconstructor_names():
        params = get_method(card.adapter).validated_params(card, "smoke", {"reconstructor": name})
        method = get_method(card.adapter)(card, params, MethodContext(device="cpu", workdir=tmp_path / name))
        method.load_head_models("cpu", tiny=True)
        target = method.head_target("nasa-astronaut", reference, condition)
        np.testing.assert_allclose(target["cam"], condition.cam)
        shapes[name] = target["shape"]
    assert "deca" in shapes
    assert all(not np.allclose(shapes[a], shapes[b]) for a in shapes for b in shapes if a < b)
