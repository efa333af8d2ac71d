"""Where the time of a HumanIPHC run goes, and what each speed lever buys, on one device.

    python benchmarks/bench_run.py generation --out $OUT/gen.json            # per-lever table, MFU, tolerance
    python benchmarks/bench_run.py generation --method instantid --batch 4 --out $OUT/instantid.json  # stock vs ours
    python benchmarks/bench_run.py compile-cache --method controlnet_head --batch 8 --out $OUT/cache.json  # cold vs warm
    python benchmarks/bench_run.py scoring RUN_DIR --out $OUT/score.json     # images/s of each metric family
    python benchmarks/bench_run.py scoring RUN_DIR --invariance --out $OUT/inv.json  # GPU vs CPU, batch, processes
    python benchmarks/bench_run.py e2e --weights DIR --runs-dir R --out $OUT/e2e.json -- <run args>
    python benchmarks/bench_run.py scaling --one R1 --many R4 --out $OUT/scaling.json

`generation`: CapHumanPipeline at the official size (SD-1.5 UNet + CapFace + VAE + CLIP text, random
weights: the real arithmetic, meaningless images), 512², DDIM 20, guidance 7, one row per lever
(`caphuman_bench/pipelines/acceleration.py`), and stock diffusers (`StableDiffusionControlNetPipeline`,
the same UNet + a 9-channel `ControlNetModel`, which runs the control branch on both guidance halves)
in the same process for the headline ratio. Each row: median seconds per batch over `--repeats`
after one warm-up call (compilation happens there and is reported as `first_call_s`), images/s,
peak memory, MFU (FLOPs per image from `torch.utils.flop_counter` on the eager pipeline, over the
device's bf16 dense peak), and the difference of its final latents from the eager ones of the same
inputs (relative L2, and max |Δ| over max |latent|). `--kernel-profile` adds one call of each CapHuman row
under the CUDA profiler (kernel time by kind, the GPU's idle time and largest gaps) and one under CUDA's
sync debug mode (each place the host waits for the GPU).

`generation --method NAME` (any generating card but caphuman, whose rows are the above): the card's
family pipeline at full size with random weights (`benchmarks/method_pipelines.py`: SD-1.5 or SDXL, with
or without ControlNet) at the card's steps, size and guidance — stock diffusers (eager) as the
baseline row, then the same pipeline with the default levers on this device
(`acceleration.accelerate_diffusers_pipeline`, `--levers` changes them), in one process on the same
inputs; images/s at `--batch`, ms per image-step, and the output difference.
`compile-cache`: the fast row of `--method` (caphuman included) in two processes, one after the other,
sharing a fresh compile cache folder: the first compiles (cold), the second loads (warm); each reports
its first batch and its steady batch, and the warm first batch's excess over the steady one
(`--with-stock`: the cold process times stock diffusers first, so its JSON is also the card's row).

`e2e`: a whole `caphuman-bench run` as a subprocess; each stderr line is time-stamped as it arrives
and the stage times come from those lines and the run directory's own `status.jsonl`.
`scoring`: all metric families together, then each alone, over a finished run's images (fresh scores,
`force`); `--profile` adds untimed profiled passes and writes where the host time goes. With
`--invariance` instead: the same images scored on the device with batch 64, then with batch 7, by
`--invariance-procs` processes (torchrun), once with PyTorch's default TF32 settings and on the CPU,
and per value the largest difference of each from the first (`part_scoring_invariance`).
`scaling`: steady-state images/s of a one-process run and of a torchrun run, from their status lines.
Every part writes its JSON after every row, so a run stopped at its time limit still reports.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # method_pipelines

H200_BF16_DENSE_FLOPS = 989e12  # datasheet, SXM; the measured matmul ceiling is reported beside it
PROMPT = "a photo of a person wearing a red hat"
CONFORMANCE_VECTORS = ROOT / "tests" / "data" / "caphuman_tiny"


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "command": " ".join(sys.argv),
            "host_cpus": os.cpu_count()}
    if device.type == "cuda":
        info.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version())
    else:
        info["device"] = platform.processor() or "cpu"
    return info


class Report:
    """A JSON file rewritten after every row."""

    def __init__(self, path: Path, header: dict):
        self.path, self.data = path, {**header, "rows": []}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.flush()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.flush()

    def flush(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


class Load:
    """Mean busy host cores (/proc/stat) and GPU utilisation (nvidia-smi every 100 ms) over a block: which
    side a scoring pass waits on. `result` is empty where neither can be read."""

    def __enter__(self):
        self.result: dict = {}
        self.cpu = _cpu_jiffies()
        self.smi = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) if shutil.which("nvidia-smi") else None
        return self

    def __exit__(self, *exc) -> None:
        end = _cpu_jiffies()
        if self.cpu and end and end[1] > self.cpu[1]:
            self.result["host_cores_busy"] = round((end[0] - self.cpu[0]) / (end[1] - self.cpu[1]) * (os.cpu_count() or 1), 1)
        if self.smi is not None:
            self.smi.terminate()
            samples = [float(v) for v in self.smi.communicate()[0].split() if v.isdigit()]
            if samples:
                self.result["gpu_busy_percent"] = round(statistics.mean(samples), 1)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) host CPU time since boot from /proc/stat's first line (Linux only)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device) -> float | None:
    """Measured bf16 dense TFLOP/s of an 8192³ product on random data (mean of 10 after 3 warm-ups)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


# ----------------------------------------------------------------------------------------------
# generation levers


def build_pipelines(device: torch.device, dtype: torch.dtype, tiny: bool):
    """(CapHumanPipeline, stock diffusers ControlNet pipeline) sharing one random UNet, VAE and text encoder."""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    from caphuman_bench.loaders.convert_caphuman import build_components, caphuman_configs, clip_tokenizer
    from caphuman_bench.pipelines.pipeline_caphuman import CapHumanPipeline
    from caphuman_bench.pipelines.tiny import TINY_HPARAMS, tiny_text_encoder, tiny_vae

    configs = caphuman_configs(TINY_HPARAMS if tiny else None)
    torch.manual_seed(0)
    with torch.device(device):  # random initialisation on the GPU: seconds, not minutes
        modules = build_components(configs, ("unet", "capface") if tiny else ("unet", "capface", "vae", "text_encoder"))
        if tiny:
            cond = configs.hparams["conditioning"]
            modules["vae"], modules["text_encoder"] = tiny_vae(), tiny_text_encoder(cond["context_dim"], cond["num_text_tokens"])
        stock_config = {k: v for k, v in configs.capface.items() if k not in ("id_embedding_dim", "image_token_dim", "mask_threshold")}
        controlnet = ControlNetModel(**stock_config)
    tokenizer = clip_tokenizer(configs.hparams["conditioning"].get("num_text_tokens", 77))
    scheduler = DDIMScheduler(**configs.scheduler)
    ours = CapHumanPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=tokenizer, unet=modules["unet"],
                            capface=modules["capface"], scheduler=scheduler).to(device, dtype)
    stock = StableDiffusionControlNetPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=tokenizer, unet=modules["unet"],
        controlnet=controlnet.to(device, dtype), scheduler=DDIMScheduler(**configs.scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)
    return ours, stock


def pipeline_inputs(pipe, batch: int, size: int, device, dtype) -> dict:
    generator = torch.Generator().manual_seed(1234)
    token_dim = pipe.capface.config.image_token_dim
    return {
        "hint": torch.rand(batch, 9, size, size, generator=generator).to(device, dtype),
        "tokens": torch.randn(batch, 257, token_dim, generator=generator).to(device, dtype),
        "ident": torch.nn.functional.normalize(torch.randn(batch, 1, 512, generator=generator), dim=-1).to(device, dtype),
    }


def call_caphuman(pipe, inputs: dict, steps: int, levers=None, output_type: str = "pt", callback=None):
    """One generation call on the benchmark's inputs (one prompt, one generator per image)."""
    from caphuman_bench.pipelines.acceleration import EAGER, attention_backend

    batch = inputs["hint"].shape[0]
    with attention_backend(levers or EAGER):
        return pipe([PROMPT] * batch, condition_image=inputs["hint"], image_tokens=inputs["tokens"], id_embedding=inputs["ident"],
                    num_inference_steps=steps, guidance_scale=7.0, generator=[torch.Generator().manual_seed(i) for i in range(batch)],
                    output_type=output_type, callback_on_step_end=callback).images


def run_caphuman(pipe, inputs: dict, steps: int, levers=None) -> torch.Tensor:
    """The final latents (random-weight images saturate at 0 and 1, so differences are read on latents)."""
    final = {}

    def keep_latents(_pipe, step, _t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    call_caphuman(pipe, inputs, steps, levers, callback=keep_latents)
    return final["latents"]


def run_stock(pipe, inputs: dict, steps: int) -> torch.Tensor:
    batch = inputs["hint"].shape[0]
    return pipe([PROMPT] * batch, image=inputs["hint"], num_inference_steps=steps, guidance_scale=7.0, eta=0.0,
                generator=[torch.Generator().manual_seed(i) for i in range(batch)], output_type="pt").images


def flops_per_image(pipe, device, dtype, size: int, steps: int) -> float:
    """FLOPs of one image (batch 2, eager) counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = pipeline_inputs(pipe, 2, size, device, dtype)
    with FlopCounterMode(display=False) as counter:
        run_caphuman(pipe, inputs, steps)
    return counter.get_total_flops() / 2


def difference(latents: torch.Tensor, reference: torch.Tensor) -> dict:
    """‖a − b‖ / ‖b‖ and max |a − b| / max |b| of the final latents, per batch."""
    a, b = latents.float(), reference.float()
    return {"latent_rel_l2": float((a - b).norm() / b.norm()), "latent_max_abs_rel": float((a - b).abs().max() / b.abs().max()),
            "finite": bool(torch.isfinite(a).all())}


def timed_calls(fn, device, repeats: int) -> tuple[float, list[float], torch.Tensor]:
    """(first call seconds, later call seconds, last output)."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return first, times, out


KERNEL_KINDS = (  # first match wins; inductor names its kernels triton_{poi,red,per}_fused_<ops>
    ("attention", ("fmha", "flash", "sdpa", "attention", "attn")),
    ("convolution", ("fprop", "conv", "dgrad", "implicit")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "ampere_", "sm90_")),
    ("triton reduction (norms)", ("triton_red", "triton_per")),
    ("triton pointwise", ("triton_poi",)),
    ("copies and eager elementwise", ("memcpy", "memset", "copy", "cat", "elementwise")),
)


def host_syncs(fn, device: torch.device) -> dict[str, int]:
    """Where one call of `fn` makes the host wait for the GPU: "file:line" -> count, from CUDA's
    synchronisation debug mode (each such wait lets the GPU run dry until the host launches again)."""
    if device.type != "cuda":
        return {}
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
            counts[where] = counts.get(where, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def kernel_breakdown(fn, device: torch.device, top: int = 25) -> dict:
    """One call of `fn` under the CUDA profiler: kernel time by kind, the top kernels, and the share
    of the call's wall time with no kernel running (host work the GPU waits for)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {}
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - start
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start)
    busy, reach, gaps = 0.0, float("-inf"), []  # union of kernel intervals and the idle gaps between them, in microseconds
    for before, e in zip([None, *kernels], kernels):
        begin, end = e.time_range.start, e.time_range.end
        if before is not None and begin > reach:
            gaps.append((begin - reach, reach - kernels[0].time_range.start, before.name, e.name))
        if end > reach:
            busy += end - max(begin, reach)
            reach = end
    span_s = (reach - kernels[0].time_range.start) / 1e6 if kernels else 0.0
    gaps.sort(key=lambda g: -g[0])
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    total = sum(by_name.values())
    kinds: dict[str, float] = {}
    for name, us in by_name.items():
        low = name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in low for key in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_s_profiled": round(wall, 4), "kernel_s": round(total / 1e6, 4), "kernels": len(kernels),
            "gpu_busy_fraction": round(busy / 1e6 / wall, 4) if wall else None,
            "idle_before_first_and_after_last_kernel_s": round(wall - span_s, 4),
            "idle_between_kernels_s": round(sum(g[0] for g in gaps) / 1e6, 4),
            "gaps_over_100us": {"count": sum(g[0] > 100 for g in gaps), "s": round(sum(g[0] for g in gaps if g[0] > 100) / 1e6, 4)},
            "largest_gaps": [{"us": round(us), "at_ms": round(at / 1e3, 1), "after": a[:90], "before": b[:90]} for us, at, a, b in gaps[:12]],
            "by_kind": {k: {"s": round(v / 1e6, 4), "share": round(v / total, 4)} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "s": round(us / 1e6, 4), "share": round(us / total, 4)} for n, us in ranked]}


def lever_plan(batches: list[int], fast_batches: list[int], large_batches: list[int] = ()):
    """(label, levers or 'stock', batch) rows, cheapest first; every compiled row is one compilation."""
    from caphuman_bench.pipelines.acceleration import EAGER, FAST

    big = batches[-1]
    rows = [("stock", "stock diffusers (eager)", "stock", big)]
    rows += [("eager", "eager", EAGER, b) for b in batches]
    rows += [("single", "+ channels-last", EAGER.with_(channels_last=True), big),
             ("single", "+ fused QKV", EAGER.with_(fuse_qkv=True), big),
             ("single", "+ cuDNN attention", EAGER.with_(sdpa="cudnn"), big),
             ("single", "+ flash attention", EAGER.with_(sdpa="flash"), big),
             ("single", "channels-last + fused QKV + cuDNN attention", FAST.with_(compile="off"), big)]
    rows += [("compile", "all + torch.compile (default)", FAST, b) for b in fast_batches]
    rows += [("tolerance", "tolerance", "fp32", 4)]
    rows += [("compile-nchw", "fused QKV + cuDNN attention + torch.compile, NCHW", FAST.with_(channels_last=False), fast_batches[0]),
             ("cudagraphs", "all + torch.compile (reduce-overhead: CUDA graphs)", FAST.with_(compile="reduce-overhead"), fast_batches[0]),
             ("tuning", "all + torch.compile + coordinate-descent tuning", FAST.with_(coordinate_descent=True), fast_batches[0]),
             ("autotune", "all + torch.compile (max-autotune-no-cudagraphs)", FAST.with_(compile="max-autotune-no-cudagraphs"), fast_batches[0]),
             ("benchmark", "all + cuDNN autotuner (cudnn.benchmark)", FAST.with_(cudnn_benchmark=True), fast_batches[0]),
             ("freeze", "all + inductor freezing", FAST.with_(freeze=True), fast_batches[0]),
             ("freeze-benchmark", "all + inductor freezing + cuDNN autotuner", FAST.with_(freeze=True, cudnn_benchmark=True), fast_batches[0]),
             *[("large-batch", "all + inductor freezing + cuDNN autotuner", FAST.with_(freeze=True, cudnn_benchmark=True), b)
               for b in large_batches],
             ("sdpa-efficient", "all + torch.compile, memory-efficient attention first", FAST.with_(sdpa="efficient"), fast_batches[0]),
             ("sdpa-flash", "all + torch.compile, flash attention first", FAST.with_(sdpa="flash"), fast_batches[0]),
             ("sdpa-auto", "all + torch.compile, PyTorch's attention order", FAST.with_(sdpa="auto"), fast_batches[0]),
             ("sdpa-fa4", "all + torch.compile, FlashAttention-4 under the flash backend", FAST.with_(sdpa="fa4"), fast_batches[0]),
             ("fp8", "all + torch.compile + float8 linear layers (opt-in, changes the numbers)", FAST.with_(fp8=True), fast_batches[0]),
             ("fp8-fa4", "all + torch.compile + float8 linear layers + FlashAttention-4", FAST.with_(fp8=True, sdpa="fa4"), fast_batches[0]),
             ("epilogue", "all + torch.compile with epilogue fusion", FAST.with_(epilogue_fusion=True), fast_batches[0]),
             ("aggressive", "all + torch.compile with aggressive fusion", FAST.with_(aggressive_fusion=True), fast_batches[0]),
             ("no-prefix", "all + torch.compile, each guidance half runs the UNet's text-free prefix",
              FAST.with_(share_guidance_prefix=False), fast_batches[0]),
             ("gemm-autotune", "all + torch.compile (max-autotune-no-cudagraphs, GEMMs only)",
              FAST.with_(compile="max-autotune-no-cudagraphs", autotune_convolutions=False), fast_batches[0])]

    return rows


def part_generation(args) -> None:
    from caphuman_bench.pipelines.acceleration import accelerate_pipeline

    if args.method and args.method != "caphuman":
        return part_method_generation(args)
    args.steps, args.size = args.steps or 20, args.size or 512
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    report = Report(args.out, {"part": "generation", **environment(device), "dtype": args.dtype, "size": args.size,
                               "steps": args.steps, "guidance": 7.0, "repeats": args.repeats, "tiny": args.tiny})
    report.data["matmul_bf16_tflops_measured"] = matmul_ceiling(device)
    base, stock = build_pipelines(device, dtype, args.tiny)
    flops = flops_per_image(base, device, dtype, args.size, args.steps)
    report.data["flops_per_image"] = flops
    peak = H200_BF16_DENSE_FLOPS if device.type == "cuda" else None
    report.flush()
    deadline = time.monotonic() + args.budget_s
    reference: dict[int, torch.Tensor] = {}  # eager images per batch size: the tolerance baseline
    for key, label, levers, batch in lever_plan(args.batch, args.fast_batch, args.large_batch):
        if args.only and key not in args.only:
            continue
        if time.monotonic() > deadline:
            report.add({"label": label, "batch": batch, "skipped": "time budget spent"})
            continue
        if levers == "fp32":
            if args.tolerance_fp32:
                report.data["bf16_eager_vs_fp32_eager"] = bf16_scale(base, args, device, dtype)
                report.flush()
            continue
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False  # process-wide: only the rows that ask for it
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        inputs = pipeline_inputs(base, batch, args.size, device, dtype)
        try:
            if levers == "stock":
                first, times, images = timed_calls(lambda: run_stock(stock, inputs, args.steps), device, args.repeats)
            else:
                pipe = base if levers.as_dict() == levers.__class__().as_dict() else accelerate_pipeline(copy.deepcopy(base), levers)
                first, times, images = timed_calls(lambda: run_caphuman(pipe, inputs, args.steps, levers), device, args.repeats)
        except Exception as exc:  # a lever that fails on this stack is a result, not the end of the table
            report.add({"label": label, "batch": batch, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            continue
        median = statistics.median(times)
        row = {"label": label, "levers": levers if levers == "stock" else levers.as_dict(), "batch": batch,
               "first_call_s": round(first, 2), "seconds_per_batch": round(median, 4), "spread_s": round(max(times) - min(times), 4),
               "images_per_second": round(batch / median, 3),
               "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}
        if levers != "stock":
            row["mfu"] = round(flops * batch / median / peak, 4) if peak else None
            if levers.as_dict() == levers.__class__().as_dict():
                reference[batch] = images
            elif batch in reference:
                row["vs_eager"] = difference(images, reference[batch])
            if args.kernel_profile:
                try:
                    row["kernel_profile"] = kernel_breakdown(lambda: run_caphuman(pipe, inputs, args.steps, levers), device)
                    row["host_syncs"] = host_syncs(lambda: run_caphuman(pipe, inputs, args.steps, levers), device)
                except Exception as exc:  # the profile is extra: its failure must not cost the row
                    row["kernel_profile"] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        report.add(row)
        del images
        if args.in_run and key == "compile":
            for variant in ("pil", "pil+writer"):
                report.add(in_run_conditions(pipe, inputs, args.steps, levers, device, batch, variant, args.repeats))
    print_table(report.data)


def part_method_generation(args) -> None:
    """Stock diffusers vs our fast path for one card's family pipeline, one process, same inputs."""
    from method_pipelines import build_family_pipeline, card_setting, family_call

    from caphuman_bench.pipelines.acceleration import DIFFUSERS_FAST, accelerate_diffusers_pipeline, resolve_levers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    setting = card_setting(args.method)
    family = setting["family"]
    size = 64 if args.tiny else (args.size or setting["size"])
    steps, batch = args.steps or setting["steps"], args.batch[-1]
    levers = resolve_levers(device, args.levers or "", fast=DIFFUSERS_FAST)
    report = Report(args.out, {"part": "generation-method", **environment(device), "method": args.method, "family": family.base,
                               "controlnet": family.controlnet, "not_modelled": family.extras, "dtype": args.dtype, "size": size,
                               "steps": steps, "card_steps": setting["steps"], "guidance": setting["guidance"], "batch": batch,
                               "repeats": args.repeats, "tiny": args.tiny})
    started = time.perf_counter()
    stock = build_family_pipeline(family, device, dtype, args.tiny)
    report.data["build_s"] = round(time.perf_counter() - started, 1)
    outputs = {}
    for key in ("stock", "ours"):
        if args.only and key not in args.only:
            continue
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            pipe = stock if key == "stock" else accelerate_diffusers_pipeline(copy.deepcopy(stock), levers)
            first, times, outputs[key] = timed_calls(family_call(pipe, family, batch, size, steps, setting["guidance"]), device, args.repeats)
        except Exception as exc:  # a failing row is a result, not the end of the report
            report.add({"label": key, "batch": batch, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            continue
        median = statistics.median(times)
        row = {"label": key, "levers": "stock diffusers, eager" if key == "stock" else levers.as_dict(), "batch": batch,
               "first_call_s": round(first, 2), "seconds_per_batch": round(median, 4), "spread_s": round(max(times) - min(times), 4),
               "images_per_second": round(batch / median, 3), "ms_per_image_step": round(median / batch / steps * 1e3, 3),
               "images_per_second_at_card_steps": round(batch / median * steps / setting["steps"], 3),
               "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}
        if key == "ours" and "stock" in outputs:
            stock_row = next(r for r in report.data["rows"] if r["label"] == "stock" and "images_per_second" in r)
            row["speedup_vs_stock"] = round(row["images_per_second"] / stock_row["images_per_second"], 3)
            row["vs_stock"] = difference(outputs["ours"], outputs["stock"])
        if key == "ours":
            del pipe
        report.add(row)


def part_conformance_levers(args) -> None:
    """The CapHuman conformance vectors (tests/data/caphuman_tiny) on this device: float32 as the test
    suite runs them, then the port in bfloat16, then bfloat16 with float8 linear layers (the `fp8`
    lever; eager, compile off): max |port - official| and max relative error per case output, beside
    the float32 tolerance, so each opt-in's effect on the vectors is stated in numbers."""
    import caphuman_bench.conformance.caphuman as conformance
    from caphuman_bench.pipelines.acceleration import float8_linears

    device = torch.device(args.device)
    build, tensor = conformance.build_reference_pipeline, conformance._tensor
    report = Report(args.out, {"part": "conformance-levers", **environment(device), "vectors": str(CONFORMANCE_VECTORS)})
    for label, dtype, fp8 in (("float32", torch.float32, False), ("bfloat16", torch.bfloat16, False),
                              ("bfloat16 + float8 linear layers", torch.bfloat16, True)):
        def built(reference_dir, device_name="cpu", dtype=dtype, fp8=fp8):
            pipe = build(reference_dir, device_name).to(dtype=dtype)
            if fp8:
                float8_linears([pipe.unet, pipe.capface])
            return pipe

        def cast(tensors, name, case, device_name, dtype=dtype):
            value = tensor(tensors, name, case, device_name)
            return value.to(dtype) if value.is_floating_point() else value

        conformance.build_reference_pipeline, conformance._tensor = built, cast
        try:
            result = conformance.run_conformance(CONFORMANCE_VECTORS, device=str(device))
            report.add({"label": label, "passed": result.passed,
                        "rows": [{"case": r.case, "output": r.output, "max_abs": r.max_abs, "max_rel": r.max_rel,
                                  "tolerance": r.tolerance, "passed": r.passed} for r in result.rows]})
        except Exception as exc:  # the row says why, the next one runs
            report.add({"label": label, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
        finally:
            conformance.build_reference_pipeline, conformance._tensor = build, tensor
    for row in report.data["rows"]:  # the two outputs a reader compares: one denoiser call, a whole guided DDIM run
        worst = {out: max((r["max_rel"] for r in row.get("rows", []) if r["output"] == out), default=float("nan")) for out in ("eps", "samples")}
        said = row.get("error") or f"passed={row['passed']}, max_rel eps {worst['eps']:.2e}, DDIM samples {worst['samples']:.2e}"
        print(f"{row['label']:34} {said}")


def part_compile_cache(args) -> None:
    """The fast row of `--method` in two processes sharing one fresh compile cache: cold, then warm."""
    from caphuman_bench.pipelines.acceleration import COMPILE_CACHE_ENV

    device = torch.device(args.device)
    folder = Path(args.cache_dir or tempfile.mkdtemp(prefix="caphuman-compile-"))
    report = Report(args.out, {"part": "compile-cache", **environment(device), "method": args.method, "batch": args.batch,
                               "cache_dir": str(folder)})
    for attempt in ("cold", "warm"):
        out = args.out.with_name(f"{args.out.stem}.{attempt}.json")
        stock = ["stock"] if args.with_stock and attempt == "cold" else []  # the cold process doubles as the stock-vs-ours row
        if args.method == "caphuman":
            rows = ["--only", *stock, "compile", "--batch", str(args.batch), "--fast-batch", str(args.batch), "--budget-s", "1e9"]
        else:
            rows = ["--method", args.method, "--only", *stock, "ours", "--batch", str(args.batch)]
        command = [sys.executable, str(Path(__file__).resolve()), "generation", *rows, "--repeats", str(args.repeats), "--device", args.device,
                   "--dtype", args.dtype, "--out", str(out), *(["--tiny"] if args.tiny else []), *(["--levers", args.levers] if args.levers else []),
                   *(["--steps", str(args.steps)] if args.steps else [])]
        env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
        env[COMPILE_CACHE_ENV] = str(folder)
        started = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        fast = [r for r in json.loads(out.read_text())["rows"] if "images_per_second" in r] if out.exists() else []
        row = {"attempt": attempt, "process_wall_s": round(wall, 1), "returncode": done.returncode}
        if fast:
            r = fast[-1]
            row.update(first_batch_s=r["first_call_s"], steady_batch_s=r["seconds_per_batch"], images_per_second=r["images_per_second"],
                       first_batch_excess_s=round(r["first_call_s"] - r["seconds_per_batch"], 2))
        else:
            row["error"] = (done.stderr or done.stdout)[-800:]
        report.add(row)
    warm = report.data["rows"][-1]
    if "first_batch_excess_s" in warm:
        report.data["warm_steady_within_20s_of_first_batch"] = warm["first_batch_excess_s"] <= 20
        report.flush()


def in_run_conditions(pipe, inputs: dict, steps: int, levers, device, batch: int, variant: str, repeats: int) -> dict:
    """The compiled pipeline called as a run's adapter calls it: PIL output (`pil`), and with the run's
    PNG writer encoding each batch in its threads while the next one denoises (`pil+writer`). Against
    the row before, it shows whether a run's slower batches come from the output or the writer."""
    from caphuman_bench.stages.writer import ImageWriter

    def call():
        return call_caphuman(pipe, inputs, steps, levers, output_type="pil")

    with tempfile.TemporaryDirectory() as folder, ImageWriter() as writer:
        def call_and_write():
            images = call()
            for i, image in enumerate(images):
                writer.submit(image, Path(folder) / f"{i}.png")

        first, times, _ = timed_calls(call_and_write if variant == "pil+writer" else call, device, repeats)
    median = statistics.median(times)
    return {"label": f"all + torch.compile, as a run calls it: {variant}", "levers": levers.as_dict(), "batch": batch,
            "first_call_s": round(first, 2), "seconds_per_batch": round(median, 4), "spread_s": round(max(times) - min(times), 4),
            "images_per_second": round(batch / median, 3), "peak_memory_gib": None}


def bf16_scale(base, args, device, dtype) -> dict:
    """The scale of low precision itself: eager `dtype` vs eager float32 on the same 4 inputs."""
    torch._dynamo.reset()
    small = pipeline_inputs(base, 4, args.size, device, torch.float32)
    fp32 = copy.deepcopy(base).to(torch.float32)
    reference = run_caphuman(fp32, small, args.steps)
    del fp32
    low = run_caphuman(base, {k: v.to(dtype) for k, v in small.items()}, args.steps)
    return difference(low, reference)


def print_table(data: dict) -> None:
    print(f"\n{data.get('device')}  torch {data.get('torch')}  {data.get('dtype')}  FLOPs/image {data.get('flops_per_image', 0) / 1e12:.1f} T")
    print(f"{'lever':52} {'batch':>5} {'img/s':>7} {'MFU':>6} {'first s':>8} {'GiB':>6} {'relL2 vs eager':>14}")
    for r in data["rows"]:
        if "images_per_second" not in r:
            print(f"{r['label']:52} {r['batch']:>5}  {r.get('error') or r.get('skipped')}")
            continue
        diff = r.get("vs_eager", {}).get("latent_rel_l2")
        mfu = "—" if r.get("mfu") is None else f"{r['mfu']:.3f}"  # stock diffusers: FLOPs are counted on our pipeline only
        print(f"{r['label']:52} {r['batch']:>5} {r['images_per_second']:7.2f} {mfu:>6} {r['first_call_s']:8.1f} "
              f"{r['peak_memory_gib'] or 0:6.1f} {'' if diff is None else f'{diff:.2e}':>14}")
        profile = r.get("kernel_profile") or {}
        if "by_kind" in profile:
            kinds = ", ".join(f"{k} {v['share']:.0%}" for k, v in profile["by_kind"].items())
            print(f"{'':4}GPU busy {profile['gpu_busy_fraction']:.1%} of {profile['wall_s_profiled']:.2f} s (idle: "
                  f"{profile['idle_before_first_and_after_last_kernel_s']:.3f} s outside the kernels, {profile['idle_between_kernels_s']:.3f} s "
                  f"between them, {profile['gaps_over_100us']['count']} gaps > 100 µs); kernel time: {kinds}")
        if r.get("host_syncs"):
            print(f"{'':4}host waits for the GPU at: " + ", ".join(f"{where} ×{n}" for where, n in r["host_syncs"].items()))


# ----------------------------------------------------------------------------------------------
# end to end, scoring, scaling


def part_e2e(args, run_args: list[str]) -> None:
    """`caphuman-bench run ...` as a subprocess; stage times from its time-stamped log and status.jsonl."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    if args.weights:
        env["CAPHUMAN_BENCH_WEIGHTS"] = str(args.weights)
    command = [*args.launcher.split(), "-m", "caphuman_bench.cli", "run", "--runs-dir", str(args.runs_dir), *run_args]
    report = Report(args.out, {"part": "e2e", **environment(torch.device(args.device)), "run_command": " ".join(command)})
    start = time.time()
    lines = []
    with subprocess.Popen(command, env=env, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, cwd=ROOT) as proc:
        for line in proc.stdout:
            if line.strip() and "━" not in line:
                lines.append((round(time.time() - start, 2), line.rstrip()))
                print(f"[{lines[-1][0]:8.2f}] {line.rstrip()}", flush=True)
    report.data.update(returncode=proc.returncode, wall_s=round(time.time() - start, 2), log=lines[-60:])
    runs = [p for p in Path(args.runs_dir).iterdir() if p.is_dir()] if Path(args.runs_dir).exists() else []
    for run in runs:
        report.add({"run": run.name, **stage_times(run, start, lines)})
    report.flush()


def stage_times(run: Path, start: float, lines: list[tuple[float, str]]) -> dict:
    """Where a run's time went, from the log lines' arrival and status.jsonl.

    The generate stage writes a batch's `ok` lines (each with the batch's call time divided among its
    images) before the next batch's, so the lines in order, cut at the run's batch size, are the batches.
    Two steady-state rates, both over the full batches after the first (which compiles): `call` counts
    the adapter's calls alone; `wall` the span between batch completions (status times: 1 s
    resolution), so it also holds the stage's per-batch work outside the calls.
    """
    records = [json.loads(l) for l in (run / "status.jsonl").read_text().splitlines() if l.strip()] if (run / "status.jsonl").exists() else []
    ok = [r for r in records if r["status"] == "ok"]
    when = lambda text: next((t for t, line in lines if text in line), None)  # noqa: E731
    generated_at = when("generated ")
    out = {"images_ok": len(ok), "images_failed": sum(r["status"] == "failed" for r in records),
           "planned_s": when("run "), "generate_done_s": generated_at, "run_done_s": lines[-1][0] if lines else None}
    if ok:
        size = max(1, int(json.loads((run / "run.json").read_text())["params"].get("batch_size", 1)))
        batches = [ok[i : i + size] for i in range(0, len(ok), size)]
        call_s = [sum(r["seconds"] for r in batch) for batch in batches]
        done_at = [max(datetime.fromisoformat(r["time"]) for r in batch) for batch in batches]
        steady = [i for i in range(1, len(batches)) if len(batches[i]) == size]
        out.update(batch_size=size, batches=len(batches), first_batch_s=round(call_s[0], 2),
                   denoise_total_s=round(sum(call_s), 2),
                   batch_call_s=[round(c, 2) for c in call_s])
        if steady:
            images = size * len(steady)
            span = (done_at[steady[-1]] - done_at[0]).total_seconds()
            out.update(steady_call_images_per_second=round(images / sum(call_s[i] for i in steady), 3),
                       steady_wall_images_per_second=round(images / span, 3) if span > 0 else None)
        if generated_at is not None:
            out["load_and_prepare_s"] = round(generated_at - out["denoise_total_s"], 2)
    if generated_at is not None and lines:
        out["score_and_report_s"] = round(lines[-1][0] - generated_at, 2)
    return out


def open_scored_run(args, options: dict) -> tuple:
    """The run a scoring part measures and its families: one set-up for `part_scoring` and
    `part_scoring_invariance`, so both score the same images with the same weights. `--weights` becomes
    the weights folder, `--perturb` makes the images distinct first; returns (run, ready, skipped) as
    `select_metrics` gives them (families whose weights resolve, and why the others are skipped)."""
    from caphuman_bench.rundir import RunDir
    from caphuman_bench.stages.score import select_metrics

    if args.weights:
        os.environ["CAPHUMAN_BENCH_WEIGHTS"] = str(args.weights)
    run = RunDir(Path(args.run))
    if args.perturb:
        perturb_images(run)
    return run, *select_metrics(args.metrics or None, options)


def part_scoring(args) -> None:
    """images/s of all metric families together and of each alone over a finished run's images.

    The first pass loads the models and computes the identities' reference features (reported as
    `cold`); every later pass starts with the per-image memos emptied, so detections and CLIP
    embeddings are computed again, as they are for a run's new images."""
    from caphuman_bench.faces.memo import forget_all
    from caphuman_bench.stages.score import READ_THREADS, SWITCH_INTERVAL_S, score

    device = torch.device(args.device)
    options = {"protocol": args.protocol} if args.protocol else {}
    report = Report(args.out, {"part": "scoring", **environment(device), "run": str(args.run), "batch_size": args.score_batch,
                               "options": options, "read_threads": READ_THREADS, "switch_interval_s": SWITCH_INTERVAL_S})
    run, ready, skipped = open_scored_run(args, options)
    report.data["families"], report.data["skipped"] = sorted(ready), skipped
    n = len(run.finished_ids())
    # (label, families, attempt, the scoring stage's settings for the pass)
    passes = [("all", None, "cold", {})] + [("all", None, "warm", {})] * args.warm_repeats
    passes += [(name, [name], "warm", {}) for name in ready if not args.together_only]
    passes += [("all", None, f"warm, switch interval {v} s", {"SWITCH_INTERVAL_S": v}) for v in args.switch_interval]
    passes += [("all", None, f"warm, {v} reading threads", {"READ_THREADS": v}) for v in args.read_threads]
    passes += [(label, names, "profiled", {}) for label, names in [("all", None), *[(n, [n]) for n in args.profile or []]]
               if args.profile is not None]
    import caphuman_bench.stages.score as score_stage

    defaults = {"SWITCH_INTERVAL_S": score_stage.SWITCH_INTERVAL_S, "READ_THREADS": score_stage.READ_THREADS}
    for label, names, attempt, settings in passes:
        forget_all()
        _sync(device)
        for name, value in {**defaults, **settings}.items():
            setattr(score_stage, name, value)
        profiler = cProfile.Profile() if attempt == "profiled" else None
        start = time.perf_counter()
        try:
            with Load() as load:
                if profiler:
                    profiler.enable()
                try:
                    summary = score(run, metrics=names or list(ready), device=str(device), options=options, force=True,
                                    batch_size=args.score_batch)
                finally:
                    if profiler:
                        profiler.disable()
                _sync(device)
        except Exception as exc:
            report.add({"metrics": label, "attempt": attempt, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        seconds = time.perf_counter() - start
        if profiler:  # a pass of its own: profiling slows the interpreter, so its time is not a result
            write_profile(profiler, args.out.with_name(f"{args.out.stem}.{label}.profile.txt"), f"{label}, {n} images, {seconds:.1f} s profiled")
            continue
        report.add({"metrics": label, "attempt": attempt, "images": n, "scored": summary.scored, "errors": summary.errors,
                    "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 2), **load.result})
    for name, value in defaults.items():
        setattr(score_stage, name, value)
    warm = [r["images_per_second"] for r in report.data["rows"] if r.get("metrics") == "all" and r.get("attempt") == "warm" and "seconds" in r]
    if warm:  # the median of the default warm passes (passes after the first tend to be faster)
        report.data["all_families_images_per_second"] = statistics.median(warm)
        report.flush()
    print(json.dumps({k: v for k, v in report.data.items() if k != "rows"}, indent=1, default=str))


INVARIANCE_LIMITS = {"deca": 1e-5, "angles_deg": 1e-3, "device_vs_cpu": 1e-4}  # issue 25's bounds


def part_scoring_invariance(args) -> None:
    """Does a score depend on the device, the batch or the process count? Every family whose weights
    exist scores the run's images (fresh, `force`) on `--device` with batch 64 — the reference — then
    with batch 7, with `--invariance-procs` processes sharing the device (torchrun, batch 64), with
    PyTorch's default TF32 settings instead of strict float32 (what scoring did before), and on the
    CPU (batch 64). Each row: per value the largest |difference| from the reference, how many rows differ by
    more than 1e-5, and whether the (task, family) statuses agree. Strict float32 bounds (issue 25):
    DECA values 1e-5, angles 1e-3 degrees, device against CPU 1e-4."""
    import numpy as np

    import caphuman_bench.stages.score as score_stage
    from caphuman_bench.faces.memo import forget_all
    from caphuman_bench.stages.score import KEY_COLUMNS, read_scores, score

    device = torch.device(args.device)
    options = {"protocol": args.protocol} if args.protocol else {}
    run, ready, skipped = open_scored_run(args, options)
    report = Report(args.out, {"part": "scoring-invariance", **environment(device), "run": str(args.run), "images": len(run.finished_ids()),
                               "options": options, "families": sorted(ready), "skipped": skipped, "limits": INVARIANCE_LIMITS})

    def scored(device_name: str, batch: int, tf32_default: bool = False) -> tuple:
        forget_all()
        start = time.perf_counter()
        if tf32_default:  # scoring as it was: no strict block, PyTorch's defaults (cuDNN TF32 on, matmul TF32 off)
            saved = score_stage.strict_float32
            score_stage.strict_float32 = contextlib.nullcontext
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        try:
            score(run, metrics=list(ready), device=device_name, options=options, force=True, batch_size=batch)
        finally:
            if tf32_default:
                score_stage.strict_float32 = saved
        return read_scores(run), round(time.perf_counter() - start, 1)

    def compare_with(reference, label: str, rows, seconds, **extra) -> None:
        values = [c for c in rows.columns if c not in KEY_COLUMNS and c in reference.columns]
        joined = reference.merge(rows, on=["task_id", "metric"], suffixes=("", "_other"))
        joined = joined[joined["metric"].isin(list(ready))]
        gaps = {c: np.abs(joined[c].to_numpy(float) - joined[f"{c}_other"].to_numpy(float)) for c in values}
        both = {c: ~np.isnan(g) for c, g in gaps.items()}
        by_value = {c: {"max_abs": float(g[both[c]].max(initial=0.0)), "rows_over_1e-5": int((g[both[c]] > 1e-5).sum()),
                        "rows": int(both[c].sum())} for c, g in gaps.items() if both[c].any()}
        report.add({"comparison": label, "seconds": seconds, "rows_compared": len(joined),
                    "status_differs": int((joined["status"] != joined["status_other"]).sum()), **extra, "by_value": by_value})

    reference, seconds = scored(str(device), 64)
    report.data["reference"] = {"device": str(device), "batch_size": 64, "seconds": seconds,
                                "numerics": {f: e.get("numerics") for f, e in run.scoring().get("metrics", {}).items() if f in ready}}
    report.flush()
    compare_with(reference, "batch 64 against 7", *scored(str(device), 7), batch_size=7)
    if args.invariance_procs > 1:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.invariance_procs), __file__, "scoring", str(args.run),
                               "--score-batch", "64", "--warm-repeats", "0", "--out", str(args.out.with_suffix(".procs.json")),
                               *(["--weights", str(args.weights)] if args.weights else []), *(["--protocol", args.protocol] if args.protocol else []),
                               *(["--metrics", *args.metrics] if args.metrics else [])], capture_output=True, text=True)
        if done.returncode != 0:
            report.add({"comparison": f"1 process against {args.invariance_procs}", "error": done.stderr[-2000:]})
        else:
            compare_with(reference, f"1 process against {args.invariance_procs}", read_scores(run), round(time.perf_counter() - start, 1),
                         processes=args.invariance_procs)
    if device.type == "cuda":
        compare_with(reference, "strict float32 against PyTorch's default TF32", *scored(str(device), 64, tf32_default=True))
    if device.type != "cpu":  # last: the slowest pass
        compare_with(reference, f"{device.type} against cpu", *scored("cpu", 64), other_device="cpu")
    print(json.dumps({k: v for k, v in report.data.items() if k != "rows"}, indent=1, default=str))


def part_scoring_processes(args) -> None:
    """All families with WORLD_SIZE scoring processes (torchrun) sharing this machine's GPUs.

    One process feeds the GPU from one interpreter: its host work (PNG decoding, crops, warps,
    Python between kernels) holds the GIL, and the GPU idles meanwhile. Several processes on one GPU
    (`torchrun --nproc_per_node N ... score RUN`, each on cuda:LOCAL_RANK % GPUs) overlap one's host
    work with another's kernels. Each rank scores its shard once untimed (models load, references
    are encoded), then every rank starts the timed pass at one barrier and the pass ends at the
    next. Rank 0 compares the merged rows with the ones scores.parquet held before (a one-process
    pass over the same images) and writes the JSON."""
    import numpy as np
    import torch.distributed as dist

    from caphuman_bench.faces.memo import forget_all
    from caphuman_bench.rundir import RunDir
    from caphuman_bench.runner import pick_device
    from caphuman_bench.stages.plan import Shard
    from caphuman_bench.stages.score import KEY_COLUMNS, read_scores, score, select_metrics

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(pick_device("auto"))
    if args.weights:
        os.environ["CAPHUMAN_BENCH_WEIGHTS"] = str(args.weights)
    options = {"protocol": args.protocol} if args.protocol else {}
    run = RunDir(Path(args.run))
    ready, _ = select_metrics(args.metrics or None, options)
    before = read_scores(run) if rank == 0 else None
    shard, n = Shard(rank, world), len(run.finished_ids())
    rows = []
    for attempt in ["cold", *["warm"] * args.warm_repeats]:
        forget_all()
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        with Load() if rank == 0 else contextlib.nullcontext() as load:  # the whole machine, seen from rank 0
            score(run, metrics=list(ready), device=str(device), options=options, force=True, batch_size=args.score_batch, shard=shard)
            _sync(device)
            dist.barrier()
        seconds = time.perf_counter() - start
        rows.append({"attempt": attempt, "processes": world, "images": n, "seconds": round(seconds, 2),
                     "images_per_second": round(n / seconds, 2), **(load.result if load else {})})
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    if rank == 0:
        after = read_scores(run)
        values = [c for c in after.columns if c not in KEY_COLUMNS]
        joined = after.merge(before, on=["task_id", "metric"], suffixes=("", "_one"))
        same_status = bool((joined["status"] == joined["status_one"]).all())
        gaps = {c: np.nan_to_num(np.abs(joined[c].to_numpy(float) - joined[f"{c}_one"].to_numpy(float))) for c in values}
        data = {"part": "scoring-processes", **environment(device), "run": str(args.run), "families": sorted(ready),
                "batch_size": args.score_batch, "processes": world, "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
                "host_threads_env": os.environ.get("CAPHUMAN_BENCH_HOST_THREADS"), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                "rows": rows, "all_families_images_per_second": max((r["images_per_second"] for r in rows if r["attempt"] == "warm"), default=None),
                "vs_one_process": {"rows_compared": len(joined), "rows_one_process": len(before), "same_status": same_status,
                                   "max_abs_value_difference": float(max((g.max(initial=0.0) for g in gaps.values()), default=0.0)),
                                   # per value column: the largest difference and how many rows differ by more than 1e-3
                                   "by_value": {c: {"max_abs": float(g.max()), "rows_over_1e-3": int((g > 1e-3).sum())}
                                                for c, g in gaps.items() if len(g) and g.max() > 0}}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1, default=str) + "\n")
        print(json.dumps({k: v for k, v in data.items() if k != "rows"}, default=str), flush=True)
    dist.destroy_process_group()


def write_profile(profiler, path: Path, title: str) -> None:
    """The main thread's profile of a pass, top functions by own time and by cumulative time: where the
    host spends the pass (time waiting on the GPU shows in the call that synchronises, e.g. `.cpu()`)."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    for order in ("tottime", "cumulative"):
        text.write(f"=== {title}: by {order} ===\n")
        stats.sort_stats(order).print_stats(45)
    path.write_text(text.getvalue())


def steady_throughput(root: Path, ranks: int) -> dict:
    """Steady-state images/s of one run directory written by `ranks` concurrent processes.

    A batch's images share one status `seconds` value and second; the `ranks` slowest batches (each
    process's first, which holds compilation) are left out. GPU-time estimate: ranks × images /
    summed batch seconds; wall-clock cross-check: images finished after the last first batch, over
    the time from it to the last image (status times have one-second resolution)."""
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    records = [json.loads(l) for l in (run / "status.jsonl").read_text().splitlines() if l.strip()]
    batches: dict = {}
    for r in records:
        if r["status"] == "ok":
            batches.setdefault((r["seconds"], r["time"]), []).append(r)
    ordered = sorted(batches.items(), key=lambda kv: kv[0][0] * len(kv[1]), reverse=True)
    first, steady = ordered[:ranks], ordered[ranks:]
    stamp = lambda t: time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%S"))  # noqa: E731
    warm_from = max(stamp(t) for (_, t), _ in first)
    late = [r for r in records if r["status"] == "ok" and stamp(r["time"]) > warm_from]
    span = max((stamp(r["time"]) for r in late), default=warm_from) - warm_from
    gpu_seconds = sum(sec * len(rs) for (sec, _), rs in steady)
    return {"images": sum(len(rs) for rs in batches.values()), "ranks": ranks,
            "images_per_second": round(ranks * sum(len(rs) for _, rs in steady) / gpu_seconds, 3) if gpu_seconds else None,
            "wall_images_per_second": round(len(late) / span, 3) if span else None,
            "first_batch_s": [round(sec * len(rs), 1) for (sec, _), rs in first]}


def perturb_images(run) -> None:
    """Make every image of a `reference` run distinct (shift, zoom, noise; seeded per task) so the
    per-pixel detection memo cannot make scoring look faster than it is on generated images."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    from caphuman_bench.images import save_png_atomic

    def perturb(index: int, task_id: str) -> None:
        path = run.image_path(task_id)
        rng = np.random.default_rng(index)
        image = Image.open(path).convert("RGB")
        w, h = image.size
        zoom = rng.uniform(0.92, 1.08)
        dx, dy = rng.uniform(-0.04, 0.04, 2) * (w, h)
        image = image.transform((w, h), Image.AFFINE, (1 / zoom, 0, dx, 0, 1 / zoom, dy), resample=Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 3, (h, w, 3))
        save_png_atomic(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), path)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(perturb, *zip(*enumerate(sorted(run.finished_ids())))))


def part_scaling(args) -> None:
    one, many = steady_throughput(Path(args.one), 1), steady_throughput(Path(args.many), args.gpus)
    data = {"part": "scaling", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "one": one, "many": many, "gpus": args.gpus,
            "efficiency": round(many["images_per_second"] / (args.gpus * one["images_per_second"]), 3),
            "wall_efficiency": round(many["wall_images_per_second"] / (args.gpus * one["wall_images_per_second"]), 3)
            if many["wall_images_per_second"] and one["wall_images_per_second"] else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data))


def part_throughput(args) -> None:
    """One process per GPU (torchrun): the fast pipeline's images/s on each, timed between barriers.

    Rank r generates its own batches on cuda:LOCAL_RANK; every rank starts timing together after
    its compilation, so the sum over ranks is what the node delivers at once. With one process it
    is the one-GPU reference of the scaling table."""
    import torch.distributed as dist

    from caphuman_bench.pipelines.acceleration import FAST, accelerate_pipeline

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device, dtype = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu"), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") and world > 1:  # one inductor cache per rank: no write races
        os.environ["TORCHINDUCTOR_CACHE_DIR"] += f"_{local}"
    if world > 1:
        dist.init_process_group("gloo")
    pipe, _ = build_pipelines(device, dtype, args.tiny)
    pipe = accelerate_pipeline(pipe, FAST if device.type == "cuda" else FAST.with_(compile="off"))
    inputs = pipeline_inputs(pipe, args.batch, args.size, device, dtype)
    started = time.perf_counter()
    run_caphuman(pipe, inputs, args.steps, pipe.levers)
    _sync(device)
    first = time.perf_counter() - started
    if world > 1:
        dist.barrier()
    started = time.perf_counter()
    for _ in range(args.batches):
        run_caphuman(pipe, inputs, args.steps, pipe.levers)
    _sync(device)
    seconds = time.perf_counter() - started
    mine = {"rank": rank, "device": str(device), "first_call_s": round(first, 1), "seconds": round(seconds, 3),
            "images": args.batches * args.batch, "images_per_second": round(args.batches * args.batch / seconds, 3)}
    rows = [mine]
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, mine)
        dist.destroy_process_group()
    if rank == 0:
        data = {"part": "throughput", **environment(device), "gpus": world, "batch": args.batch, "steps": args.steps,
                "levers": pipe.levers.as_dict(), "ranks": rows,
                "node_images_per_second": round(sum(r["images"] for r in rows) / max(r["seconds"] for r in rows), 3)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(json.dumps(data), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    gen = sub.add_parser("generation")
    gen.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    gen.add_argument("--fast-batch", type=int, nargs="+", default=[32])
    gen.add_argument("--large-batch", type=int, nargs="*", default=[], help="batch sizes of the large-batch rows")
    gen.add_argument("--dtype", default="bfloat16")
    gen.add_argument("--steps", type=int, help="default: 20 (caphuman), the card's (--method)")
    gen.add_argument("--size", type=int, help="default: 512 (caphuman), the card's (--method)")
    gen.add_argument("--method", help="a card: its family pipeline, stock diffusers vs ours (default: caphuman's lever table)")
    gen.add_argument("--levers", help="--method: changes to this device's default levers, e.g. compile=off,fuse_qkv=1")
    gen.add_argument("--repeats", type=int, default=2)
    gen.add_argument("--budget-s", type=float, default=480, help="no new row starts after this many seconds")
    gen.add_argument("--tiny", action="store_true", help="the tiny CapHuman (CPU dry run)")
    gen.add_argument("--tolerance-fp32", action="store_true")
    gen.add_argument("--kernel-profile", action="store_true", help="one more call of each CapHuman row under the CUDA profiler: time by kernel kind")
    gen.add_argument("--in-run", action="store_true", help="after the default fast path's row, the same pipeline with PIL output, then also with the PNG writer")
    gen.add_argument("--only", nargs="*", help="row groups (--method: stock ours): stock eager single compile tolerance compile-nchw cudagraphs tuning autotune benchmark freeze "
                                                    "freeze-benchmark large-batch sdpa-efficient sdpa-flash sdpa-auto epilogue aggressive no-prefix gemm-autotune")
    e2e = sub.add_parser("e2e")
    e2e.add_argument("--weights", type=Path)
    e2e.add_argument("--runs-dir", type=Path, required=True)
    e2e.add_argument("--launcher", default=sys.executable)
    sc = sub.add_parser("scoring")
    sc.add_argument("run", type=Path)
    sc.add_argument("--weights", type=Path)
    sc.add_argument("--metrics", nargs="*")
    sc.add_argument("--score-batch", type=int, default=64)
    sc.add_argument("--perturb", action="store_true", help="make the images distinct first (see perturb_images)")
    sc.add_argument("--protocol", help="scoring protocol (default: the run's default, fastcomposer)")
    sc.add_argument("--profile", nargs="*", metavar="FAMILY",
                    help="after the timed passes, profile one more all-families pass and one per FAMILY given (<out>.<label>.profile.txt)")
    sc.add_argument("--switch-interval", type=float, nargs="*", default=[],
                    help="extra all-families passes with the scoring stage's GIL switch interval set to each value (s)")
    sc.add_argument("--read-threads", type=int, nargs="*", default=[], help="extra all-families passes with this many reading threads")
    sc.add_argument("--together-only", action="store_true", help="only the all-families passes, not each family alone")
    sc.add_argument("--warm-repeats", type=int, default=1, help="timed all-families passes with the default settings")
    sc.add_argument("--invariance", action="store_true", help="instead of timings: the rows' differences between device and CPU, "
                                                              "batch 64 and 7, one process and several, strict float32 and default TF32")
    sc.add_argument("--invariance-procs", type=int, default=4, help="processes of the invariance's torchrun pass (1: none)")
    scale = sub.add_parser("scaling")
    scale.add_argument("--one", type=Path, required=True)
    scale.add_argument("--many", type=Path, required=True)
    scale.add_argument("--gpus", type=int, required=True)
    thr = sub.add_parser("throughput")
    thr.add_argument("--batch", type=int, default=32)
    thr.add_argument("--batches", type=int, default=4)
    thr.add_argument("--dtype", default="bfloat16")
    thr.add_argument("--steps", type=int, default=20)
    thr.add_argument("--size", type=int, default=512)
    thr.add_argument("--tiny", action="store_true")
    cache = sub.add_parser("compile-cache")
    cache.add_argument("--method", default="caphuman")
    cache.add_argument("--batch", type=int, default=8)
    cache.add_argument("--repeats", type=int, default=2)
    cache.add_argument("--dtype", default="bfloat16")
    cache.add_argument("--levers")
    cache.add_argument("--steps", type=int, help="default: the card's")
    cache.add_argument("--cache-dir", type=Path, help="default: a fresh temporary folder")
    cache.add_argument("--tiny", action="store_true")
    cache.add_argument("--with-stock", action="store_true", help="the cold process also times stock diffusers first (<out>.cold.json)")
    sub.add_parser("conformance-levers", help="the CapHuman conformance vectors in float32, bfloat16 and with float8 linear layers")
    for p in (gen, e2e, sc, scale, thr, cache, sub.choices["conformance-levers"]):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    argv = sys.argv[1:]
    run_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.part == "scoring" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return part_scoring_processes(args)
    if args.part == "scoring" and args.invariance:
        return part_scoring_invariance(args)
    {"generation": part_generation, "scoring": part_scoring, "scaling": part_scaling, "throughput": part_throughput,
     "compile-cache": part_compile_cache, "conformance-levers": part_conformance_levers}.get(args.part, lambda a: part_e2e(a, run_args))(args)


if __name__ == "__main__":
    main()
