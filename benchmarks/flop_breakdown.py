"""FLOPs of one guided CapHuman step per network and kind (convolution, linear, attention), full size, on the CPU.

    python benchmarks/flop_breakdown.py [--out flops.json]

Backs the arithmetic of `reports/perf/README.md` ("CapHuman at 12 images/s in bf16"): CapFace once, the
UNet on both guidance halves, the VAE decode once per image, at 512² with random weights in float32.
`torch.utils.flop_counter` counts convolutions and matrix products; attention is counted where
diffusers calls `scaled_dot_product_attention` (4·B·heads·Nq·Nk·dim, and its shapes), since the
counter does not see the CPU's fused attention kernel.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_run import build_pipelines, pipeline_inputs  # noqa: E402

KINDS = {"aten.convolution": "convolution", "aten.addmm": "linear", "aten.mm": "linear", "aten.bmm": "linear"}


def counted(fn) -> dict:
    """GFLOP by kind of one call of `fn`, attention by (Nq, Nk, head dim) too."""
    attention: collections.Counter = collections.Counter()
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        batch, heads, nq, dim = q.shape
        attention[f"{nq}x{k.shape[-2]}x{dim}"] += 4 * batch * heads * nq * k.shape[-2] * dim
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counting_sdpa
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        F.scaled_dot_product_attention = sdpa
    kinds: collections.Counter = collections.Counter()
    for op, flops in counter.get_flop_counts()["Global"].items():
        kinds[KINDS.get(str(op), str(op))] += flops
    kinds["attention"] = sum(attention.values())
    return {"gflop": {k: round(v / 1e9, 1) for k, v in kinds.items()},
            "attention_gflop_by_shape": {k: round(v / 1e9, 1) for k, v in attention.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe, _ = build_pipelines(torch.device("cpu"), torch.float32, tiny=False)
    inputs = pipeline_inputs(pipe, 1, 512, "cpu", torch.float32)
    latents, t = torch.randn(1, 4, 64, 64), torch.tensor([500])
    hint = pipe.capface.encode_hint(inputs["hint"])
    mask = pipe.capface.predict_mask(hint)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    down, mid, _ = pipe.capface_residuals(latents, t, hint, mask, inputs["tokens"], inputs["ident"], 0, True, True, copies=2)
    report = {
        "capface, per step": counted(lambda: pipe.capface_residuals(latents, t, hint, mask, inputs["tokens"], inputs["ident"],
                                                                    0, True, True, copies=2)),
        "unet, both guidance halves, per step": counted(lambda: pipe.unet(torch.cat([latents] * 2), t.repeat(2), encoder_hidden_states=text,
                                                                          down_block_additional_residuals=down,
                                                                          mid_block_additional_residual=mid)),
        "vae decode, per image": counted(lambda: pipe.vae.decode(latents)),
    }
    for name, row in report.items():
        print(f"{name:40} {row['gflop']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
