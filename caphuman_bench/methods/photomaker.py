"""The `photomaker` method: SDXL + PhotoMaker (TencentARC, CVPR 2024), v1 or v2 (`version`).

Identity: the reference photo(s) as PhotoMaker's ID images (several in a `references` split) (CLIP ViT-L/14 through the ID encoder,
fused into the class word); v2 also takes its ArcFace embedding (`reference_faces`: MTCNN + the
project's onnxruntime ArcFace on buffalo_l's `w600k_r50.onnx`, the model insightface's `FaceAnalysis`
loads by default, which is what the authors' `FaceAnalysis2(...)` in inference_pmv2.py / app_v2.py
uses). Head: none; PhotoMaker ignores the head condition and is scored on head control all the same.

Prompt: the benchmark prompt with the trigger word inserted after the class word ("a photo of a
woman img wearing a red hat"), as the authors' README requires ("the trigger word `img` must follow
the class word"): the class word ends the identity's subject phrase ("a man", "a woman", "a person").

Pipeline: `PhotoMakerStableDiffusionXLPipeline` (`caphuman_bench/pipelines/pipeline_photomaker.py`),
weights: SDXL base 1.0 (the base model of the paper and of the authors' infer scripts before v2's
RealVisXL demo; any SDXL folder can be given with `--weights stable_diffusion_xl_base=DIR`) and
`photomaker-v1.bin` / `photomaker-v2.bin` (torch pickle of tensors, read with weights_only=True).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import GenerationRequest, MethodAdapter, check_latent_size, consecutive_batches, with_trigger_word
from caphuman_bench.methods.reference_faces import ReferenceFaces, require_onnxruntime
from caphuman_bench.registry import register_method

SDXL_FOLDER = "stable_diffusion_xl_base"
SDXL_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "text_encoder_2/config.json", "tokenizer", "tokenizer_2",
              "scheduler/scheduler_config.json")
CHECKPOINTS = {"v1": "photomaker_v1", "v2": "photomaker_v2"}
ARCFACE_WEIGHTS = "arcface_buffalo_l"


def sdxl_folder(path: Path) -> Path:
    """A folder entry resolves to the folder or to a file inside it (HF cache): the folder, checked complete."""
    folder = path if path.is_dir() else path.parent
    missing = [f for f in SDXL_FILES if not (folder / f).exists()]
    if missing:
        raise BenchError(f"{folder}: weights {SDXL_FOLDER!r} incomplete, missing {', '.join(missing)}")
    return folder


def start_merge_step(style_strength_ratio: float, num_inference_steps: int) -> int:
    """gradio_demo/app.py and app_v2.py: int(style_strength_ratio / 100 · steps), at most 30."""
    return min(int(float(style_strength_ratio) / 100 * num_inference_steps), 30)


def build_tiny_photomaker_pipeline(version: str, trigger_word: str = "img", seed: int = 0):
    """SDXL's layout at toy size with a tiny random PhotoMaker ID encoder (64-d fusion, 32 px CLIP tower)
    and a random LoRA in the checkpoint's format, loaded and fused as the real one is."""
    from caphuman_bench.models.photomaker import PhotoMakerIDEncoder
    from caphuman_bench.pipelines.pipeline_photomaker import PhotoMakerStableDiffusionXLPipeline, id_image_processor
    from caphuman_bench.pipelines.tiny import redraw_like_reference
    from caphuman_bench.pipelines.tiny_sdxl import TINY_CROSS_ATTENTION_DIM, tiny_sdxl_components

    components = tiny_sdxl_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        id_encoder = PhotoMakerIDEncoder(version, vision_config={
            "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, embed_dim=TINY_CROSS_ATTENTION_DIM,
            perceiver_dim_head=32)
    generator = torch.Generator().manual_seed(seed + 1)
    redraw_like_reference(id_encoder, generator)
    pipe = PhotoMakerStableDiffusionXLPipeline(
        **components, id_encoder=id_encoder.eval(), feature_extractor=id_image_processor(32),
        trigger_word=trigger_word)
    pipe.load_photomaker_lora(tiny_photomaker_lora(pipe.unet, generator))
    return pipe


def tiny_photomaker_lora(unet, generator: torch.Generator, rank: int = 4) -> dict[str, torch.Tensor]:
    """Random LoRA weights in the official checkpoint's key format (diffusers' attention-processor LoRA:
    `unet.<block>.attnN.processor.to_q_lora.down.weight`, to_q / to_k / to_v / to_out of every attention)."""
    lora: dict[str, torch.Tensor] = {}
    for name in unet.attn_processors:
        attention = unet.get_submodule(name.removesuffix(".processor"))
        for proj, linear in (("to_q", attention.to_q), ("to_k", attention.to_k), ("to_v", attention.to_v),
                             ("to_out", attention.to_out[0])):
            lora[f"unet.{name}.{proj}_lora.down.weight"] = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features ** 0.5
            lora[f"unet.{name}.{proj}_lora.up.weight"] = torch.randn(linear.out_features, rank, generator=generator) / rank
    return lora


@register_method("photomaker")
class PhotoMakerMethod(MethodAdapter):
    param_types = {
        **MethodAdapter.param_types,
        "version": str,
        "num_inference_steps": int,
        "guidance_scale": float,
        "style_strength_ratio": float,
        "negative_prompt": str,
        "trigger_word": str,
        "dtype": str,
        "tiny": bool,
    }

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        super().check_params(params, where)
        if str(params.get("version", "v1")) not in CHECKPOINTS:
            raise BenchError(f"{where}: parameter 'version' must be one of {', '.join(CHECKPOINTS)}, got {params['version']!r}")
        check_latent_size(params, where, latents="SDXL", default=1024)
        if not 0 <= float(params.get("style_strength_ratio", 20)) <= 100:
            raise BenchError(f"{where}: parameter 'style_strength_ratio' is a percentage, got {params['style_strength_ratio']}")
        if not re.fullmatch(r"\w+", str(params.get("trigger_word", "img"))):
            raise BenchError(f"{where}: parameter 'trigger_word' must be one word, got {params['trigger_word']!r}")

    @classmethod
    def required_weights(cls, card, params: dict[str, Any]) -> list[str]:
        if params.get("tiny"):
            return []
        version = str(params.get("version", "v1"))
        if version == "v2":
            require_onnxruntime(card.name)
            return [SDXL_FOLDER, CHECKPOINTS[version], ARCFACE_WEIGHTS]
        return [SDXL_FOLDER, CHECKPOINTS[version]]

    @property
    def version(self) -> str:
        return str(self.params.get("version", "v1"))

    def load(self) -> None:
        self.device = torch.device(self.context.device)
        self.dtype = self.compute_dtype(self.device)
        if self.params.get("tiny"):
            self.pipe = build_tiny_photomaker_pipeline(self.version, str(self.params.get("trigger_word", "img")))
            if self.dtype != torch.float32:
                self.pipe.to(dtype=self.dtype)
            arcface_path = None
        else:
            self.pipe = self._load_full()
            arcface_path = self.context.weights.get(ARCFACE_WEIGHTS)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe = self.accelerate(self.pipe)  # the CUDA fast path (pipelines/acceleration.py)
        if self.version == "v2":
            from caphuman_bench.faces.arcface import load_arcface

            self.faces = ReferenceFaces("photomaker", load_arcface(arcface_path, str(self.device)) if arcface_path else None)
        else:
            self.faces = None

    def _load_full(self):
        from diffusers import EulerDiscreteScheduler

        from caphuman_bench.models.photomaker import load_photomaker_id_encoder
        from caphuman_bench.pipelines.pipeline_photomaker import PhotoMakerStableDiffusionXLPipeline, id_image_processor
        from caphuman_bench.weights import load_torch_file

        paths = self.context.weights
        checkpoint_path = Path(paths[CHECKPOINTS[self.version]])
        checkpoint = load_torch_file(checkpoint_path, f"the PhotoMaker {self.version} checkpoint")
        if not isinstance(checkpoint, dict) or sorted(checkpoint) != ["id_encoder", "lora_weights"]:
            raise BenchError(f"{checkpoint_path}: not a PhotoMaker checkpoint (expected keys id_encoder and lora_weights)")
        folder = sdxl_folder(Path(paths[SDXL_FOLDER]))
        # The fused tokens live in the UNet's cross-attention space (SDXL: 2048).
        embed_dim = int(json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"])
        id_encoder = load_photomaker_id_encoder(checkpoint["id_encoder"], self.version, str(checkpoint_path),
                                                embed_dim=embed_dim).to(self.dtype)
        # The authors' ID images go through CLIPImageProcessor() (224 px = the tower's size, CLIP mean / std).
        side = id_encoder.config.image_size
        pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(
            folder, id_encoder=id_encoder, feature_extractor=id_image_processor(side),
            trigger_word=str(self.params.get("trigger_word", "img")), torch_dtype=self.dtype, local_files_only=True)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the README's scheduler
        pipe.load_photomaker_lora(checkpoint["lora_weights"])
        return pipe

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        """Batches of consecutive requests of one identity: one ID image per call, shared by its prompts."""
        batch_size = int(self.params.get("batch_size", 1))
        return [image for batch in consecutive_batches(requests, batch_size) for image in self._generate_batch(batch)]

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        sizes = {(r.height, r.width) for r in requests}
        if len(sizes) != 1:
            raise BenchError(f"photomaker: a batch needs one image size, got {sorted(sizes)}")
        height, width = sizes.pop()
        first = requests[0]
        steps = int(self.params.get("num_inference_steps", 50))
        trigger = self.pipe.config.trigger_word
        id_embeds = (torch.stack([self.faces.embedding(f"{first.identity_id}#{n}", photo) for n, photo in enumerate(first.references)])
                     if self.faces else None)  # one ArcFace embedding per ID image, as the authors' app_v2 stacks them
        output = self.pipe(
            [with_trigger_word(r, trigger) for r in requests],
            input_id_images=[photo.convert("RGB") for photo in first.references],
            id_embeds=id_embeds,
            start_merge_step=start_merge_step(float(self.params.get("style_strength_ratio", 20)), steps),
            negative_prompt=[str(self.params.get("negative_prompt", ""))] * len(requests),
            guidance_scale=float(self.params.get("guidance_scale", 5.0)),
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=[r.generator for r in requests],
            output_type="pil",
        )
        return list(output.images)
