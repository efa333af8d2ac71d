"""One fast path for every diffusers-based method: the levers that run on a CPU (fused QKV,
channels-last) leave a tiny SD-1.5 (+ ControlNet, + IP-Adapter) and a tiny SDXL (+ ControlNet)
pipeline's latents as they were in float32; the levers resolve from device, card parameter and
environment; the adapters opt in and the generate stage records what they used in run.json."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import get_card
from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import MethodContext
from caphuman_bench.methods.sd15 import build_tiny_sd15_pipeline
from caphuman_bench.pipelines.acceleration import (
    DIFFUSERS_FAST,
    EAGER,
    FAST,
    accelerate_diffusers_pipeline,
    compile_cache_dir,
    diffusers_networks,
    parse_lever_changes,
    resolve_levers,
    use_compile_cache,
)
from caphuman_bench.pipelines.tiny_sdxl import tiny_sdxl_components
from caphuman_bench.registry import get_method
from tests.method_helpers import generated_pixels

CPU_LEVERS = EAGER.with_(fuse_qkv=True, channels_last=True)


def _latents(pipe, **inputs) -> torch.Tensor:
    return pipe(["a photo of a person wearing a red hat"] * 2, num_inference_steps=3, guidance_scale=7.0, output_type="latent",
                generator=[torch.Generator().manual_seed(i) for i in range(2)], **inputs).images


def _fused(pipe) -> int:
    """Fused attention modules of the UNet, ControlNet and VAE (LoRA-wrapped ones stay unfused)."""
    return sum(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for net in diffusers_networks(pipe).values() for m in net.modules())


def _assert_same_latents(pipe, **inputs):
    pipe.set_progress_bar_config(disable=True)
    before = _latents(pipe, **inputs)
    fast = accelerate_diffusers_pipeline(copy.deepcopy(pipe), CPU_LEVERS)
    after = _latents(fast, **inputs)
    assert _fused(fast) > 0 and fast.levers == CPU_LEVERS
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-4  # float reordering only (conformance's 1e-4)


def test_sd15_with_controlnet_keeps_its_latents():
    pipe = build_tiny_sd15_pipeline(controlnet=True, image_encoder=False)
    _assert_same_latents(pipe, image=torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    assert any(hasattr(m, "to_qkv") for m in accelerate_diffusers_pipeline(pipe, CPU_LEVERS).controlnet.modules())


def test_sdxl_with_controlnet_keeps_its_latents():
    from diffusers import StableDiffusionXLControlNetPipeline

    pipe = StableDiffusionXLControlNetPipeline(**tiny_sdxl_components(seed=0, controlnet=True), add_watermarker=False)
    _assert_same_latents(pipe, image=torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)), height=64, width=64)


def test_ip_adapter_processors_are_left_alone():
    """An IP-Adapter's cross-attention reads the separate projections: only the plain self-attentions fuse."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from caphuman_bench.methods.ip_adapter_controlnet import build_tiny_ip_adapter_controlnet_pipeline

    pipe = build_tiny_ip_adapter_controlnet_pipeline(seed=0)
    pipe.set_ip_adapter_scale(0.7)
    embeds = [torch.randn(2, 1, 5, 32, generator=torch.Generator().manual_seed(2))]  # [negative; positive] CLIP hidden states
    _assert_same_latents(pipe, image=torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)), ip_adapter_image_embeds=embeds)
    fast = accelerate_diffusers_pipeline(pipe, CPU_LEVERS)
    assert sum(isinstance(p, IPAdapterAttnProcessor2_0) for p in fast.unet.attn_processors.values()) > 0


def test_levers_resolve_from_device_parameter_and_environment(monkeypatch):
    monkeypatch.delenv("CAPHUMAN_BENCH_EAGER", raising=False)
    monkeypatch.delenv("CAPHUMAN_BENCH_LEVERS", raising=False)
    assert resolve_levers("cpu") == EAGER and resolve_levers("cuda", tiny=True) == EAGER
    assert resolve_levers("cuda", fast=DIFFUSERS_FAST) == DIFFUSERS_FAST and not DIFFUSERS_FAST.share_guidance_prefix
    assert resolve_levers("cuda", "compile=off, fuse_qkv=0", fast=DIFFUSERS_FAST) == DIFFUSERS_FAST.with_(compile="off", fuse_qkv=False)
    assert resolve_levers("cpu", "channels_last=true") == EAGER.with_(channels_last=True)
    monkeypatch.setenv("CAPHUMAN_BENCH_LEVERS", "sdpa=flash")
    assert resolve_levers("cuda", "compile=off").with_() == DIFFUSERS_FAST.with_(compile="off", sdpa="flash", share_guidance_prefix=True)
    monkeypatch.setenv("CAPHUMAN_BENCH_EAGER", "1")
    assert resolve_levers("cuda", "compile=default") == EAGER
    for bad, message in (("warp=1", "lever 'warp'"), ("fuse_qkv=maybe", "true or false"), ("compile=fastest", "compile mode")):
        with pytest.raises(ValueError, match=message):
            parse_lever_changes(bad)


def test_a_bad_levers_switch_is_one_clear_error(monkeypatch):
    card = get_card("sd15")
    monkeypatch.setenv("CAPHUMAN_BENCH_LEVERS", "warp=1")
    with pytest.raises(BenchError, match=r"\$CAPHUMAN_BENCH_LEVERS: lever 'warp'"):
        get_method(card.adapter).validated_params(card, "smoke", {})


def test_compile_cache_lives_in_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("CAPHUMAN_BENCH_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "caphuman-bench" / "compile"
    monkeypatch.setenv("CAPHUMAN_BENCH_COMPILE_CACHE", str(tmp_path / "mine"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_compile_cache() == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))  # the caller's choice wins
    assert use_compile_cache() == tmp_path / "theirs"


def test_an_adapter_opts_in_and_keeps_its_images(tmp_path, monkeypatch):
    """IP-Adapter-FaceID + ControlNet through its adapter: the switched-on levers fuse and lay out the networks, same image.
    (FaceID's LoRA-wrapped UNet projections stay unfused; its ControlNet and VAE fuse.)"""
    bench = Benchmark.load()
    card = get_card("ip_adapter_faceid_controlnet_head")
    images = {}
    for levers in ("", "fuse_qkv=1,channels_last=1"):
        monkeypatch.setenv("CAPHUMAN_BENCH_LEVERS", levers)
        params = get_method(card.adapter).validated_params(card, "smoke", {"num_inference_steps": 2})
        adapter = get_method(card.adapter)(card, params, MethodContext(device="cpu", workdir=tmp_path / str(len(images))))
        adapter.load()
        assert adapter.levers == EAGER.with_(**parse_lever_changes(levers))
        assert (_fused(adapter.pipe) > 0) == bool(levers)
        images[levers] = generated_pixels(adapter, bench).astype(int)
    assert np.abs(images[""] - images["fuse_qkv=1,channels_last=1"]).max() <= 1


def test_the_run_records_its_levers(tmp_path, monkeypatch, capsys):
    from tests.cli_helpers import cli, only_run

    monkeypatch.setenv("CAPHUMAN_BENCH_LEVERS", "channels_last=1")
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "sd15", "--preset", "smoke", "--runs-dir", tmp_path, "--device", "cpu",
                       "--param", "num_inference_steps=1", "--no-score")
    assert code == 0, err
    info = json.loads((only_run(tmp_path) / "run.json").read_text())
    assert info["acceleration"]["cpu"] == EAGER.with_(channels_last=True).as_dict()

    # float8 changes the numbers: a later process of this run must use the setting its images were made with
    from caphuman_bench.pipelines.acceleration import NUMERIC_LEVERS
    from caphuman_bench.rundir import RunDir

    run = RunDir(only_run(tmp_path))
    with pytest.raises(BenchError, match=r"made with fp8=0 on cpu, this process has fp8=1, which changes the numbers"):
        run.record_levers("cuda", FAST.with_(fp8=True).as_dict(), fixed=NUMERIC_LEVERS)
    run.record_levers("cuda", FAST.as_dict(), fixed=NUMERIC_LEVERS)  # other kernels, same numbers: recorded
    assert json.loads(run.run_json.read_text())["acceleration"]["cuda"] == FAST.as_dict()


def test_attention_order_is_set_for_the_process():
    from torch.nn.attention import SDPBackend

    import caphuman_bench.pipelines.acceleration as acceleration

    before = torch._C._get_sdp_priority_order()
    try:
        acceleration.set_attention_order(DIFFUSERS_FAST)  # cudnn first, as under `attention_backend`
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    finally:
        acceleration._PROCESS_ATTENTION_ORDER.close()
    assert torch._C._get_sdp_priority_order() == before


@pytest.mark.parametrize("name, compiled", [("lora", False), ("dreambooth_controlnet_head", True)])
def test_fine_tuned_methods_keep_what_survives_their_weight_swaps(name, compiled, tmp_path, monkeypatch):
    """Per identity, DreamBooth copies weights into the same modules (compiled graphs stay valid); LoRA adds
    and removes modules (each identity would recompile), so it runs uncompiled. Neither fuses q/k/v."""
    import caphuman_bench.methods.base as base

    monkeypatch.setattr(base, "resolve_levers", lambda *args, **kwargs: DIFFUSERS_FAST)  # as on CUDA
    card = get_card(name)
    params = get_method(card.adapter).validated_params(card, "smoke", {})
    adapter = get_method(card.adapter)(card, params, MethodContext(device="cpu", workdir=tmp_path))
    adapter.load()
    assert adapter.levers == DIFFUSERS_FAST.with_(fuse_qkv=False, compile="default" if compiled else "off")
    assert _fused(adapter.pipe) == 0
