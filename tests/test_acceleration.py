"""The CUDA fast path changes kernels, not the model: with the levers that run on a CPU (fused QKV,
channels-last, the shared guidance prefix) the conformance vectors still pass in float32; the writer
thread writes before it reports ok and re-raises a failed write."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import caphuman_bench.conformance.caphuman as conformance
from caphuman_bench.errors import BenchError
from caphuman_bench.pipelines.acceleration import (
    EAGER,
    FAST,
    accelerate_pipeline,
    attention_backend,
    default_levers,
)
from caphuman_bench.stages.writer import ImageWriter

REFERENCE = Path(__file__).parent / "data" / "caphuman_tiny"


def test_levers_default_to_the_fast_path_on_cuda_only(monkeypatch):
    monkeypatch.delenv("CAPHUMAN_BENCH_EAGER", raising=False)
    assert default_levers("cpu") == EAGER
    assert default_levers("cuda:1") == FAST and FAST.compile == "default" and FAST.fuse_qkv and FAST.channels_last
    monkeypatch.setenv("CAPHUMAN_BENCH_EAGER", "1")
    assert default_levers("cuda") == EAGER
    with pytest.raises(ValueError, match="compile mode"):
        EAGER.with_(compile="fastest")


def test_conformance_passes_with_the_levers_that_run_on_a_cpu(monkeypatch):
    build = conformance.build_reference_pipeline
    fused = {}

    def accelerated(reference_dir, device="cpu"):
        pipe = build(reference_dir, device)
        accelerate_pipeline(pipe, FAST.with_(compile="off", sdpa="math"))
        fused["qkv"] = sum(hasattr(m, "to_qkv") for m in pipe.unet.modules())
        fused["prefix"] = pipe.guidance_prefix is not None  # the guided DDIM case shares the UNet's prefix
        return pipe

    monkeypatch.setattr(conformance, "build_reference_pipeline", accelerated)
    with attention_backend(FAST.with_(sdpa="math")):
        report = conformance.run_conformance(REFERENCE)
    assert fused["qkv"] > 0 and fused["prefix"]  # the projections really were fused, the prefix shared
    assert report.passed, [(r.case, r.output, r.max_abs) for r in report.failures()]


def test_writer_reports_ok_only_after_the_file_exists(tmp_path):
    seen = []
    with ImageWriter(workers=2) as writer:
        for i in range(5):
            path = tmp_path / f"{i}.png"
            writer.submit(Image.new("RGB", (8, 8), (i, 0, 0)), path, then=lambda p=path: seen.append(p.exists()))
    assert seen == [True] * 5
    assert Image.open(tmp_path / "3.png").getpixel((0, 0)) == (3, 0, 0)


def test_writer_reraises_a_failed_write(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    writer = ImageWriter(workers=1)
    writer.submit(Image.new("RGB", (8, 8)), tmp_path / "not-a-folder" / "x.png")
    with pytest.raises(BenchError, match=r"not-a-folder/x.png: .*check the path and the disk"):  # one line, as inline writes
        writer.close()


def test_fa4_lever_without_flash_attention_4_is_one_clear_error(monkeypatch):
    import importlib.util

    import caphuman_bench.pipelines.acceleration as acceleration

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("flash_attn") else real_find_spec(name, *a))
    with pytest.raises(BenchError, match=r"flash-attn-4 package is not installed") as caught:
        with attention_backend(FAST.with_(sdpa="fa4")):
            pass
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(acceleration.torch.cuda, "is_available", lambda: False)
    if real_find_spec("flash_attn") is not None and real_find_spec("flash_attn.cute") is not None:
        with pytest.raises(BenchError, match=r"SM90 or SM100"):
            acceleration.check_flash_attention_4("cpu")


def test_fa4_lever_activates_flash_attention_4_only_while_entered(monkeypatch):
    """Scoring in the same process keeps PyTorch's own flash kernels: FA4 is scoped to generation."""
    from torch.nn import attention

    import caphuman_bench.pipelines.acceleration as acceleration

    active = []
    monkeypatch.setattr(acceleration, "check_flash_attention_4", lambda device=None: None)
    monkeypatch.setattr(attention, "current_flash_attention_impl", lambda: active[-1] if active else None)
    monkeypatch.setattr(attention, "activate_flash_attention_impl", lambda impl: active.append(impl))
    monkeypatch.setattr(attention, "restore_flash_attention_impl", lambda: active.clear())
    with attention_backend(FAST.with_(sdpa="fa4")):
        assert active == ["FA4"]
    assert active == []
    from torch.nn.attention import SDPBackend

    assert acceleration._sdpa_order(FAST.with_(sdpa="fa4"))[:2] == [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
