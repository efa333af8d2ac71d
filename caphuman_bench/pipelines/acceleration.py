"""The fast path of `CapHumanPipeline` on CUDA: levers that change the kernels, never the model.

Each lever is measured on its own by `benchmarks/bench_run.py` (table in `reports/perf/README.md`):

* `channels_last`: UNet, CapFace and VAE convolutions in NHWC, the layout cuDNN's tensor-core kernels
  want (no transposes around every convolution).
* `fuse_qkv`: one projection GEMM for q, k, v of self-attention (k, v of cross-attention) with
  diffusers' `FusedAttnProcessor2_0`, for every `Attention` of the three networks (diffusers only
  offers it on the UNet).
* `sdpa`: the scaled-dot-product-attention backend order (`cudnn` first on Hopper, else flash).
* `compile`: `torch.compile` of UNet, CapFace and the VAE decoder (`default`, `max-autotune-no-cudagraphs`,
  `reduce-overhead` = CUDA graphs) with inductor's `conv_1x1_as_mm` and no epilogue fusion, as
  diffusers' speed guide for SD recommends (`epilogue_fusion` turns inductor's own default back on;
  measured, it buys nothing without GEMM templates; `aggressive_fusion` likewise turns on inductor's
  fusion of kernels with no shared input); `coordinate_descent` (its tuning of launch parameters)
  is a lever of its own because it lengthens compilation; `autotune_convolutions=False` keeps the
  max-autotune modes to GEMMs (Triton convolution templates are what made max-autotune compile for
  more than 8 minutes).
* `cudnn_benchmark`: cuDNN times its convolution algorithms on the first call of each shape instead of
  taking its heuristic's choice (`torch.backends.cudnn.benchmark`, a process-wide setting).
* `freeze`: inductor's freezing — weights become constants of the compiled graph, so it folds them
  and lays them out for its kernels once (inference only; `torch._inductor.config.freezing`).
* `share_guidance_prefix`: the UNet's modules before the text first enters run once for both halves
  of classifier-free guidance (`GuidancePrefix`): the same arithmetic on half the rows.

None of them changes the arithmetic beyond floating-point reordering: on CPU in float32 the
conformance vectors pass with every lever that runs there, and the bf16 difference from the eager
path is measured and reported (`bench_run.py --part tolerance`). Compilation costs a first call of
about a minute and a half per batch size (one batch size per run keeps it at one).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, replace

import torch

log = logging.getLogger(__name__)
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
SDPA_ORDERS = ("auto", "cudnn", "flash", "efficient", "math")
EAGER_ENV = "CAPHUMAN_BENCH_EAGER"  # =1: run CUDA eagerly (no lever), e.g. to compare or debug


@dataclass(frozen=True)
class Levers:
    channels_last: bool = False
    fuse_qkv: bool = False
    sdpa: str = "auto"
    compile: str = "off"
    compile_vae: bool = True
    coordinate_descent: bool = False  # inductor's coordinate-descent tuning of kernel launch parameters
    autotune_convolutions: bool = True  # max-autotune modes: also Triton convolution templates
    cudnn_benchmark: bool = False
    freeze: bool = False
    epilogue_fusion: bool = False  # inductor fuses pointwise epilogues into its GEMM templates
    aggressive_fusion: bool = False  # inductor also fuses kernels that share no input (fewer, larger kernels)
    share_guidance_prefix: bool = False  # see GuidancePrefix

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.compile!r} not one of {COMPILE_MODES}")
        if self.sdpa not in SDPA_ORDERS:
            raise ValueError(f"sdpa backend {self.sdpa!r} not one of {SDPA_ORDERS}")

    def with_(self, **changes) -> "Levers":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


EAGER = Levers()
FAST = Levers(channels_last=True, fuse_qkv=True, sdpa="cudnn", compile="default", share_guidance_prefix=True)


def default_levers(device: torch.device | str) -> Levers:
    """FAST on CUDA (unless $CAPHUMAN_BENCH_EAGER=1), EAGER elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get(EAGER_ENV, "") not in ("", "0"):
        return EAGER
    return FAST


def fuse_attention_projections(model: torch.nn.Module) -> int:
    """Fuse q/k/v (self-attention) and k/v (cross-attention) of every diffusers `Attention` in `model`."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and not module.fused_projections:
            module.fuse_projections(fuse=True)
            module.set_processor(FusedAttnProcessor2_0())
            count += 1
    return count


class GuidancePrefix:
    """Runs the UNet's text-free prefix once for both halves of classifier-free guidance.

    Guided, the UNet sees [negative; prompt] rows with the same latents, timestep and CapFace
    residuals: the text first enters at the cross-attention of the first transformer block. Before
    it, the first ResNet block and the first self-attention (over 64x64 tokens at 512², the costliest
    attention of SD-1.5) compute the same values for both halves. While `sharing()` is entered (the
    pipeline enters it for its guided UNet calls, whose halves it builds from the same latents), hooks
    run these two modules on the first half of the rows and give the result to both halves.
    Hooks rather than replaced modules: the state dict keeps its keys, and torch.compile traces them.
    """

    def __init__(self, unet: torch.nn.Module):
        config = unet.config
        first = unet.down_blocks[0]
        if config.class_embed_type is not None or config.addition_embed_type is not None:
            raise ValueError("GuidancePrefix: the UNet's time embedding also takes class or added conditions")
        modules = [first.resnets[0]]
        if getattr(first, "attentions", None):
            block = first.attentions[0].transformer_blocks[0]
            if block.only_cross_attention or block.norm_type != "layer_norm" or block.pos_embed is not None:
                raise ValueError("GuidancePrefix: the first transformer block's self-attention is not text-free")
            modules.append(block.attn1)
        self.active = False
        for module in modules:
            module.register_forward_pre_hook(self._first_half, with_kwargs=True)
            module.register_forward_hook(self._both_halves, with_kwargs=True)

    @contextlib.contextmanager
    def sharing(self):
        """Within: the UNet's rows are two identical halves up to the text (the caller guarantees it)."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _first_half(self, module, args, kwargs):
        if not self.active:
            return None
        rows = args[0].shape[0]

        def half(value):
            return value[: rows // 2] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows else value

        return tuple(half(a) for a in args), {k: half(v) for k, v in kwargs.items()}

    def _both_halves(self, module, args, kwargs, output):
        return torch.cat([output, output]) if self.active else None


def _inductor_knobs(levers: Levers) -> None:
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.epilogue_fusion = levers.epilogue_fusion
    inductor.aggressive_fusion = levers.aggressive_fusion
    inductor.coordinate_descent_tuning = levers.coordinate_descent
    inductor.coordinate_descent_check_all_directions = levers.coordinate_descent
    inductor.max_autotune_conv_backends = "ATEN,TRITON" if levers.autotune_convolutions else "ATEN"
    inductor.freezing = levers.freeze


def accelerate_pipeline(pipe, levers: Levers):
    """Apply `levers` in place to the pipeline's UNet, CapFace and VAE; returns the pipeline."""
    networks = [pipe.unet, pipe.capface] + ([pipe.vae] if getattr(pipe, "vae", None) is not None else [])
    if levers.fuse_qkv:
        fused = sum(fuse_attention_projections(net) for net in networks)
        log.info("fused the projections of %d attention modules", fused)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = levers.cudnn_benchmark
    if levers.share_guidance_prefix:
        pipe.guidance_prefix = GuidancePrefix(pipe.unet)
    if levers.channels_last:
        for net in networks:
            net.to(memory_format=torch.channels_last)
    if levers.compile != "off":
        _inductor_knobs(levers)
        mode = None if levers.compile == "default" else levers.compile
        # UNet and CapFace share forward wrappers (nn.Module._call_impl, diffusers' decorators), so
        # their graphs sit in one dynamo cache: static shapes and room for both, or each batch-size
        # difference between them would recompile everything with dynamic shapes
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        pipe.unet.compile(mode=mode, dynamic=False)
        pipe.capface.compile(mode=mode, dynamic=False)
        if levers.compile_vae and getattr(pipe, "vae", None) is not None:
            pipe.vae.decoder.compile(mode=mode, dynamic=False)
    pipe.levers = levers
    return pipe


def attention_backend(levers: Levers):
    """Context selecting the SDPA backends in the lever's order of priority (a no-op for `auto`)."""
    if levers.sdpa == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "math": [SDPBackend.MATH],
    }[levers.sdpa]
    return sdpa_kernel(order, set_priority=True)
