"""SMIRK as reconstructor `smirk`: the authors' vectors (tests/data/smirk), deviations that fail them, strict
loading of SMIRK_em1.pt, the tiny model, the registry's codes, and no face → None."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data

import caphuman_bench.models.smirk as smirk
from caphuman_bench.conformance import conformance_checks, conformance_command, run_conformance
from caphuman_bench.conformance.smirk import TOLERANCE
from caphuman_bench.errors import BenchError
from caphuman_bench.models.reconstructors import reconstructor_class

VECTORS = Path(__file__).parent / "data" / "smirk"
CASES = ("noise", "astronaut_resized", "astronaut", "astronaut_corner")
PHOTOS = ("astronaut", "astronaut_corner")


@pytest.fixture(scope="module")
def report():
    return run_conformance("smirk")


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return smirk.random_smirk_checkpoint(0)


@pytest.fixture(scope="module")
def tiny() -> smirk.SmirkReconstructor:
    return smirk.SmirkReconstructor.tiny(0)


def test_vectors_of_the_authors_code_are_reproduced(report):
    assert conformance_checks()["smirk"].vectors == "smirk"
    assert report.passed, [(r.case, r.output, r.max_rel) for r in report.failures()]
    expected = {(case, output) for case in CASES for output in smirk.OUTPUTS}
    expected |= {(case, output) for case in PHOTOS for output in ("tform", "crop")}
    assert {(r.case, r.output) for r in report.rows} == expected
    assert all(r.max_abs == 0 for r in report.rows if r.output == "crop")
    assert all(r.relative and r.tolerance == TOLERANCE for r in report.rows if r.output in smirk.OUTPUTS)


def test_vectors_exercise_both_sides_of_the_clamps():
    """The seed was chosen so that an eyelid and the jaw's sideways terms sit inside and at their clamps."""
    tensors = load_file(str(VECTORS / "cases.safetensors"))
    eyelid, jaw = tensors["astronaut.eyelid_params"], tensors["astronaut.jaw_params"]
    assert eyelid[0] == 0 and 0 < eyelid[1] < 1
    assert jaw[0] > 0 and abs(jaw[1]) < smirk.JAW_SIDEWAYS_LIMIT and abs(jaw[2]) == pytest.approx(smirk.JAW_SIDEWAYS_LIMIT)


def test_command_prints_a_table_and_exits_zero(capsys):
    assert conformance_command("smirk") == 0
    assert "astronaut_corner" in capsys.readouterr().out


def test_imagenet_normalised_input_fails(monkeypatch):
    """timm's usual input (ImageNet mean/std) is not what SMIRK was trained on: demo.py feeds RGB / 255."""
    plain = smirk.crops_to_tensor
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    monkeypatch.setattr(smirk, "crops_to_tensor", lambda crops: (plain(crops) - mean) / std)
    failed = {r.output for r in run_conformance("smirk", only=["noise"]).failures()}
    assert {"pose_params", "cam", "shape_params", "expression_params"} <= failed


def test_decas_crop_scale_fails(monkeypatch):
    monkeypatch.setattr(smirk, "CROP_SCALE", 1.25)
    failed = {r.output for r in run_conformance("smirk", only=["astronaut_corner"]).failures()}
    assert {"tform", "crop", "pose_params", "shape_params", "expression_params"} <= failed


def test_rounding_the_crop_instead_of_truncating_fails(monkeypatch):
    def rounded(image, landmarks):
        inverse = np.linalg.inv(smirk.crop_square(landmarks).tform)
        warped = smirk.warp(np.asarray(image.convert("RGB")), inverse, output_shape=(224, 224), preserve_range=True)
        return np.round(warped).astype(np.uint8)

    monkeypatch.setattr(smirk, "smirk_crop", rounded)
    rows = {r.output: r for r in run_conformance("smirk", only=["astronaut"]).rows}
    assert not rows["crop"].passed and rows["crop"].max_abs == 1


def test_registry_entry():
    cls = reconstructor_class("smirk")
    assert cls is smirk.SmirkReconstructor
    assert cls.info.crop == "own" and cls.info.weights == ("smirk",)
    assert cls.info.groups == ("shape", "exp", "pose", "cam")
    assert "c7de404c4389f073906a6db1adabf62efcea3f35" in cls.info.source


def _save(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "SMIRK_em1.pt"
    torch.save(state, path)
    return path


def test_release_layout_loads_strictly_with_or_without_the_generator(tmp_path, checkpoint):
    with_generator = {**checkpoint, "smirk_generator.encoder1.enc1conv1.weight": torch.zeros(32, 6, 3, 3)}
    model = smirk.SmirkReconstructor.from_weights({"smirk": _save(tmp_path, with_generator)})
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, checkpoint[smirk.ENCODER_PREFIX + key]), key
    assert model.fingerprint() == f"smirk:{(tmp_path / 'SMIRK_em1.pt').resolve()}"


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.pop("smirk_encoder.shape_encoder.encoder.blocks.3.1.bn2.running_var"),
         "missing keys: shape_encoder.encoder.blocks.3.1.bn2.running_var"),
        (lambda s: s.__setitem__("smirk_encoder.shape_encoder.shape_layers.0.bias", torch.zeros(100)),
         "shape_encoder.shape_layers.0.bias [100]"),
        (lambda s: s.__setitem__("smirk_encoder.pose_encoder.encoder.conv_head.weight", torch.zeros(1)),
         "unexpected keys: pose_encoder.encoder.conv_head.weight"),
        (lambda s: s.__setitem__("flame.shapedirs", torch.zeros(1)), "keys other than smirk_encoder.* / smirk_generator.*: flame.shapedirs"),
        (lambda s: [s.__setitem__(k.replace("smirk_encoder.", "encoder."), s.pop(k)) for k in list(s)],
         "keys other than smirk_encoder.* / smirk_generator.*: encoder.pose_encoder"),
    ],
    ids=["missing", "wrong-shape", "unexpected", "foreign-prefix", "stripped-prefix"],
)
def test_other_layouts_are_refused_in_one_line(tmp_path, checkpoint, change, named):
    state = dict(checkpoint)
    change(state)
    path = _save(tmp_path, state)
    with pytest.raises(BenchError) as info:
        smirk.load_smirk_encoder(path)
    message = str(info.value)
    assert named in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize("content, named", [({"smirk_generator.x": torch.zeros(1)}, "no smirk_encoder.* keys"),
                                            ([torch.zeros(1)], "not a mapping of named tensors")])
def test_files_that_are_no_smirk_checkpoint_are_refused(tmp_path, content, named):
    with pytest.raises(BenchError, match=named):
        smirk.load_smirk_encoder(_save(tmp_path, content))


def test_tiny_model_gives_near_neutral_codes_in_flame_groups(tiny):
    crops = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    codes = tiny.encode_smirk_crops(crops)
    assert [{k: v.shape for k, v in code.items()} for code in codes] == [{"shape": (100,), "exp": (50,), "pose": (6,), "cam": (3,)}] * 2
    assert all(abs(code[group]).max() < 0.1 for code in codes for group in ("shape", "exp", "pose"))
    assert all(code["cam"][0] == pytest.approx(smirk.CAM_SCALE_INIT) for code in codes)
    assert tiny.fingerprint() == "smirk:tiny-0"
    again = smirk.SmirkReconstructor.tiny(0).encode_smirk_crops(crops)
    assert all(np.array_equal(a[g], b[g]) for a, b in zip(codes, again) for g in a)
    assert not np.array_equal(smirk.SmirkReconstructor.tiny(1).encode_smirk_crops(crops)[0]["exp"], codes[0]["exp"])
    with pytest.raises(NotImplementedError, match="encode_images"):
        tiny.encode_crops(crops)


def test_code_pose_is_global_then_jaw_and_shape_is_flames_first_100(tiny):
    crops = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    outputs = tiny.outputs(crops)
    (code,) = smirk.flame_codes(outputs)
    np.testing.assert_array_equal(code["pose"], torch.cat([outputs["pose_params"], outputs["jaw_params"]], 1)[0].numpy())
    np.testing.assert_array_equal(code["shape"], outputs["shape_params"][0, :100].numpy())
    np.testing.assert_array_equal(code["exp"], outputs["expression_params"][0].numpy())
    np.testing.assert_array_equal(code["cam"], outputs["cam"][0].numpy())


def test_no_face_is_none_and_a_photo_is_cropped_from_its_mediapipe_landmarks(tiny):
    """Our MediaPipe reader finds the vectors' landmarks again (they were made with it), and a whole
    photo's code is that of its SMIRK crop."""
    astronaut = Image.fromarray(data.astronaut())
    blank = Image.new("RGB", (256, 256), (128, 128, 128))
    codes = tiny.encode_images([blank, astronaut])
    assert codes[0] is None and codes[1] is not None
    landmarks = tiny.landmarks(astronaut)
    stored = load_file(str(VECTORS / "cases.safetensors"))["astronaut.landmarks"].numpy()
    assert np.abs(landmarks[:, :2] - stored).max() < 0.5
    (expected,) = tiny.encode_smirk_crops(smirk.crops_to_tensor([smirk.smirk_crop(astronaut, landmarks)]))
    assert all(np.array_equal(codes[1][g], expected[g]) for g in expected)
    assert tiny.encode_images([]) == []


def test_random_weights_writer_makes_a_file_the_loader_takes(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import make_random_weights as mrw

    written = mrw.write_all(tmp_path, only=["smirk"])
    assert written["smirk"].name == "SMIRK_em1.pt"
    model = smirk.SmirkReconstructor.from_weights(written)
    (code,) = model.encode_smirk_crops(torch.full((1, 3, 224, 224), 0.5))
    assert all(np.isfinite(v).all() for v in code.values())
