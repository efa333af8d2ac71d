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
    # with scale 0 the reference photo's only way in is the head's shape and expression: another identity's photo
    # under the astronaut's head, same condition and seed, same image
    assert np.array_equal(generated_pixels(adapter, bench, {"ip_adapter_scale": 0.0}, identity_id="grace-hopper",
                                           head_of="nasa-astronaut"), no_identity)


def test_control_image_follows_normalbae_convention(adapter, bench):
    """normalbae: red grows to the image's left, green up, blue to the camera; truncated like the annotator.

    Source: ControlNet-v1-1-nightly (e2b4415) README ("blue is front, red is left, green is top") and its
    demo figure github_docs/imgs/normal_2.png (floor ≈ (127, 252, 146), ceiling ≈ (122, 8, 126))."""
    condition = bench.conditions["frontal"]
    render = adapter.head_render("nasa-astronaut", bench.reference_image("nasa-astronaut"), condition, 64)
    inside = render.mask[0] > 0
    rows, cols = np.nonzero(inside)
    right = inside & (np.arange(64)[None, :] >= 40)
    top = inside & (np.arange(64)[:, None] <= rows.min() + 3)
    bottom = inside & (np.arange(64)[:, None] >= rows.max() - 3)
    assert render.normal[0][right].mean() > 0.2  # the renderer: x points to the image's right
    assert render.normal[1][top].mean() > 0.2 > -0.2 > render.normal[1][bottom].mean()  # y up
    rgb = np.asarray(normals_to_controlnet_image(render.normal)).astype(float)
    np.testing.assert_array_equal(rgb[..., 0][inside], np.floor(np.clip((1 - render.normal[0]) * 0.5, 0, 1) * 255)[inside])
    np.testing.assert_array_equal(rgb[..., 1][inside], np.floor(np.clip((1 + render.normal[1]) * 0.5, 0, 1) * 255)[inside])
    np.testing.assert_array_equal(rgb[..., 2][inside], np.floor(np.clip((1 + render.normal[2]) * 0.5, 0, 1) * 255)[inside])
    assert rgb[..., 0][right].mean() < 110 and rgb[..., 2][inside].mean() > 200
    assert rgb[..., 1][top].mean() > 160 > 100 > rgb[..., 1][bottom].mean()  # up-facing: green high
    assert np.all(rgb[~inside] == [127, 127, 255])  # BAE's unit normal of a camera-facing background


def test_normalbae_colours_of_a_sphere():
    """Known answer from geometry alone: a unit sphere's up-, left- and camera-facing points."""
    size = 65
    y, x = np.mgrid[1:-1:size * 1j, -1:1:size * 1j]  # image rows run downwards, so y (up) falls
    inside = x**2 + y**2 < 1
    z = np.sqrt(np.clip(1 - x**2 - y**2, 0, None))
    normal = np.where(inside, np.stack([x, y, z]), 0.0).astype(np.float32)
    rgb = np.asarray(normals_to_controlnet_image(normal)).astype(int)
    centre, top, left, right = (32, 32), (1, 32), (32, 1), (32, 63)
    assert tuple(rgb[centre]) == (127, 127, 255)  # facing the camera: blue
    assert rgb[top][1] > 240 and abs(rgb[top][0] - 127) <= 1  # facing up: green high (the floor in normal_2.png)
    assert rgb[left][0] > 240 and abs(rgb[left][1] - 127) <= 1  # facing the image's left: red high
    assert rgb[right][0] < 15  # facing the image's right: red low (the wall in normal_2.png, R ≈ 37)
    assert tuple(rgb[0, 0]) == (127, 127, 255)  # outside: a camera-facing background, never mid-grey


def test_head_target_is_the_mixed_code(adapter, bench):
    from caphuman_bench.render.head_condition import neutral_identity_code

    condition = bench.conditions["yaw-r20"]
    reference = bench.reference_image("nasa-astronaut")
    target = adapter.head_target("nasa-astronaut", reference, condition)
    np.testing.assert_allclose(target["cam"], condition.cam)
    np.testing.assert_allclose(target["pose"][:3], condition.pose[:3])
    np.testing.assert_allclose(target["exp"], adapter.identity_code("nasa-astronaut", reference)["exp"])  # the tiny DECA's
    np.testing.assert_allclose(target["light"], neutral_identity_code()["light"])


def test_full_run_without_files_names_every_file_first(card):
    needed = get_method(card.adapter).required_weights(card, card.resolve_params(None, {}))
    assert set(card.weights) == set(needed)
    with pytest.raises(MissingWeightsError) as info:
        weights.require(needed)
    message = str(info.value)
    for text in ("ip-adapter-plus-face_sd15.safetensors", "h94/IP-Adapter", "control_v11p_sd15_normalbae",
                 "stable-diffusion-v1-5", "image_encoder", "deca_model.tar", "generic_model.pkl"):
        assert text in message
