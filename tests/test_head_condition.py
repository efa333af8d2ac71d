"""Head-condition renderer: CapHuman's coefficient mixing, the render cache, the hint, `caphuman-bench render`."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.errors import BenchError
from caphuman_bench.render.head_condition import (
    CODE_SIZES,
    MODE_PARTS,
    HeadConditionRenderer,
    HeadRender,
    mix_coefficients,
    neutral_identity_code,
)
from tests.cli_helpers import cli

SIZE = 128
CONDITION_KEYS = ("pose", "exp", "cam", "light")


def official_mix(reference: dict, condition: dict, mode: str) -> dict[str, np.ndarray]:
    """CapHuman inference.py `create_inter_data`, transcribed to numpy: copy the reference's code,
    then overwrite the entries each mode substring names (tform goes with cam; it has no analogue here)."""
    code = {k: np.array(v, dtype=np.float64).reshape(9, 3) if k == "light" else np.array(v, dtype=np.float64)
            for k, v in reference.items()}
    if "position" in mode:
        code["cam"] = condition["cam"]
    if "pose" in mode:
        code["pose"][:3] = condition["pose"][:3]
    if "lighting" in mode:
        code["light"] = condition["light"]
    if "expression" in mode:
        code["exp"] = condition["exp"]
        code["pose"][3:] = condition["pose"][3:]
    if mode == "all":
        code["pose"] = condition["pose"]
        code["light"] = condition["light"]
        code["exp"] = condition["exp"]
        code["cam"] = condition["cam"]
    return code


def random_code(seed: int, keys=tuple(CODE_SIZES), scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    code = {k: scale * rng.standard_normal(CODE_SIZES[k]) for k in keys}
    if "light" in code:
        code["light"] = code["light"].reshape(9, 3)
    return code


def every_mode_combination() -> list[str]:
    return [",".join(parts) for n in range(1, len(MODE_PARTS) + 1) for parts in itertools.combinations(MODE_PARTS, n)]


@pytest.fixture(scope="module")
def renderer() -> HeadConditionRenderer:
    return HeadConditionRenderer.synthetic("cpu")


@pytest.fixture(scope="module")
def conditions():
    return Benchmark.load().conditions


@pytest.fixture(scope="module")
def identity() -> dict[str, np.ndarray]:
    """FLAME's mean head nudged in every field, so each field's source is visible."""
    code = neutral_identity_code()
    rng = np.random.default_rng(7)
    code["shape"] = 0.5 * rng.standard_normal(CODE_SIZES["shape"])
    code["tex"] = 0.5 * rng.standard_normal(CODE_SIZES["tex"])
    code["exp"] = 0.3 * rng.standard_normal(CODE_SIZES["exp"])
    code["pose"] = np.array([0.05, -0.1, 0.02, 0.15, 0.0, 0.0])
    code["light"] = code["light"] + 0.1 * rng.standard_normal((9, 3))
    return code


# --- mix_coefficients ---------------------------------------------------------------------------


def test_default_mode_takes_camera_and_global_pose_from_the_condition():
    reference, condition = random_code(1), random_code(2, CONDITION_KEYS)
    mixed = mix_coefficients(reference, condition)
    np.testing.assert_array_equal(mixed["cam"], condition["cam"])
    np.testing.assert_array_equal(mixed["pose"][:3], condition["pose"][:3])
    np.testing.assert_array_equal(mixed["pose"][3:], reference["pose"][3:])  # jaw stays the reference's
    for key in ("shape", "tex", "exp", "light"):
        np.testing.assert_array_equal(mixed[key], reference[key])


@pytest.mark.parametrize("mode", ["all", *every_mode_combination(), " pose , position "])
def test_every_mode_matches_official_inference_and_keeps_shape_and_tex(mode):
    reference, condition = random_code(3), random_code(4, CONDITION_KEYS)
    reference["light"] = reference["light"].reshape(-1)  # DECA's flat [27] form is accepted too
    mixed = mix_coefficients(reference, condition, mode)
    expected = official_mix(reference, condition, mode.replace(" ", ""))
    assert set(mixed) == set(CODE_SIZES)
    for key in CODE_SIZES:
        np.testing.assert_array_equal(mixed[key], expected[key], err_msg=f"{mode}: {key}")
    np.testing.assert_array_equal(mixed["shape"], reference["shape"])
    np.testing.assert_array_equal(mixed["tex"], reference["tex"])


def test_single_modes_copy_exactly_their_entries():
    reference, condition = random_code(5), random_code(6, CONDITION_KEYS)
    expression = mix_coefficients(reference, condition, "expression")
    np.testing.assert_array_equal(expression["exp"], condition["exp"])
    np.testing.assert_array_equal(expression["pose"], np.r_[reference["pose"][:3], condition["pose"][3:]])
    np.testing.assert_array_equal(expression["cam"], reference["cam"])
    lighting = mix_coefficients(reference, condition, "lighting")
    np.testing.assert_array_equal(lighting["light"], condition["light"])
    for key in ("pose", "exp", "cam"):
        np.testing.assert_array_equal(lighting[key], reference[key])
    everything = mix_coefficients(reference, condition, "all")
    for key in CONDITION_KEYS:
        np.testing.assert_array_equal(everything[key], condition[key])


def test_mixing_leaves_its_inputs_untouched():
    reference, condition = random_code(8), random_code(9, CONDITION_KEYS)
    before = {k: v.copy() for k, v in reference.items()}
    mixed = mix_coefficients(reference, condition, "all")
    mixed["pose"][:] = 0
    mixed["shape"][:] = 0
    for key in before:
        np.testing.assert_array_equal(reference[key], before[key])


@pytest.mark.parametrize("mode", ["hair", "pose,hair", "", "all,pose"])
def test_unknown_mode_is_a_bench_error_naming_it(mode):
    with pytest.raises(BenchError, match="mode") as info:
        mix_coefficients(random_code(1), random_code(2, CONDITION_KEYS), mode)
    assert repr(mode) in str(info.value)


# --- render, target and hint --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["position,pose", "all"])
def test_target_is_the_mixed_code_and_hint_is_normal_albedo_rendered(renderer, conditions, identity, mode):
    condition = conditions["jaw-open"]
    result = renderer.render(identity, condition, mode=mode, size=SIZE)
    expected = mix_coefficients(identity, condition.coefficients(), mode)
    assert set(result.target) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(result.target[key], expected[key], err_msg=key)
    assert result.condition_id == "jaw-open" and result.mode == mode

    hint = result.hint
    assert hint.shape == (9, SIZE, SIZE) and hint.dtype == np.float32
    np.testing.assert_array_equal(hint, np.concatenate([result.normal, result.albedo, result.rendered]))
    mask = result.mask[0]
    assert set(np.unique(mask)) == {0.0, 1.0} and 0.05 < mask.mean() < 0.9
    assert np.abs(result.normal).max() <= 1 + 1e-5
    lengths = np.linalg.norm(result.normal[:, mask > 0], axis=0)  # interpolated, not renormalised (as DECA)
    assert lengths.max() <= 1 + 1e-5 and lengths.min() > 0.5
    assert not hint[:, mask == 0].any()  # all nine channels are zero off the head


# --- render_cached and save / load --------------------------------------------------------------


class CountingMeshRenderer:
    """Wraps the mesh renderer and counts its calls: a cache hit makes none."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def assert_same_render(a: HeadRender, b: HeadRender) -> None:
    for name in ("normal", "albedo", "rendered", "mask"):
        got, want = getattr(a, name), getattr(b, name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert set(a.target) == set(b.target)
    for key in a.target:
        np.testing.assert_array_equal(a.target[key], b.target[key], err_msg=key)
    assert (a.mode, a.condition_id, a.key) == (b.mode, b.condition_id, b.key)


def test_second_call_reads_the_cache(renderer, conditions, identity, tmp_path, monkeypatch):
    condition = conditions["yaw-r45"]
    first = renderer.render_cached(identity, condition, tmp_path, size=SIZE)

    def no_rendering(*args, **kwargs):
        raise AssertionError("render_cached rendered although the cache matches")

    monkeypatch.setattr(renderer, "mesh_renderer", no_rendering)
    assert_same_render(renderer.render_cached(identity, condition, tmp_path, size=SIZE), first)
    # the same parts in another order and spacing are the same mode
    assert_same_render(renderer.render_cached(identity, condition, tmp_path, mode="pose, position", size=SIZE), first)


@pytest.mark.parametrize("change", ["condition", "mode", "size", "identity"])
def test_changed_inputs_change_the_key_and_re_render(renderer, conditions, identity, tmp_path, monkeypatch, change):
    inputs = {"identity_code": identity, "condition": conditions["yaw-r45"], "mode": "position,pose", "size": SIZE}
    first = renderer.render_cached(folder=tmp_path, **inputs)
    counter = CountingMeshRenderer(renderer.mesh_renderer)
    monkeypatch.setattr(renderer, "mesh_renderer", counter)

    changed = dict(inputs)
    if change == "condition":
        changed["condition"] = conditions["yaw-l45"]
    elif change == "mode":
        changed["mode"] = "all"
    elif change == "size":
        changed["size"] = 96
    else:
        changed["identity_code"] = {**identity, "shape": identity["shape"] + 0.1}
    second = renderer.render_cached(folder=tmp_path, **changed)
    assert counter.calls == 1
    assert second.key != first.key == renderer.cache_key(**inputs)
    assert HeadRender.load(tmp_path).key == second.key  # the cache now holds the new render
    assert_same_render(second, renderer.render(**changed))
    if change == "size":
        assert second.normal.shape == (3, 96, 96)
    else:
        assert not np.array_equal(second.hint, first.hint)


def test_save_load_round_trip_is_exact(renderer, conditions, identity, tmp_path):
    original = renderer.render(identity, conditions["pitch-up20"], mode="all", size=SIZE)
    original.save(tmp_path)
    assert_same_render(HeadRender.load(tmp_path), original)


def test_load_of_an_incomplete_cache_names_the_missing_file(renderer, conditions, identity, tmp_path):
    renderer.render(identity, conditions["frontal"], size=SIZE).save(tmp_path)
    (tmp_path / "head_render.npz").unlink()
    with pytest.raises(BenchError, match="head_render.npz"):
        HeadRender.load(tmp_path)


# --- caphuman-bench render ----------------------------------------------------------------------




def read_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB", path
        return np.asarray(image)


def test_render_command_writes_the_three_images_of_each_condition_and_a_grid_of_exactly_them(tmp_path, capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, "render", "--synthetic", "--condition", "yaw-r45", "-c", "yaw-l45",
                         "--out", tmp_path, "--size", SIZE, "--device", "cpu")
    assert code == 0, err
    normals = {}
    for condition in ("yaw-r45", "yaw-l45"):
        for name in ("normal", "albedo", "rendered"):
            image = read_rgb(tmp_path / condition / f"{name}.png")
            assert image.shape == (SIZE, SIZE, 3) and image.any(), (condition, name)
            assert f"{condition}/{name}: {tmp_path / condition / name}.png" in out
        normals[condition] = read_rgb(tmp_path / condition / "normal.png").astype(np.int16)
    assert np.abs(normals["yaw-r45"] - normals["yaw-l45"]).mean() > 5
    grid = read_rgb(tmp_path / "grid.png")
    assert grid.shape == (2 * SIZE, 3 * SIZE, 3)  # the two requested conditions × 3 renders, nothing added
    np.testing.assert_array_equal(grid[SIZE + SIZE // 2:, :SIZE][:, SIZE // 4:],  # row 2 is yaw-l45 (below its label)
                                  normals["yaw-l45"][SIZE // 2:, SIZE // 4:].astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "yaw-l45", "yaw-r45"]


def test_render_command_defaults_to_512(tmp_path, capsys, monkeypatch):
    code, _, err = cli(capsys, monkeypatch, "render", "--synthetic", "--condition", "frontal", "--out", tmp_path,
                       "--device", "cpu")
    assert code == 0, err
    for name in ("normal", "albedo", "rendered"):
        assert read_rgb(tmp_path / "frontal" / f"{name}.png").shape == (512, 512, 3)
    assert read_rgb(tmp_path / "grid.png").shape == (512, 3 * 512, 3)


def test_unknown_condition_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, "render", "--synthetic", "--condition", "yaw-r99", "--out", tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "yaw-r99" in lines[0] and "head_conditions.yaml" in lines[0], err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_render_reads_an_identity_with_the_named_reconstructor(tmp_path, capsys, monkeypatch):
    """`render --reconstructor`: the identity's photo read by DECA, EMOCA v2 or SMIRK (random weights in their
    release layouts); each draws another head, SMIRK's without a light of its own (FLAME's neutral one)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import make_random_weights as mrw

    written = mrw.write_all(tmp_path / "w", layout="tiny", seed=0, only=["deca_model", "emoca_v2", "smirk"])
    pinned = [arg for wid, path in written.items() for arg in ("--weights", f"{wid}={path}")]
    normals = {}
    for name in ("deca", "emoca_v2", "smirk"):
        code, _, err = cli(capsys, monkeypatch, "render", "--synthetic", "--condition", "frontal", "--identity", "nasa-astronaut",
                           "--reconstructor", name, *pinned, "--out", tmp_path / name, "--size", SIZE, "--device", "cpu")
        assert code == 0, err
        normals[name] = read_rgb(tmp_path / name / "frontal" / "normal.png").astype(np.int16)
    assert np.abs(normals["deca"] - normals["smirk"]).mean() > 0 and np.abs(normals["deca"] - normals["emoca_v2"]).mean() > 0
    code, _, err = cli(capsys, monkeypatch, "render", "--synthetic", "-c", "frontal", "--identity", "nasa-astronaut",
                       "--reconstructor", "nobody", "--out", tmp_path / "x", "--device", "cpu")
    assert code == 2 and "unknown reconstructor 'nobody'" in err and len(err.strip().splitlines()) == 1
