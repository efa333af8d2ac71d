"""Speed of the expensive parts of a HumanIPHC run, at full architecture with random weights.

    python benchmarks/bench_caphuman.py --out reports/perf/<device>.json

1. CapHuman generation (SD-1.5 UNet + CapFace + VAE + CLIP text encoder, official sizes): 512×512,
   20 DDIM steps, guidance 7 (two UNet passes and one CapFace pass a step), per batch size and dtype.
2. The head-condition renderer: the 10 conditions of one identity at 512×512 on the synthetic
   FLAME-format head (FLAME itself has 9976 triangles; the synthetic head's count is reported).
3. The CapHuman adapter end to end on the smoke preset on this device (the CUDA path of generate).

Random weights make the images meaningless but the arithmetic identical to the real model's.
Timings: CUDA events after warm-up, median of repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def bench_generation(device, dtype, batch_sizes, steps, size, repeats) -> list[dict]:
    from diffusers import DDIMScheduler

    from caphuman_bench.loaders.convert_caphuman import build_components, caphuman_configs, clip_tokenizer
    from caphuman_bench.pipelines.pipeline_caphuman import CapHumanPipeline

    configs = caphuman_configs()  # the official SD-1.5-sized model
    torch.manual_seed(0)
    modules = build_components(configs, ("unet", "capface", "vae", "text_encoder"))
    pipe = CapHumanPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=clip_tokenizer(77),
                            unet=modules["unet"], capface=modules["capface"],
                            scheduler=DDIMScheduler(**configs.scheduler)).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    token_dim = configs.capface.get("image_token_dim", 1024)
    rows = []
    for batch in batch_sizes:
        hint = torch.rand(batch, 9, size, size, device=device, dtype=dtype)
        tokens = torch.randn(batch, 257, token_dim, device=device, dtype=dtype)
        ident = torch.nn.functional.normalize(torch.randn(batch, 1, 512, device=device), dim=-1).to(dtype)
        gens = [torch.Generator(device="cpu").manual_seed(i) for i in range(batch)]

        def run():
            out = pipe(["a photo of a person wearing a red hat"] * batch, condition_image=hint, image_tokens=tokens,
                       id_embedding=ident, num_inference_steps=steps, guidance_scale=7.0, generator=gens,
                       output_type="pt")
            assert torch.isfinite(out.images).all()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = timed(run, device, repeats)
        median = statistics.median(times)
        rows.append({"what": "generate", "dtype": str(dtype).removeprefix("torch."), "batch": batch, "steps": steps,
                     "size": size, "seconds_per_batch": round(median, 4), "seconds_per_image": round(median / batch, 4),
                     "images_per_second": round(batch / median, 3), "repeats": repeats,
                     "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None})
        print(rows[-1], flush=True)
    return rows


def bench_renderer(device, repeats) -> dict:
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.render.head_condition import HeadConditionRenderer, neutral_identity_code

    bench = Benchmark.load()
    renderer = HeadConditionRenderer.synthetic(device=device)
    conditions = list(bench.conditions.values())
    code = neutral_identity_code()
    times = timed(lambda: renderer.render_batch(code, conditions, size=512), device, repeats)
    faces = int(renderer.flame.faces.shape[0])
    row = {"what": "render", "conditions": len(conditions), "size": 512, "seconds_per_batch": round(statistics.median(times), 4),
           "seconds_per_render": round(statistics.median(times) / len(conditions), 5), "triangles": faces, "repeats": repeats}
    print(row, flush=True)
    return row


def bench_adapter(device) -> dict:
    """The smoke preset through the method adapter on this device (fp16 on CUDA): checks the path runs."""
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.cards import get_card
    from caphuman_bench.methods.base import GenerationRequest, MethodContext
    from caphuman_bench.registry import get_method
    import tempfile

    bench = Benchmark.load()
    card = get_card("caphuman")
    params = card.resolve_params("smoke", {"dtype": "float16"})
    with tempfile.TemporaryDirectory() as workdir:
        adapter = get_method(card.adapter)(card, params, MethodContext(device=str(device), workdir=Path(workdir)))
        adapter.load()
        requests = [GenerationRequest(f"t{i}", ident, "a photo of a woman on the beach", bench.reference_image(ident),
                                      bench.conditions[cond], torch.Generator().manual_seed(i), 64, 64)
                    for i, (ident, cond) in enumerate([("nasa-astronaut", "frontal"), ("grace-hopper", "yaw-r20")])]
        start = time.perf_counter()
        images = adapter.generate(requests)
        seconds = time.perf_counter() - start
    row = {"what": "adapter_smoke", "device": str(device), "images": len(images), "seconds": round(seconds, 3),
           "sizes": [im.size for im in images], "dtype": str(adapter.dtype)}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
              "results": []}
    report["results"].append(bench_adapter(device))
    report["results"].append(bench_renderer(device, args.repeats))
    for name in args.dtype:
        report["results"] += bench_generation(device, getattr(torch, name), args.batch, args.steps, args.size, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
