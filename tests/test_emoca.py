"""EMOCA v2 (reconstructor `emoca_v2`): the authors' numbers (tests/data/emoca_v2), deviations the check
catches, the release folder read strictly and without running foreign code, the tiny model."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from caphuman_bench.conformance import run_conformance
from caphuman_bench.errors import BenchError
from caphuman_bench.models import emoca
from caphuman_bench.models.emoca import (
    V2_HEAD,
    EmocaEncoder,
    EmocaReconstructor,
    ExpressionHead,
    encoder_from_state_dict,
    read_lightning_state_dict,
    release_checkpoint,
    release_head,
    write_release,
)
from caphuman_bench.models.reconstructors import (
    checked_code,
    reconstructor_class,
    reconstructor_names,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_random_weights as mrw  # noqa: E402

GROUPS = ("shape", "tex", "exp", "pose", "cam", "light")


@pytest.mark.slow
def test_every_head_and_group_matches_the_authors_code():
    report = run_conformance("emoca_v2")
    assert report.passed, [(r.case, r.output, r.max_rel) for r in report.failures()]
    checked = {(r.case, r.output) for r in report.rows}
    for case in ("inside", "corner"):
        assert (case, "crop") in checked
        for head in ("exp", "exp_jaw", "exp_global", "exp_global_jaw"):
            assert {(f"{head}:{case}", group) for group in GROUPS} <= checked


def _exp_from_e_flame(flame_code, expression_code, head):
    parts = COMBINE(flame_code, expression_code, head)
    parts["exp"] = emoca.decompose(flame_code)["exp"]
    return parts


def _pose_from_e_flame(flame_code, expression_code, head):
    parts = COMBINE(flame_code, expression_code, head)
    parts["pose"] = emoca.decompose(flame_code)["pose"]
    return parts


def _global_read_as_jaw(flame_code, expression_code, head):
    return COMBINE(flame_code, expression_code, ExpressionHead(global_pose=head.jaw_pose, jaw_pose=head.global_pose))


COMBINE = emoca.combine_codes


@pytest.mark.parametrize("deviation, head, failing", [
    (_exp_from_e_flame, "exp", "exp"),  # DECA's expression instead of EMOCA's
    (_pose_from_e_flame, "exp_global", "pose"),  # E_expression's rotation ignored
    (_global_read_as_jaw, "exp_global", "pose"),  # the predicted rotation put in the jaw's place
])
def test_a_deliberate_deviation_fails_exactly_where_it_deviates(monkeypatch, deviation, head, failing):
    monkeypatch.setattr(emoca, "combine_codes", deviation)
    report = run_conformance("emoca_v2", only=[head])
    assert {(r.case, r.output) for r in report.failures()} == {(f"{head}:inside", failing), (f"{head}:corner", failing)}


# ----------------------------------------------------------------------------------------------
# the release layout


def _meta_state(head: ExpressionHead = V2_HEAD) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {f"deca.{key}": value for key, value in EmocaEncoder(head).state_dict().items()}


def test_the_encoders_load_next_to_the_rest_of_decamodule():
    state = _meta_state()
    state["deca.E_detail.layers.0.weight"] = torch.empty(2, 2, device="meta")  # read by nobody here
    state["lipread_loss.model.weight"] = torch.empty(2, device="meta")
    encoder = encoder_from_state_dict(state, V2_HEAD, "x.ckpt")
    assert encoder.E_expression.layers[2].out_features == 53 and encoder.E_flame.layers[2].out_features == 236


@pytest.mark.parametrize("change, named", [
    (lambda s: s.pop("deca.E_expression.layers.2.bias"), "missing keys: deca.E_expression.layers.2.bias"),
    (lambda s: s.update({"deca.E_expression.resnet.conv1.weight": torch.empty(1, device="meta")}),
     "unexpected keys: deca.E_expression.resnet.conv1.weight"),  # the deca_parallel layout
    (lambda s: s.update({"model.diffusion_model.x": torch.empty(1, device="meta")}), "unexpected keys: model.diffusion_model.x"),
    (lambda s: s.update({"deca.E_flame.layers.2.weight": torch.empty(236, 1024, dtype=torch.float16, device="meta")}),
     "wrong shape/dtype: deca.E_flame.layers.2.weight [236, 1024] torch.float16"),
])
def test_other_layouts_are_refused_by_name(change, named):
    state = _meta_state()
    change(state)
    with pytest.raises(BenchError, match="not EMOCA's encoders") as caught:
        encoder_from_state_dict(state, V2_HEAD, "x.ckpt")
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_a_head_other_than_the_checkpoints_is_refused():
    with pytest.raises(BenchError, match=r"deca.E_expression.layers.2.weight \[50, 1024\].*expected \[53, 1024\]"):
        encoder_from_state_dict(_meta_state(ExpressionHead(False, False)), V2_HEAD, "x.ckpt")


def test_a_small_release_missing_keys_is_refused_when_loaded(tmp_path):
    write_release(tmp_path / "EMOCA_v2_lr_mse_20", {"deca.E_flame.layers.0.bias": torch.zeros(1024)})
    with pytest.raises(BenchError, match=r"missing keys: deca\.E_flame\.encoder\.conv1\.weight"):
        EmocaReconstructor.from_weights({"emoca_v2": tmp_path / "EMOCA_v2_lr_mse_20"})


@pytest.mark.parametrize("edit, named", [
    (lambda cfg: cfg["detail"]["model"].update(expression_backbone="deca_parallel"), "expression_backbone 'deca_parallel'"),
    (lambda cfg: cfg["detail"]["model"].update(deca_class="DECA"), "deca_class 'DECA'"),
    (lambda cfg: cfg["detail"]["model"].update(n_exp=100), "n_exp 100"),
    (lambda cfg: cfg["detail"]["model"].pop("exp_deca_jaw_pose"), "exp_deca_jaw_pose None"),
    (lambda cfg: cfg.pop("detail"), "no 'detail.model' section"),
])
def test_other_configurations_are_refused_by_name(tmp_path, edit, named):
    write_release(tmp_path, {})
    cfg = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    edit(cfg)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(BenchError) as caught:
        release_head(tmp_path)
    assert named in str(caught.value)


def test_the_configuration_says_what_e_expression_predicts(tmp_path):
    for head in (ExpressionHead(False, False), ExpressionHead(True, False), ExpressionHead(True, True)):
        write_release(tmp_path / str(head), {}, head)
        assert release_head(tmp_path / str(head)) == head


def test_the_best_checkpoint_is_the_authors_choice(tmp_path):
    directory = tmp_path / "detail" / "checkpoints"
    for name in ("deca-epoch=01-val_loss/dataloader_idx_0=3.50000000.ckpt", "deca-epoch=02-val_loss/dataloader_idx_0=2.25000000.ckpt",
                 "deca-epoch=03-val_loss/dataloader_idx_0=2.25000000.ckpt", "last.ckpt", "deca-epoch=04-val_loss/dataloader_idx_0=x.ckpt"):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).touch()
    assert release_checkpoint(tmp_path) == directory / "deca-epoch=03-val_loss/dataloader_idx_0=2.25000000.ckpt"  # a tie: the later
    for path in directory.rglob("*=*.ckpt"):
        path.unlink()
    with pytest.raises(BenchError, match="no checkpoint named by its validation loss"):
        release_checkpoint(tmp_path)


def test_a_missing_folder_or_checkpoint_is_one_line(tmp_path):
    with pytest.raises(BenchError, match="not a folder"):
        EmocaReconstructor.from_weights({"emoca_v2": tmp_path / "EMOCA_v2_lr_mse_20"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"detail": {"model": {}}}))
    with pytest.raises(BenchError, match="no \\*.ckpt"):
        release_checkpoint(tmp_path)


class _Evil:
    def __reduce__(self):
        return exec, ("open('MARKER', 'w').close()",)


def test_a_lightning_checkpoint_is_read_without_running_its_objects(tmp_path, monkeypatch):
    callbacks = types.ModuleType("pytorch_lightning_stand_in")  # Lightning 1.4 keys callback states by class
    callbacks.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning_stand_in"})
    monkeypatch.setitem(sys.modules, "pytorch_lightning_stand_in", callbacks)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"deca.E_flame.layers.0.bias": torch.ones(3)}, "epoch": 3,
                "callbacks": {callbacks.ModelCheckpoint: {"best_model_score": torch.tensor(2.25)}}, "evil": _Evil()}, path)
    monkeypatch.delitem(sys.modules, "pytorch_lightning_stand_in")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch alone refuses the file
    state = read_lightning_state_dict(path)
    assert list(state) == ["deca.E_flame.layers.0.bias"] and torch.equal(state["deca.E_flame.layers.0.bias"], torch.ones(3))
    assert not (tmp_path / "MARKER").exists()


def test_a_checkpoint_naming_os_functions_or_without_state_dict_is_refused(tmp_path):
    import os

    torch.save({"state_dict": {}, "hook": types.SimpleNamespace(run=os.getcwd)}, tmp_path / "os.ckpt")
    with pytest.raises(BenchError, match="tensors only"):
        read_lightning_state_dict(tmp_path / "os.ckpt")
    torch.save({"E_flame": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(BenchError, match="no 'state_dict'"):
        read_lightning_state_dict(tmp_path / "plain.ckpt")


@pytest.mark.slow
def test_random_weights_script_writes_a_release_the_run_loads(tmp_path):
    written = mrw.write_all(tmp_path, only=["emoca_v2"])
    folder = written["emoca_v2"]
    assert folder.name == "EMOCA_v2_lr_mse_20" and (folder / "cfg.yaml").is_file()
    reconstructor = EmocaReconstructor.from_weights({"emoca_v2": folder})
    assert reconstructor.encoder.head == V2_HEAD and reconstructor.fingerprint().startswith("emoca_v2:/")
    (code,) = reconstructor.encode_crops(torch.rand(1, 3, 224, 224))
    assert set(checked_code(code, "emoca_v2")) == set(GROUPS)


# ----------------------------------------------------------------------------------------------
# the registry and the tiny model


def test_registered_with_decas_crop():
    assert "emoca_v2" in reconstructor_names()
    cls = reconstructor_class("emoca_v2")
    assert cls is EmocaReconstructor
    assert cls.info.crop == "deca" and cls.info.weights == ("emoca_v2",) and "light" in cls.info.groups


@pytest.fixture(scope="module")
def tiny() -> EmocaReconstructor:
    return EmocaReconstructor.tiny(seed=3)


def test_tiny_codes_are_flame_groups_near_neutral_and_seeded(tiny):
    crops = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    codes = tiny.encode_crops(crops)
    assert len(codes) == 3 and tiny.fingerprint() == "emoca_v2:tiny-3"
    for code in codes:
        checked = checked_code(code, "emoca_v2")
        assert checked["light"].shape == (9, 3) and checked["pose"].shape == (6,)
        assert all(abs(value).max() < 0.05 for value in checked.values())
    again = EmocaReconstructor.tiny(seed=3).encode_crops(crops)
    other = EmocaReconstructor.tiny(seed=4).encode_crops(crops)
    assert all((again[i][g] == codes[i][g]).all() for i in range(3) for g in GROUPS)
    assert not (other[0]["exp"] == codes[0]["exp"]).all()
    assert tiny.encode_crops(crops[:0]) == []


def test_tiny_takes_expression_and_jaw_from_e_expression(tiny):
    crops = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        flame_code, expression_code = tiny.encoder(crops)
    codes = tiny.encode_crops(crops)
    for i, code in enumerate(codes):
        assert torch.equal(torch.from_numpy(code["exp"]), expression_code[i, :50])
        assert torch.equal(torch.from_numpy(code["pose"][3:]), expression_code[i, 50:53])  # jaw: EMOCA's
        assert torch.equal(torch.from_numpy(code["pose"][:3]), flame_code[i, 200:203])  # global rotation: DECA's
        assert torch.equal(torch.from_numpy(code["shape"]), flame_code[i, :100])
