"""The fast path of `CapHumanPipeline` on CUDA: levers that change the kernels, never the model.

Each lever is measured on its own by `benchmarks/bench_run.py` (table in `reports/perf/README.md`):

* `channels_last`: UNet, CapFace and VAE convolutions in NHWC, the layout cuDNN's tensor-core kernels
  want (no transposes around every convolution).
* `fuse_qkv`: one projection GEMM for q, k, v of self-attention (k, v of cross-attention) with
  diffusers' `FusedAttnProcessor2_0`, for every `Attention` of the three networks (diffusers only
  offers it on the UNet).
* `sdpa`: the scaled-dot-product-attention backend order (`cudnn` first on Hopper, else flash).
  `fa4` puts flash first and has PyTorch run its flash backend with FlashAttention-4's kernels
  (`torch.nn.attention.activate_flash_attention_impl("FA4")`, which needs the `flash-attn-4` package
  and an SM90/SM100 GPU; `pip install caphuman-bench[fa4]`): the same exact attention with another
  kernel, timed against cuDNN's on CapHuman's shapes by `benchmarks/bench_attention.py`. FA4 stays
  active only while `attention_backend` is entered, so scoring in the same process keeps PyTorch's.
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
* `fp8` (opt-in, off in every default): the linear layers of the denoising networks (UNet, CapFace,
  ControlNets; attention projections, feed-forwards, the 1x1 `proj_in/out` stay convolutions) run as
  float8 e4m3 GEMMs with per-row scales for activations (computed each call) and weights, through
  torchao's `Float8DynamicActivationFloat8WeightConfig` (`pip install caphuman-bench[fp8]`; SM89 or
  newer). It changes the numbers beyond bf16 noise: the conformance vectors do not pass with it (their
  tolerances are float32's), and `bench_run.py generation` reports its difference from eager bf16.
  torchao's float8 convolution needs Meta's `mslk` kernels, so the 3x3 convolutions stay bf16.

`accelerate_diffusers_pipeline` applies the same levers to any stock diffusers SD-1.5 / SDXL pipeline
(UNet, ControlNet(s), VAE decoder; text encoders compiled only with `compile_text_encoders`); adapters
call `MethodAdapter.accelerate(pipe)` once at the end of `load`, which resolves the levers from the
device and $CAPHUMAN_BENCH_LEVERS (`resolve_levers`); the generate stage records them in run.json. Compiled graphs
go to a persistent cache folder (`compile_cache_dir`), so a second process of the same configuration
skips inductor's code generation.

None of them changes the arithmetic beyond floating-point reordering: on CPU in float32 the
conformance vectors pass with every lever that runs there, and the bf16 difference from the eager
path is measured and reported (`bench_run.py --part tolerance`). Compilation costs a first call of
about a minute and a half per batch size (one batch size per run keeps it at one).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from caphuman_bench.errors import BenchError

log = logging.getLogger(__name__)
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
SDPA_ORDERS = ("auto", "cudnn", "flash", "fa4", "efficient", "math")
EAGER_ENV = "CAPHUMAN_BENCH_EAGER"  # =1: run CUDA eagerly (no lever), e.g. to compare or debug
LEVERS_ENV = "CAPHUMAN_BENCH_LEVERS"  # "compile=off,fuse_qkv=0": changes to the device's default levers
COMPILE_CACHE_ENV = "CAPHUMAN_BENCH_COMPILE_CACHE"  # the persistent compile cache folder (see compile_cache_dir)
NUMERIC_LEVERS = ("fp8",)  # levers that change the numbers beyond bf16 noise: one setting per run (RunDir.record_levers)


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
    share_guidance_prefix: bool = False  # see GuidancePrefix (CapHumanPipeline only)
    fp8: bool = False  # float8 linear layers (torchao): changes the numbers, so never on by default
    compile_text_encoders: bool = False  # they run once per batch, not per step: compiling costs more than it saves

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


# Stock diffusers pipelines: the same levers but the shared guidance prefix, which needs the pipeline's
# cooperation (CapHumanPipeline enters it only where both guidance halves share their latents).
DIFFUSERS_FAST = FAST.with_(share_guidance_prefix=False)


def default_levers(device: torch.device | str, fast: Levers = FAST) -> Levers:
    """`fast` on CUDA (unless $CAPHUMAN_BENCH_EAGER=1), EAGER elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get(EAGER_ENV, "") not in ("", "0"):
        return EAGER
    return fast


_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def parse_lever_changes(text: str) -> dict:
    """'compile=off,fuse_qkv=0' -> {"compile": "off", "fuse_qkv": False}; ValueError naming the bad item."""
    kinds = {f.name: f.type for f in fields(Levers)}
    changes: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        if name not in kinds:
            raise ValueError(f"lever {name!r} is not one of {', '.join(kinds)}")
        if kinds[name] in (bool, "bool"):
            if value not in _TRUE + _FALSE:
                raise ValueError(f"lever {name!r} takes true or false, got {value!r}")
            changes[name] = value in _TRUE
        else:
            changes[name] = value
    Levers(**changes)  # choices checked by the dataclass
    return changes


def resolve_levers(device: torch.device | str, changes: str = "", *, fast: Levers = FAST, tiny: bool = False) -> Levers:
    """The levers a run uses: `fast` on CUDA (EAGER on other devices, for tiny models, and with
    $CAPHUMAN_BENCH_EAGER=1), then `changes` (a caller's, e.g. the benchmark's), then $CAPHUMAN_BENCH_LEVERS."""
    if os.environ.get(EAGER_ENV, "") not in ("", "0"):
        return EAGER
    levers = EAGER if tiny else default_levers(device, fast)
    for text in (changes, os.environ.get(LEVERS_ENV, "")):
        levers = levers.with_(**parse_lever_changes(text))
    return levers


def compile_cache_dir() -> Path:
    """$CAPHUMAN_BENCH_COMPILE_CACHE, else $XDG_CACHE_HOME/caphuman-bench/compile (~/.cache/... by default)."""
    if os.environ.get(COMPILE_CACHE_ENV):
        return Path(os.environ[COMPILE_CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "caphuman-bench" / "compile"


def use_compile_cache() -> Path:
    """Point inductor's caches (FX graphs, AOT autograd, autotuning, Triton kernels) at a persistent folder.

    By default inductor keeps them in /tmp/torchinductor_<user>, lost with the machine; here they live
    in the user's cache folder, so a second process of the same configuration loads its compiled graphs
    instead of generating them. A TORCHINDUCTOR_CACHE_DIR set by the caller wins."""
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor

    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir())))
    folder.mkdir(parents=True, exist_ok=True)
    inductor.fx_graph_cache = True
    inductor.autotune_local_cache = True
    functorch.enable_autograd_cache = True
    return folder


def fuse_attention_projections(model: torch.nn.Module) -> int:
    """Fuse q/k/v (self-attention) and k/v (cross-attention) of every diffusers `Attention` in `model`
    that runs diffusers' plain processor on plain linear layers. Others keep theirs: an IP-Adapter's
    processor reads the separate projections, and a LoRA-wrapped projection's fused copy would lose its
    low-rank update. The image projection of IP-Adapters (`encoder_hid_proj`, run once per call) is left
    out: its resampler calls self-attention modules with a context, which a fused q/k/v cannot take."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or module.fused_projections or "encoder_hid_proj" in name.split("."):
            continue
        plain_linear = all(type(getattr(module, name, None)) is torch.nn.Linear for name in ("to_q", "to_k", "to_v"))
        if plain_linear and type(module.processor) in (AttnProcessor, AttnProcessor2_0):
            module.fuse_projections(fuse=True)
            module.set_processor(FusedAttnProcessor2_0())
            count += 1
    return count


def float8_linears(networks: list[torch.nn.Module]) -> int:
    """The `fp8` lever: every linear layer of `networks` whose sizes the float8 GEMM takes (multiples
    of 16) becomes float8 e4m3 with per-row scales (torchao); returns how many. BenchError when torchao
    or a float8 GPU (compute capability 8.9 or newer) is missing."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError:
        raise BenchError("fp8=1: torchao is not installed (pip install 'caphuman-bench[fp8]')") from None
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise BenchError("fp8=1: float8 GEMMs need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper)")

    def takes_float8(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    count = 0
    for net in networks:
        count += sum(takes_float8(m, n) for n, m in net.named_modules())
        quantize_(net, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=takes_float8)
    log.info("float8 linear layers: %d", count)
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

    use_compile_cache()

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
    if levers.sdpa == "fa4":
        check_flash_attention_4(pipe.unet.device)
    if levers.fuse_qkv:
        fused = sum(fuse_attention_projections(net) for net in networks)
        log.info("fused the projections of %d attention modules", fused)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = levers.cudnn_benchmark
    if levers.share_guidance_prefix:
        pipe.guidance_prefix = GuidancePrefix(pipe.unet)
    if levers.fp8:
        float8_linears([pipe.unet, pipe.capface])
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


def diffusers_networks(pipe) -> dict[str, torch.nn.Module]:
    """The denoising networks of a stock diffusers pipeline by role: UNet, each ControlNet, VAE."""
    networks = {"unet": pipe.unet}
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None:  # a MultiControlNetModel holds its nets
        for i, net in enumerate(getattr(controlnet, "nets", [controlnet])):
            networks[f"controlnet.{i}"] = net
    if getattr(pipe, "vae", None) is not None:
        networks["vae"] = pipe.vae
    return networks


def accelerate_diffusers_pipeline(pipe, levers: Levers):
    """Apply `levers` in place to a stock diffusers SD-1.5 / SDXL pipeline (with or without ControlNet,
    IP-Adapter, LoRA); returns it. The SDPA order is set process-wide (as `cudnn_benchmark` is), since
    the adapters call their pipelines in many places; `share_guidance_prefix` has no effect here."""
    networks = diffusers_networks(pipe)
    if levers.fuse_qkv:
        fused = sum(fuse_attention_projections(net) for net in networks.values())
        log.info("fused the projections of %d attention modules", fused)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = levers.cudnn_benchmark
        set_attention_order(levers)
    if levers.fp8:
        float8_linears([net for name, net in networks.items() if name != "vae"])
    if levers.channels_last:
        for net in networks.values():
            net.to(memory_format=torch.channels_last)
    if levers.compile != "off":
        _inductor_knobs(levers)
        mode = None if levers.compile == "default" else levers.compile
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # see accelerate_pipeline
        for name, net in networks.items():
            if name != "vae":
                net.compile(mode=mode, dynamic=False)
            elif levers.compile_vae:
                net.decoder.compile(mode=mode, dynamic=False)
        if levers.compile_text_encoders:
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).compile(mode=mode, dynamic=False)
    pipe.levers = levers
    return pipe


def _sdpa_order(levers: Levers) -> list:
    from torch.nn.attention import SDPBackend

    flash_first = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, *flash_first],
        "flash": flash_first,
        # shapes the flash backend refuses (the VAE's head dim 512) go to cuDNN, as in the default order
        "fa4": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "math": [SDPBackend.MATH],
    }[levers.sdpa]


class FlashAttention4Unavailable(BenchError):
    """The `fa4` lever on a stack without FlashAttention-4 (package, PyTorch hook or GPU): one line, exit 2."""


def check_flash_attention_4(device: torch.device | str | None = None) -> None:
    """Raise FlashAttention4Unavailable with one line saying what is missing for the `fa4` lever."""
    import importlib.util

    from torch.nn import attention

    if "FA4" not in getattr(attention, "list_flash_attention_impls", lambda: [])():
        raise FlashAttention4Unavailable(f"sdpa=fa4: PyTorch {torch.__version__} has no FA4 hook for its flash backend (2.11 or newer)")
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        raise FlashAttention4Unavailable("sdpa=fa4: the flash-attn-4 package is not installed (pip install 'caphuman-bench[fa4]')")
    on_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if not on_cuda or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        raise FlashAttention4Unavailable("sdpa=fa4: FlashAttention-4 runs on SM90 or SM100 GPUs (H100, H200, B200) only")


@contextlib.contextmanager
def _flash_attention_4():
    """PyTorch's flash backend runs FlashAttention-4 within; the previous implementation after."""
    from torch.nn import attention

    check_flash_attention_4()
    previous = attention.current_flash_attention_impl()
    attention.activate_flash_attention_impl("FA4")
    try:
        yield
    finally:
        if previous is None:
            attention.restore_flash_attention_impl()
        else:
            attention.activate_flash_attention_impl(previous)


_PROCESS_ATTENTION_ORDER = contextlib.ExitStack()


def set_attention_order(levers: Levers) -> None:
    """The SDPA backends in the lever's order of priority for the rest of the process (`auto`: untouched).
    torch offers the order only as a context manager (`sdpa_kernel`), so one is entered and kept open."""
    if levers.sdpa != "auto":
        _PROCESS_ATTENTION_ORDER.close()
        _PROCESS_ATTENTION_ORDER.enter_context(attention_backend(levers))


def attention_backend(levers: Levers):
    """Context selecting the SDPA backends in the lever's order of priority (a no-op for `auto`)."""
    if levers.sdpa == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    order = sdpa_kernel(_sdpa_order(levers), set_priority=True)
    if levers.sdpa != "fa4":
        return order
    stack = contextlib.ExitStack()
    stack.enter_context(_flash_attention_4())
    stack.enter_context(order)
    return stack
