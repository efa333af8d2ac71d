"""CapHuman's attention calls, kernel by kernel: which SDPA backend runs SD-1.5's shapes fastest.

    python benchmarks/bench_attention.py --out $OUT/attention.json [--batch 64] [--backends cudnn flash fa4 flex]

In a CapHuman generation call at 512² the level-1 self-attention (64x64 tokens, 8 heads of dim 40) is
the costliest kernel of all (20 % of the GPU time on an H200, `reports/perf/h200_2026-11-29_s5`).
Head dim 40 is awkward for the tensor cores, which multiply in steps of 16 (QK^T) and tile the head
dim to 64, and each score costs one exponential for only 4 x 40 multiply-adds, so the softmax's
exponentials compete with the products. This benchmark times every attention shape of one guided
CapHuman step (`SHAPES`, with how often each runs per step) for each backend:

* `cudnn`, `flash` (FlashAttention-2 in PyTorch), `efficient`: PyTorch's SDPA backends, one at a time;
* `fa4`: PyTorch's flash backend running FlashAttention-4 (`flash-attn-4`, the `sdpa=fa4` lever);
* `flex`: `torch.compile(flex_attention)` with no score modification (inductor's Triton template).

Inputs are laid out as diffusers makes them ([B, N, heads * dim] projections viewed as [B, heads, N,
dim]), bf16, random. Each row: median milliseconds of `--repeats` calls after warm-up, TFLOP/s
(4·B·heads·Nq·Nk·dim), the largest difference from a float32 reference on the first two rows,
and the step total weighted by the calls per step; times 20 steps is what one call of the pipeline
spends in attention with that backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, rows per image (2 = both guidance halves), heads, query tokens, key tokens, head dim, calls per
# step) for one guided step of CapHumanPipeline at 512² with the shared guidance prefix: the UNet's
# five level-1 self-attentions (two down, three up; the first runs on one half only), its cross-attentions
# to the 77 text tokens, CapFace's (down blocks only) to the 257 image tokens + 1 ID token; levels 2, 3
# and the middle block likewise (diffusers' SD-1.5 config: heads 8, channels 320/640/1280).
SHAPES = [
    ("unet L1 self", 2, 8, 4096, 4096, 40, 4),
    ("L1 self, one half (UNet prefix, CapFace)", 1, 8, 4096, 4096, 40, 3),
    ("unet L1 cross (text)", 2, 8, 4096, 77, 40, 5),
    ("capface L1 cross (identity)", 1, 8, 4096, 258, 40, 2),
    ("unet L2 self", 2, 8, 1024, 1024, 80, 5),
    ("capface L2 self", 1, 8, 1024, 1024, 80, 2),
    ("unet L3 self", 2, 8, 256, 256, 160, 5),
]


def diffusers_layout(rows: int, heads: int, tokens: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    flat = torch.randn(rows, tokens, heads * dim, generator=generator).to("cuda", torch.bfloat16)
    return flat.view(rows, tokens, heads, dim).transpose(1, 2)


def backend_call(name: str):
    """fn(q, k, v) for one backend; raises if the backend cannot run here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v)
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "fa4": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

    def call(q, k, v):
        with sdpa_kernel([backend]):
            return sdpa(q, k, v)

    return call


def time_call(fn, repeats: int) -> list[float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def shape_rows(shape: tuple, args, generator: torch.Generator) -> list[dict]:
    """One row per backend for one attention shape of `SHAPES`."""
    from caphuman_bench.pipelines.acceleration import EAGER, attention_backend

    name, halves, heads, nq, nk, dim, per_step = shape
    rows = halves * args.batch
    q = diffusers_layout(rows, heads, nq, dim, generator)
    k, v = (diffusers_layout(rows, heads, nk, dim, generator) for _ in range(2))
    reference = torch.nn.functional.scaled_dot_product_attention(*(t[:2].float() for t in (q, k, v)))
    flops = 4 * rows * heads * nq * nk * dim
    results = []
    for backend in args.backends:
        row = {"shape": name, "backend": backend, "rows": rows, "heads": heads, "q_tokens": nq, "k_tokens": nk,
               "head_dim": dim, "calls_per_step": per_step}
        results.append(row)
        try:
            call = backend_call(backend)
            with attention_backend(EAGER.with_(sdpa="fa4")) if backend == "fa4" else contextlib.nullcontext():
                out = call(q, k, v)
                times = time_call(lambda: call(q, k, v), args.repeats)
        except Exception as exc:  # a backend that cannot take the shape is a result
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(f"{name:42} {backend:9} {row['error'][:80]}", flush=True)
            continue
        ms = statistics.median(times)
        row.update(ms=round(ms, 4), spread_ms=round(max(times) - min(times), 4), tflops=round(flops / ms / 1e9, 1),
                   max_abs_error_vs_fp32=float((out[:2].float() - reference).abs().max()), step_ms=round(ms * per_step, 3))
        print(f"{name:42} {backend:9} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s  err {row['max_abs_error_vs_fp32']:.2e}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64, help="images per pipeline call")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backends", nargs="+", default=["cudnn", "flash", "efficient", "fa4", "flex"])
    args = parser.parse_args()

    props = torch.cuda.get_device_properties(0)
    report = {"device": props.name, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "rows": [], "per_call_s": {}}
    try:
        import flash_attn

        report["flash_attn_4"] = getattr(flash_attn, "__version__", "?")
    except ImportError:
        report["flash_attn_4"] = None
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        report["rows"] += shape_rows(shape, args, generator)
        torch.cuda.empty_cache()
    for backend in args.backends:
        rows = [r for r in report["rows"] if r["backend"] == backend]
        if rows and all("ms" in r for r in rows):
            report["per_call_s"][backend] = round(sum(r["step_ms"] for r in rows) * args.steps / 1000, 4)
    print("attention seconds per pipeline call (batch", args.batch, "):", report["per_call_s"])
    report["date"] = time.strftime("%Y-%m-%d")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
