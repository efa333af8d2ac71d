"""FLAME files and layer, on a synthetic FLAME-format head written the way FLAME's files are."""

import os
import pickle

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from caphuman_bench.errors import BenchError
from caphuman_bench.render.flame import FLAME
from caphuman_bench.render.flame_io import (
    load_flame_pickle,
    load_texture_space,
    load_uv_layout,
)
from caphuman_bench.render.synthetic import synthetic_flame, write_synthetic_flame


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    return write_synthetic_flame(tmp_path_factory.mktemp("flame"), seed=3)


@pytest.fixture(scope="module")
def head():
    return synthetic_flame(seed=3)


def test_synthetic_file_has_flame_pickle_layout(flame_files):
    raw = flame_files[0].read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2, as the Python-2 era file
    assert b"chumpy.ch\nCh\n" in raw and b"scipy.sparse.csc\ncsc_matrix\n" in raw


def test_loader_returns_the_written_arrays(flame_files, head):
    flame_path, texture_path, template_path = flame_files
    model = load_flame_pickle(flame_path)
    expected = head.flame_arrays()
    for key in ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "J"):
        assert isinstance(model[key], np.ndarray), key
        assert model[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(model[key], expected[key], err_msg=key)
    assert model["shapedirs"].shape == (len(model["v_template"]), 3, 400)
    assert model["bs_style"] == "lbs"

    texture = load_texture_space(texture_path, n_tex=50)
    assert texture.side == 64 and texture.basis.shape == (64 * 64 * 3, 50)
    np.testing.assert_allclose(texture.mean, head.texture_mean / 255.0, rtol=1e-6)
    np.testing.assert_allclose(texture.basis, head.texture_dirs[:, :50] / 255.0, rtol=1e-6)

    uv = load_uv_layout(template_path)
    np.testing.assert_allclose(uv.uv, head.uv.uv, atol=1e-6)
    np.testing.assert_array_equal(uv.uv_faces, head.uv.uv_faces)


def _numpy_lbs(model, shape, exp, pose):
    """Independent FLAME forward in numpy (scipy rotations, explicit kinematic chain)."""
    betas = np.concatenate([shape, exp])
    dirs = np.concatenate([model["shapedirs"][:, :, :100], model["shapedirs"][:, :, 300:350]], 2)
    v = model["v_template"] + dirs @ betas
    joints = model["J_regressor"] @ v
    full = np.stack([pose[:3], np.zeros(3), pose[3:], np.zeros(3), np.zeros(3)])
    rot = Rotation.from_rotvec(full).as_matrix()
    v = v + (model["posedirs"].reshape(-1, 36) @ (rot[1:] - np.eye(3)).reshape(-1)).reshape(-1, 3)
    parents = [-1, 0, 1, 1, 1]
    world_r, world_t = [None] * 5, [None] * 5
    for j in range(5):
        offset = joints[j] - (joints[parents[j]] if j else 0)
        if j == 0:
            world_r[j], world_t[j] = rot[0], offset
        else:
            p = parents[j]
            world_r[j], world_t[j] = world_r[p] @ rot[j], world_r[p] @ offset + world_t[p]
    out = np.zeros_like(v)
    for j in range(5):
        moved = v @ world_r[j].T + (world_t[j] - world_r[j] @ joints[j])
        out += model["weights"][:, j:j + 1] * moved
    return out


def test_layer_matches_independent_skinning(flame_files):
    model = load_flame_pickle(flame_files[0])
    flame = FLAME(model)
    rng = np.random.default_rng(0)
    shape, exp = rng.normal(size=(2, 100)), rng.normal(size=(2, 50))
    pose = np.array([[0.1, -0.4, 0.05, 0.3, 0.0, 0.02], [0.0, 0.6, 0.0, 0.1, 0.05, 0.0]])
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = flame(t(shape), t(exp), t(pose)).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], _numpy_lbs(model, shape[b], exp[b], pose[b]), atol=2e-6)

    zero = flame(torch.zeros(1, 100), torch.zeros(1, 50), torch.zeros(1, 6))[0].numpy()
    np.testing.assert_allclose(zero, model["v_template"], atol=1e-7)

    # A global rotation alone turns the whole head rigidly about the root joint.
    rotvec = np.array([0.0, 0.5, 0.2])
    turned = flame(torch.zeros(1, 100), torch.zeros(1, 50), t(np.r_[rotvec, 0, 0, 0])[None])[0].numpy()
    root = model["J_regressor"][0] @ model["v_template"]
    expected = (model["v_template"] - root) @ Rotation.from_rotvec(rotvec).as_matrix().T + root
    np.testing.assert_allclose(turned, expected, atol=1e-6)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": _RunsCode(marker)}, protocol=2))
    with pytest.raises(BenchError, match=r"refused to unpickle class (posix|nt|os)\.system"):
        load_flame_pickle(path)
    assert not marker.exists()
