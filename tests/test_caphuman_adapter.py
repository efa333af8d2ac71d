"""The `caphuman` adapter with the smoke preset (tiny random CapHuman, synthetic head, no files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caphuman_bench import weights
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import get_card
from caphuman_bench.errors import MissingWeightsError
from caphuman_bench.methods.base import MethodContext
from caphuman_bench.registry import get_method
from tests.method_helpers import generated_pixels, generation_request


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return Benchmark.load()


@pytest.fixture(scope="module")
def card():
    return get_card("caphuman")


@pytest.fixture(scope="module")
def adapter(card, tmp_path_factory):
    # 2 DDIM steps (t = 501, 1) instead of the preset's 4 keep the file fast; every switch still acts.
    params = card.resolve_params("smoke", {"num_inference_steps": 2})
    method = get_method(card.adapter)(card, params, MethodContext(device="cpu", workdir=tmp_path_factory.mktemp("method")))
    method.load()
    return method


@pytest.fixture(scope="module")
def base(adapter, bench) -> np.ndarray:
    """The default request (astronaut, yaw-r20, seed 3) with the card's defaults: tau 0, both tokens."""
    return generated_pixels(adapter, bench)


def test_smoke_generates_one_rgb_image_per_request(adapter, bench):
    adapter.params["batch_size"] = 2
    try:
        images = adapter.generate([generation_request(bench, "nasa-astronaut", "frontal", 0), generation_request(bench, "grace-hopper", "yaw-r20", 1),
                                   generation_request(bench, "grace-hopper", "frontal", 2)])
    finally:
        adapter.params["batch_size"] = 1
    assert len(images) == 3
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in images)
    assert np.asarray(images[0]).std() > 0


def test_same_seed_same_bytes_regardless_of_batching(adapter, bench, base):
    assert np.array_equal(generated_pixels(adapter, bench), base)
    adapter.params["batch_size"] = 2
    try:
        batched = adapter.generate([generation_request(bench, "grace-hopper", "frontal", 1), generation_request(bench, "nasa-astronaut", "yaw-r20", 3)])
    finally:
        adapter.params["batch_size"] = 1
    assert np.abs(np.asarray(batched[1]).astype(int) - base.astype(int)).max() <= 1  # batch of 2 vs 1: float noise only
    assert not np.array_equal(generated_pixels(adapter, bench, seed=8), base)


def test_switches_change_the_output(adapter, bench, base):
    # DDIM steps at t = 501 and 1; tau = 500 zeroes the identity context at the first one.
    assert not np.array_equal(generated_pixels(adapter, bench, {"tau": 500}), base)
    assert not np.array_equal(generated_pixels(adapter, bench, {"use_global": False}), base)
    assert not np.array_equal(generated_pixels(adapter, bench, {"use_local": False}), base)


def test_tau_zero_and_tau_1000_never_drop(adapter, bench, base):
    # tau = 0 is "off" (the official default); tau >= 999 keeps every t in [0, 999]: the same image.
    assert np.array_equal(generated_pixels(adapter, bench, {"tau": 1000}), base)
    # tau = 1 keeps the identity only at the last step (t = 1): a different image.
    assert not np.array_equal(generated_pixels(adapter, bench, {"tau": 1}), base)


def test_precomputation_is_cached_in_the_workdir(adapter, bench, monkeypatch):
    request = generation_request(bench, "grace-hopper", "yaw-r20", 5)
    first = np.asarray(adapter.generate([request])[0])
    workdir = adapter.context.workdir
    assert list((workdir / "identity").glob("grace-hopper.*.safetensors"))
    assert (workdir / "render" / "grace-hopper" / "yaw-r20").is_dir()

    # A resumed run starts with the workdir and nothing in memory: it must not encode or render again.
    adapter._tokens.clear()
    adapter._codes.clear()
    adapter._hints.clear()
    adapter._device_tokens.clear()

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a cached identity or render")

    monkeypatch.setattr(type(adapter.identity_encoder), "forward", refuse)
    monkeypatch.setattr(type(adapter.renderer), "render_batch", refuse)
    second = np.asarray(adapter.generate([generation_request(bench, "grace-hopper", "yaw-r20", 5)])[0])
    assert np.array_equal(first, second)


def test_a_head_condition_is_made_once_per_identity_and_condition(adapter, bench, monkeypatch):
    """Its 35 prompts share an identity x condition: the hint tensor is built once and reused (and an
    identity's tokens are moved to the device once)."""
    adapter._hints.clear()
    renders = []
    head_render = adapter.head_render
    monkeypatch.setattr(adapter, "head_render", lambda *a: renders.append(a[0]) or head_render(*a))
    first = generation_request(bench, "grace-hopper", "frontal", 1)
    hint = adapter.condition_image(first, 64)
    again = adapter.condition_image(generation_request(bench, "grace-hopper", "frontal", 2, prompt="a portrait of a woman in a garden"), 64)
    other = adapter.condition_image(generation_request(bench, "grace-hopper", "yaw-r20", 1), 64)
    assert renders == ["grace-hopper", "grace-hopper"] and again is hint and not torch.equal(other, hint)
    expected = head_render("grace-hopper", first.reference, first.condition, 64).hint
    assert hint.dtype == adapter.dtype and torch.equal(hint, torch.from_numpy(expected))
    tokens = adapter.identity_on_device("grace-hopper", first.reference)
    assert adapter.identity_on_device("grace-hopper", first.reference) is tokens
    assert all(torch.equal(a, b.to(adapter.dtype)) for a, b in zip(tokens, adapter.identity_tokens("grace-hopper", first.reference)))


def test_head_target_is_the_mixed_code(adapter, bench):
    from caphuman_bench.render.head_condition import neutral_identity_code

    condition = bench.conditions["yaw-r20"]
    reference = bench.reference_image("nasa-astronaut")
    target = adapter.head_target("nasa-astronaut", reference, condition)
    neutral, code = neutral_identity_code(), adapter.identity_code("nasa-astronaut", reference)
    # position,pose: camera and global rotation from the condition, the rest the reference's: in the tiny
    # setting the tiny DECA's shape and expression, FLAME's neutral code otherwise.
    np.testing.assert_allclose(target["cam"], condition.cam)
    np.testing.assert_allclose(target["pose"][:3], condition.pose[:3])
    np.testing.assert_allclose(target["pose"][3:], neutral["pose"][3:])
    np.testing.assert_allclose(target["shape"], code["shape"])
    np.testing.assert_allclose(target["exp"], code["exp"])
    assert not np.allclose(target["exp"], neutral["exp"])
    np.testing.assert_allclose(target["light"], neutral["light"])


def test_full_run_without_files_stops_naming_flame_and_registration(card):
    adapter_cls = get_method(card.adapter)
    needed = adapter_cls.required_weights(card, card.resolve_params(None, {}))
    assert "realistic_vision_v3" not in needed  # backbone: caphuman needs no overlay
    assert {"flame_model", "flame_texture", "flame_head_template", "deca_model"} <= set(needed)
    with pytest.raises(MissingWeightsError) as info:
        weights.require(needed)
    message = str(info.value)
    for file in ("generic_model.pkl", "FLAME_texture.npz", "head_template.obj", "deca_model.tar", "caphuman.ckpt"):
        assert file in message
    assert "registration" in message
    overlay = adapter_cls.required_weights(card, card.resolve_params(None, {"backbone": "realistic_vision"}))
    assert {"realistic_vision_v3", "vae_ft_mse"} <= set(overlay)


@pytest.mark.slow
def test_full_setup_wires_every_weights_file(card, bench, tmp_path, monkeypatch):
    """The non-tiny `load()` with real loaders on stand-in files: random FaceNet / BiSeNet / DECA weights,
    the synthetic FLAME files, and a tiny model in place of the 6.9 GB checkpoint's components."""
    from facenet_pytorch import InceptionResnetV1
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import caphuman_bench.loaders.convert_caphuman as convert
    from caphuman_bench.models.deca_encoder import DecaEncoder
    from caphuman_bench.models.face_parser import BiSeNet
    from caphuman_bench.pipelines.tiny import build_tiny_caphuman_pipeline
    from caphuman_bench.render.synthetic import write_synthetic_flame

    paths = dict(zip(("flame_model", "flame_texture", "flame_head_template"), write_synthetic_flame(tmp_path / "flame")))
    paths.update(facenet_vggface2=tmp_path / "vggface2.pt", face_parser_bisenet=tmp_path / "79999_iter.pth",
                 deca_model=tmp_path / "deca_model.tar", caphuman_ckpt=tmp_path / "caphuman.ckpt")
    torch.save(InceptionResnetV1().state_dict(), paths["facenet_vggface2"])
    torch.save(BiSeNet().state_dict(), paths["face_parser_bisenet"])
    torch.save({"E_flame": DecaEncoder().state_dict()}, paths["deca_model"])

    calls = []

    def tiny_components(ckpt_path, backbone_path=None, vae_path=None, device="cpu", dtype=torch.float32):
        calls.append((ckpt_path, backbone_path, vae_path, dtype))
        components = dict(build_tiny_caphuman_pipeline(seed=0).components)
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=224, patch_size=56, hidden_act="quick_gelu")
        return {**components, "image_encoder": CLIPVisionModel(vision).eval()}

    monkeypatch.setattr(convert, "load_caphuman_components", tiny_components)
    params = card.resolve_params(None, {"height": 64, "width": 64, "num_inference_steps": 2})
    method = get_method(card.adapter)(card, params, MethodContext(device="cpu", workdir=tmp_path / "work", weights=paths))
    method.load()
    assert calls == [(paths["caphuman_ckpt"], None, None, torch.float32)]  # CPU: float32 whatever `dtype` says

    reference = bench.reference_image("nasa-astronaut")
    code = method.identity_code("nasa-astronaut", reference)  # DECA on the MTCNN box
    assert set(code) == {"shape", "tex", "exp", "pose", "cam", "light"} and code["light"].shape == (9, 3)
    (image,) = method.generate([generation_request(bench, "nasa-astronaut", "yaw-r20", 0)])
    assert image.size == (64, 64)
    target = method.head_target("nasa-astronaut", reference, bench.conditions["yaw-r20"])
    np.testing.assert_allclose(target["shape"], code["shape"])  # the reference's DECA shape, condition's pose
    np.testing.assert_allclose(target["pose"][:3], bench.conditions["yaw-r20"].pose[:3])
