"""The `ip_adapter_controlnet` baseline with the smoke preset (tiny random SD-1.5 + IP-Adapter + ControlNet)."""

from __future__ import annotations

import numpy as np
import pytest

from caphuman_bench import weights
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import get_card
from caphuman_bench.errors import MissingWeightsError
from caphuman_bench.methods.base import MethodContext
from caphuman_bench.methods.head_renders import normals_to_controlnet_image
from caphuman_bench.registry import get_method
from tests.method_helpers import generated_pixels, generation_request


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return Benchmark.load()


@pytest.fixture(scope="module")
def card():
    return get_card("ip_adapter_controlnet")


@pytest.fixture(scope="module")
def adapter(card, tmp_path_factory):
    params = card.resolve_params("smoke", {"num_inference_steps": 1})  # 1 DDIM step keeps the file fast
    method = get_method(card.adapter)(card, params, MethodContext(device="cpu", workdir=tmp_path_factory.mktemp("method")))
    method.load()
    return method


@pytest.fixture(scope="module")
def base(adapter, bench) -> np.ndarray:
    """astronaut, yaw-r20, seed 3, the card's ip_adapter_scale (0.7)."""
    return generated_pixels(adapter, bench)


def test_smoke_generates_an_rgb_image_per_request(adapter, bench, base):
    assert base.shape == (64, 64, 3) and base.std() > 0


def test_same_seed_same_bytes_and_batches_of_mixed_identities(adapter, bench, base):
    assert np.array_equal(generated_pixels(adapter, bench), base)
    assert not np.array_equal(generated_pixels(adapter, bench, seed=8), base)
    # diffusers gives all prompts of a call one IP-Adapter embedding: the adapter must split by identity.
    adapter.params["batch_size"] = 3
    try:
        images = adapter.generate([generation_request(bench, "grace-hopper", "frontal", 1), generation_request(bench),
                                   generation_request(bench, "grace-hopper", "frontal", 1)])
    finally:
        adapter.params["batch_size"] = 1
    assert np.array_equal(np.asarray(images[1]), base)
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[2]))


def test_identity_scale_and_head_condition_change_the_image(adapter, bench, base):
    no_identity = generated_pixels(adapter, bench, {"ip_adapter_scale": 0.0})
    assert not np.array_equal(generated_pixels(adapter, bench, {"ip_adapter_scale": 0.6}), no_identity)
    assert not np.array_equal(base, no_identity)
    assert not np.array_equal(generated_pixels(adapter, bench, condition_id="yaw-l45"), base)
    # with scale 0 the reference photo has no way in: another identity, same condition and seed, same image
    assert np.array_equal(generated_pixels(adapter, bench, {"ip_adapter_scale": 0.0}, identity_id="grace-hopper"), no_identity)


def test_control_image_follows_normalbae_convention(adapter, bench):
    """ScanNet/BAE normals as (n + 1) / 2: x to the image's left, y down, z to the camera (frontal = blue)."""
    condition = bench.conditions["frontal"]
    render = adapter.head_render("nasa-astronaut", bench.reference_image("nasa-astronaut"), condition, 64)
    inside = render.mask[0] > 0
    right = inside & (np.arange(64)[None, :] >= 40)
    assert render.normal[0][right].mean() > 0.2  # the renderer: x points to the image's right
    rgb = np.asarray(normals_to_controlnet_image(render.normal)).astype(float)
    np.testing.assert_allclose(rgb[..., 0], np.clip(np.round((1 - render.normal[0]) * 127.5), 0, 255))
    np.testing.assert_allclose(rgb[..., 1], np.clip(np.round((1 - render.normal[1]) * 127.5), 0, 255))
    np.testing.assert_allclose(rgb[..., 2], np.clip(np.round((1 + render.normal[2]) * 127.5), 0, 255))
    assert rgb[..., 0][right].mean() < 110 and rgb[..., 2][inside].mean() > 200
    assert np.all(rgb[~inside] == 128)  # no normal outside the head: mid-grey


def test_head_target_is_the_mixed_code(adapter, bench):
    from caphuman_bench.render.head_condition import neutral_identity_code

    condition = bench.conditions["yaw-r20"]
    target = adapter.head_target("nasa-astronaut", bench.reference_image("nasa-astronaut"), condition)
    np.testing.assert_allclose(target["cam"], condition.cam)
    np.testing.assert_allclose(target["pose"][:3], condition.pose[:3])
    np.testing.assert_allclose(target["exp"], neutral_identity_code()["exp"])


def test_full_run_without_files_names_every_file_first(card):
    needed = get_method(card.adapter).required_weights(card, card.resolve_params(None, {}))
    assert set(card.weights) == set(needed)
    with pytest.raises(MissingWeightsError) as info:
        weights.require(needed)
    message = str(info.value)
    for text in ("ip-adapter-plus-face_sd15.safetensors", "h94/IP-Adapter", "control_v11p_sd15_normalbae",
                 "stable-diffusion-v1-5", "image_encoder", "deca_model.tar", "generic_model.pkl"):
        assert text in message
