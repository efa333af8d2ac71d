"""One open_clip model per scoring pass, shared by `clip_score` and `prompt_accuracy`.

Weights come from the weights resolver as a local file (`open_clip.create_model_and_transforms(name,
pretrained=<path>)`); the tokenizer is open_clip's own, whose BPE vocabulary ships in the wheel, so
nothing is downloaded. Because a file path carries no "openai" tag, the OpenAI specifics the tag
would set are given explicitly: QuickGELU activations and OpenAI's preprocessing (bicubic resize of
the shorter side to the input size, centre crop, OpenAI mean / std).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from caphuman_bench import weights
from caphuman_bench.errors import BenchError
from caphuman_bench.faces.memo import BoundedMemo, image_digest
from caphuman_bench.images import to_rgb
from caphuman_bench.metrics.base import ScoreContext
from caphuman_bench.parallel import thread_map

DEFAULT_CLIP_MODEL = "ViT-L-14"
CLIP_CHECKPOINTS = {"ViT-L-14": "clip_vit_l14_openai", "ViT-B-32": "clip_vit_b32_openai"}
ENCODE_BATCH = 32  # images (texts) per encoder call; on a GPU every call has exactly this many (`_fixed_batches`)
# FastComposer's CLIP precision: OpenAI's `clip.load(name, device)` converts the model to fp16 on a CUDA
# device; its evaluation keeps it (mit-han-lab/fastcomposer evaluation/clip_eval.py, commit 34c3b59).
FASTCOMPOSER_FP16 = ("protocol fastcomposer: fp16 on CUDA, as OpenAI clip.load gives there "
                     "(mit-han-lab/fastcomposer evaluation/clip_eval.py @34c3b59)")

CLIP_CONVENTION = {
    "model": "open_clip, option clip_model (default ViT-L-14, or ViT-B-32) with OpenAI weights, QuickGELU, "
    "or any open_clip architecture name with option clip_checkpoint=<file>",
    "preprocessing": "protocol fastcomposer: FastComposer's float-tensor path (torchvision bicubic resize without "
                     "antialias, centre crop, OpenAI mean/std), fp16 on CUDA; protocol caphuman-bench: PIL bicubic resize "
                     "of the shorter side, centre crop, OpenAI mean/std (open_clip's 'openai' tag), fp32",
    "text": "the prompt's subject placeholder filled by the identity's class phrase ('a man', protocol fastcomposer) "
            "or by 'a person' (protocol caphuman-bench); open_clip tokenizer, 77 tokens",
    "batches": f"on a GPU every encoder call has {ENCODE_BATCH} images (texts), the last call padded with repeats, so "
               "the kernels and their reductions do not change with the scoring batch; on the CPU calls are not padded",
}


@dataclass
class ClipModel:
    """A loaded open_clip model with its preprocessing, tokenizer and per-pass embedding memos."""

    name: str
    checkpoint: Path
    device: str
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    _images: BoundedMemo = field(default_factory=lambda: BoundedMemo(1024))
    _texts: BoundedMemo = field(default_factory=lambda: BoundedMemo(4096))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype images enter in: that of the vision tower's first convolution. Not the first
        parameter's: `convert_weights_to_lp` (fp16) leaves embeddings and `logit_scale` in float32."""
        return next(m.weight.dtype for m in self.model.visual.modules() if isinstance(m, torch.nn.Conv2d))

    def image_embeddings(self, images: list[Image.Image], preprocessing: str = "pil") -> torch.Tensor:
        """L2-normalised image embeddings (n, d), float32 on the CPU; `preprocessing` "pil" (open_clip's
        transform) or "tensor" (FastComposer's, `fastcomposer_pixels`)."""
        keys = [(preprocessing, digest) for digest in thread_map(image_digest, images)]
        todo = [i for i, key in enumerate(keys) if key not in self._images]
        for start in range(0, len(todo), ENCODE_BATCH):
            positions = todo[start : start + ENCODE_BATCH]
            batch = [images[i] for i in positions]
            if preprocessing == "tensor":  # float arithmetic on the model's device, as FastComposer's runs
                pixels = fastcomposer_pixels(batch, device=self.device)
            else:  # PIL resizes on the host pool
                pixels = torch.stack(thread_map(self.preprocess, batch))
            pixels = self._fixed_batch(pixels.to(self.device, self.dtype))
            with torch.inference_mode():
                vectors = F.normalize(self.model.encode_image(pixels)[: len(positions)].float(), dim=-1).cpu()
            for i, vector in zip(positions, vectors):
                self._images.put(keys[i], vector)
        return _stack([self._images.get(key) for key in keys])

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings (n, d), float32 on the CPU."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._texts))
        for start in range(0, len(todo), ENCODE_BATCH):
            chunk = todo[start : start + ENCODE_BATCH]
            tokens = self._fixed_batch(self.tokenizer(chunk).to(self.device))
            with torch.inference_mode():
                vectors = F.normalize(self.model.encode_text(tokens)[: len(chunk)].float(), dim=-1).cpu()
            for text, vector in zip(chunk, vectors):
                self._texts.put(text, vector)
        return _stack([self._texts.get(text) for text in texts])

    def _fixed_batch(self, inputs: torch.Tensor) -> torch.Tensor:
        """On a GPU, `inputs` padded to ENCODE_BATCH rows by repeating the last one: cuBLAS picks its
        kernels (tiles, split-K reductions) by the matrix sizes, so an image encoded among 7 others and
        among 63 went through different reductions (CLIP score moved by up to 1.2e-4 in fp16, batch 64
        against 7, issue 25). Each call now has one shape; the padded rows are dropped. On the CPU the
        float32 kernels are batch-invariant already (tests/test_scoring_invariance.py) and padding
        would only cost time."""
        if torch.device(self.device).type == "cpu" or len(inputs) == ENCODE_BATCH:
            return inputs
        return torch.cat([inputs, inputs[-1:].expand(ENCODE_BATCH - len(inputs), *inputs.shape[1:])])


def fastcomposer_pixels(images: list[Image.Image], size: int = 224, device: str | torch.device = "cpu") -> torch.Tensor:
    """FastComposer's CLIP input (evaluation/clip_eval.py `CLIPEvaluator.preprocess` on
    `ToTensor()(image) * 2 - 1`), (n, 3, size, size): un-normalised back to [0, 1], then OpenAI CLIP's
    transforms minus the PIL steps — torchvision `Resize(224, bicubic)` of the shorter side on the float
    tensor (torchvision 0.14, FastComposer's cog.yaml, does not antialias tensors; values may overshoot
    [0, 1], nothing clamps them), `CenterCrop(224)`, `Normalize` with OpenAI's mean / std.

    Images of one size go through together, and only their bytes move to `device` (`to_tensor` is exactly
    `pil_to_tensor(·).float() / 255`): on a GPU one copy and a few kernels per batch, not per image."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    arrays = thread_map(lambda image: np.asarray(to_rgb(image)), images)
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, array in enumerate(arrays):
        by_size.setdefault(array.shape, []).append(i)
    for positions in by_size.values():
        pixels = torch.as_tensor(np.stack([arrays[i] for i in positions])).to(device).permute(0, 3, 1, 2)
        pixels = pixels.float().div(255) * 2.0 - 1.0
        pixels = (pixels + 1.0) / 2.0
        pixels = TF.resize(pixels, size, interpolation=InterpolationMode.BICUBIC, antialias=False)
        pixels = TF.normalize(TF.center_crop(pixels, size), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        for i, one in zip(positions, pixels):
            out[i] = one
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


def _stack(vectors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(vectors) if vectors else torch.zeros(0, 0)


_MODELS: dict[tuple[str, str, str, str], ClipModel] = {}


def clip_weights(options: dict) -> tuple[str, ...]:
    """The manifest id of the CLIP checkpoint that options `clip_model` / `clip_checkpoint` ask for."""
    if options.get("clip_checkpoint"):
        return ()
    name = options.get("clip_model") or DEFAULT_CLIP_MODEL
    return (CLIP_CHECKPOINTS[name],) if name in CLIP_CHECKPOINTS else ()


def clip_precision(context: ScoreContext, fp16_on_cuda: bool) -> str:
    """"fp16" on a CUDA device when the protocol prescribes it (`FASTCOMPOSER_FP16`), else "fp32"."""
    return "fp16" if fp16_on_cuda and str(context.device).startswith("cuda") else "fp32"


def clip_numerics(context: ScoreContext, fp16_on_cuda: bool) -> dict:
    """scoring.json's numerics of a CLIP family: the dtype, and the protocol that prescribes fp16."""
    if clip_precision(context, fp16_on_cuda) == "fp16":
        return {"device": context.device, "dtype": "float16", "dtype_from": FASTCOMPOSER_FP16}
    return {"device": context.device, "dtype": "float32"}


def clip_for(context: ScoreContext, fp16_on_cuda: bool = False) -> ClipModel:
    """The CLIP model a scoring context asks for (options `clip_model`, `clip_checkpoint`); with
    `fp16_on_cuda`, half precision on a CUDA device as OpenAI's `clip.load` gives there."""
    name = context.options.get("clip_model") or DEFAULT_CLIP_MODEL
    explicit = context.options.get("clip_checkpoint")
    if explicit:
        checkpoint = Path(explicit).expanduser()
        if not checkpoint.is_file():
            raise BenchError(f"scoring option 'clip_checkpoint': file {checkpoint} does not exist")
    elif name in CLIP_CHECKPOINTS:
        weights_id = CLIP_CHECKPOINTS[name]
        checkpoint = context.weights.get(weights_id) or weights.resolve(
            weights_id, (context.options.get("weights_paths") or {}).get(weights_id))
    else:
        raise BenchError(f"scoring option 'clip_model': {name!r} has no known weights "
                         f"(known: {', '.join(CLIP_CHECKPOINTS)}); give option 'clip_checkpoint' with its file")
    return load_clip(name, checkpoint, context.device, precision=clip_precision(context, fp16_on_cuda))


def load_clip(name: str, checkpoint: str | Path, device: str = "cpu", precision: str = "fp32") -> ClipModel:
    """Build open_clip architecture `name` with the weights at `checkpoint` (cached per process).
    precision "fp16": open_clip's `convert_weights_to_lp`, the conversion OpenAI's `clip.load` applies on a GPU."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    checkpoint = Path(checkpoint)
    key = (name, str(checkpoint.resolve()), str(device), precision)
    if key not in _MODELS:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=str(checkpoint), device=device, force_quick_gelu=True, precision=precision,
                image_mean=OPENAI_DATASET_MEAN, image_std=OPENAI_DATASET_STD,
                image_interpolation="bicubic", image_resize_mode="shortest",
            )
        except RuntimeError as exc:
            raise BenchError(f"{checkpoint}: cannot load as open_clip {name!r} ({str(exc).splitlines()[0]})") from None
        model.eval()
        _MODELS[key] = ClipModel(name, checkpoint, str(device), model, preprocess, open_clip.get_tokenizer(name))
    return _MODELS[key]
