"""The `fastcomposer` baseline: the official FastComposer model (MIT) through `FastComposerPipeline`.

Identity: the reference photo's CLIP ViT-L/14 image embedding fused into the subject word of the
prompt; no head control (the paper's FastComposer row; it is still scored on head control).
Weights: the one official file `pytorch_model.bin` (UNet, VAE, text and image encoders, fusion
MLP), converted strictly by `loaders/convert_fastcomposer.py`.

The benchmark's prompts name the subject with the identity's phrase ("a photo of a woman wearing a
red hat"); the trigger word goes right after that phrase ("a woman img"), as in FastComposer's
own evaluation prompts ("a man img ..."); a prompt without the phrase is an error naming it.

With `tiny: true` (the smoke preset) every network has random weights and needs no file: SD-1.5's
layout at toy size, a tiny CLIP vision tower with projection and the fusion MLP at width 32.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import GenerationRequest, MethodAdapter, check_latent_size, with_trigger_word
from caphuman_bench.registry import register_method

def build_tiny_fastcomposer_pipeline(seed: int = 0):
    """FastComposer's components at toy size (64 px images, 8×8 latents, width-32 CLIP), random weights."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from caphuman_bench.loaders.convert_caphuman import clip_tokenizer
    from caphuman_bench.loaders.convert_fastcomposer import SD15_PNDM
    from caphuman_bench.models.fastcomposer import FastComposerPostfuseModule
    from caphuman_bench.pipelines.pipeline_fastcomposer import FastComposerPipeline
    from caphuman_bench.pipelines.tiny import redraw_like_reference, tiny_text_encoder, tiny_vae

    width = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    cross_attention_dim=width, attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=width, intermediate_size=2 * width, projection_dim=width, num_hidden_layers=2,
            num_attention_heads=2, image_size=32, patch_size=8))
        postfuse = FastComposerPostfuseModule(embed_dim=width)
        vae, text_encoder = tiny_vae(), tiny_text_encoder(width, 77)
    generator = torch.Generator().manual_seed(seed)
    for module in (unet, postfuse):
        redraw_like_reference(module, generator)
    return FastComposerPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(77),
                                unet=unet.eval(), scheduler=PNDMScheduler(**SD15_PNDM),
                                image_encoder=image_encoder.eval(), postfuse_module=postfuse.eval())


@register_method("fastcomposer")
class FastComposerMethod(MethodAdapter):
    param_types = {
        **MethodAdapter.param_types,
        "num_inference_steps": int,
        "guidance_scale": float,
        "alpha": float,
        "object_resolution": int,
        "negative_prompt": str,
        "dtype": str,
        "tiny": bool,
    }

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        super().check_params(params, where)
        if not 0.0 <= float(params.get("alpha", 0.5)) <= 1.0:
            raise BenchError(f"{where}: parameter 'alpha' must lie in [0, 1] (share of steps with the subject), got {params['alpha']}")
        if float(params.get("guidance_scale", 5.0)) <= 1.0:
            raise BenchError(f"{where}: parameter 'guidance_scale' must be > 1 (FastComposer always uses guidance)")
        check_latent_size(params, where)

    def load(self) -> None:
        self.device = torch.device(self.context.device)
        self.dtype = self.compute_dtype(self.device)
        if self.params.get("tiny"):
            self.pipe = build_tiny_fastcomposer_pipeline(seed=0).to(dtype=self.dtype)
        else:
            from caphuman_bench.loaders.convert_fastcomposer import load_fastcomposer_components
            from caphuman_bench.pipelines.pipeline_fastcomposer import FastComposerPipeline

            components = load_fastcomposer_components(self.context.weights["fastcomposer"], dtype=self.dtype)
            self.pipe = FastComposerPipeline(**components)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe = self.accelerate(self.pipe)  # the CUDA fast path (pipelines/acceleration.py)

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        from caphuman_bench.pipelines.pipeline_fastcomposer import TRIGGER_WORD

        sizes = {(r.height, r.width) for r in requests}
        if len(sizes) != 1:
            raise BenchError(f"fastcomposer: a batch needs one size, got {sorted(sizes)}")
        height, width = sizes.pop()
        output = self.pipe(
            [with_trigger_word(r, TRIGGER_WORD) for r in requests],
            reference_images=[r.reference for r in requests],
            negative_prompt=str(self.params.get("negative_prompt", "")),
            height=height,
            width=width,
            num_inference_steps=int(self.params.get("num_inference_steps", 50)),
            guidance_scale=float(self.params.get("guidance_scale", 5.0)),
            alpha=float(self.params.get("alpha", 0.5)),
            object_resolution=int(self.params.get("object_resolution", 224)),
            generator=[r.generator for r in requests],
            output_type="pil",
        )
        return list(output.images)
