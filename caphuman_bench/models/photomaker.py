"""PhotoMaker's ID encoder (TencentARC/PhotoMaker, v1 and v2), ported onto transformers and diffusers modules.

Read from the authors' `photomaker/model.py` (v1), `photomaker/model_v2.py` (v2) and
`photomaker/resampler.py`; the official `photomaker-v1.bin` / `photomaker-v2.bin` hold
{"id_encoder": ..., "lora_weights": ...}.

Both versions are a CLIP ViT-L/14 vision tower (`CLIPVisionModelWithProjection`, the official
`VISION_CONFIG_DICT`) whose output is fused into the prompt embedding at the class word ("man" in
"a man img"): the class token is repeated `tokens_per_image` times per ID image and each copy is
replaced by `FuseModule(prompt token, ID token)`:

    fused = LayerNorm(MLP2(MLP1([prompt ‖ id]) + prompt))      MLP2 with a residual, MLP1 without

* v1: one ID token per image, `[visual_projection(pooled) ‖ visual_projection_2(pooled)]` (768 + 1280 = 2048).
* v2: two ID tokens per image from the ArcFace embedding (512-d) through the "QFormerPerceiver":
  `token_proj` (Linear 512→2048, GELU, Linear 2048→2·2048), LayerNorm, then a 4-layer face perceiver
  resampler (dim 2048, 16 heads × 128) that attends to the CLIP tower's `last_hidden_state`, plus a
  residual to its own input. That is the architecture of IP-Adapter-FaceID-Plus, so it is built from
  diffusers' `IPAdapterFaceIDPlusImageProjection` (shortcut on, scale 1.0) with the authors' sizes
  and an explicit key map (`convert_photomaker_id_encoder`).
"""

from __future__ import annotations

import re

import torch
from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from caphuman_bench.errors import BenchError
from caphuman_bench.models.fastcomposer import FastComposerMLP  # PhotoMaker's fuse MLP is FastComposer's

# photomaker/model.py VISION_CONFIG_DICT (CLIP ViT-L/14, 224 px).
PHOTOMAKER_VISION_CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                            "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}
VERSIONS = ("v1", "v2")
# Class-token copies per ID image. pipeline.py at HEAD sets num_tokens = 2 for both versions, which crashes v1
# (TencentARC/PhotoMaker#182); v1's own pipeline (commit ccd1f7c) repeats the class token once per image.
TOKENS_PER_IMAGE = {"v1": 1, "v2": 2}
ARCFACE_DIM = 512
PERCEIVER_DIM_HEAD = 128  # model_v2.py: FacePerceiverResampler(dim_head=128, heads=2048 // 128)


class FuseModule(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.mlp1 = FastComposerMLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = FastComposerMLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor, class_tokens_mask: torch.Tensor) -> torch.Tensor:
        """prompt_embeds [B, L, D]; id_embeds [B, N, T, D] (N images, T tokens each); class_tokens_mask [B, L]
        with exactly N·T marked positions a row, which receive the fused tokens in order."""
        id_tokens = id_embeds.to(prompt_embeds.dtype).reshape(-1, id_embeds.shape[-1])
        if int(class_tokens_mask.sum()) != id_tokens.shape[0]:
            raise ValueError(f"PhotoMaker: {int(class_tokens_mask.sum())} class-token positions for {id_tokens.shape[0]} ID tokens")
        class_tokens = prompt_embeds[class_tokens_mask]
        fused = self.mlp1(torch.cat([class_tokens, id_tokens], dim=-1)) + class_tokens
        fused = self.layer_norm(self.mlp2(fused))
        return prompt_embeds.masked_scatter(class_tokens_mask[..., None], fused.to(prompt_embeds.dtype))


class PhotoMakerIDEncoder(CLIPVisionModelWithProjection):
    """The ID encoder of either version; `embed_dim` is the UNet's cross-attention width (SDXL: 2048)."""

    def __init__(self, version: str = "v1", vision_config: dict | None = None, embed_dim: int = 2048,
                 perceiver_dim_head: int = PERCEIVER_DIM_HEAD) -> None:
        if version not in VERSIONS:
            raise ValueError(f"PhotoMaker version must be one of {VERSIONS}, got {version!r}")
        config = CLIPVisionConfig(**(vision_config or PHOTOMAKER_VISION_CONFIG))
        super().__init__(config)
        self.version = version
        self.visual_projection_2 = nn.Linear(config.hidden_size, embed_dim - config.projection_dim, bias=False)
        self.fuse_module = FuseModule(embed_dim)
        if version == "v2":
            # model_v2.py QFormerPerceiver(512, 2048, num_tokens=2): FacePerceiverResampler(dim=2048, depth=4,
            # dim_head=128, heads=2048 // 128, embedding_dim=1024, ff_mult=4), token_proj ratio 4, residual.
            self.qformer_perceiver = IPAdapterFaceIDPlusImageProjection(
                embed_dims=embed_dim, output_dims=embed_dim, hidden_dims=config.hidden_size, id_embeddings_dim=ARCFACE_DIM,
                depth=4, dim_head=perceiver_dim_head, heads=embed_dim // perceiver_dim_head,
                num_tokens=TOKENS_PER_IMAGE["v2"], ffn_ratio=4, ffproj_ratio=4)
            self.qformer_perceiver.shortcut = True
            self.qformer_perceiver.shortcut_scale = 1.0

    def forward(self, id_pixel_values: torch.Tensor, prompt_embeds: torch.Tensor, class_tokens_mask: torch.Tensor,
                id_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """id_pixel_values [B, N, 3, H, W]; id_embeds (v2) [B, N, 512] raw ArcFace embeddings → prompt_embeds with
        the class-word positions fused."""
        batch, num_images = id_pixel_values.shape[:2]
        pixels = id_pixel_values.flatten(0, 1)
        if self.version == "v1":
            pooled = self.vision_model(pixels).pooler_output
            tokens = torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)[:, None]
        else:
            if id_embeds is None:
                raise ValueError("PhotoMaker v2 needs the ArcFace embedding of every ID image (id_embeds)")
            self.qformer_perceiver.clip_embeds = self.vision_model(pixels).last_hidden_state[:, None]
            try:
                tokens = self.qformer_perceiver(id_embeds.reshape(batch * num_images, -1))
            finally:
                self.qformer_perceiver.clip_embeds = None
        return self.fuse_module(prompt_embeds, tokens.reshape(batch, num_images, tokens.shape[1], -1), class_tokens_mask)


# The official v2 perceiver's names → diffusers' IPAdapterFaceIDPlusImageProjection's (per layer i).
_PERCEIVER_KEY_MAP = (
    (r"token_proj\.0\.", "proj.net.0.proj."),
    (r"token_proj\.2\.", "proj.net.2."),
    (r"token_norm\.", "norm."),
    (r"perceiver_resampler\.(proj_in|proj_out|norm_out)\.", r"\1."),
    (r"perceiver_resampler\.layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."),
    (r"perceiver_resampler\.layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
    (r"perceiver_resampler\.layers\.(\d+)\.0\.to_q\.", r"layers.\1.attn.to_q."),
    (r"perceiver_resampler\.layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
    (r"perceiver_resampler\.layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."),
    (r"perceiver_resampler\.layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
    (r"perceiver_resampler\.layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2."),
)
_TO_KV = re.compile(r"perceiver_resampler\.layers\.(\d+)\.0\.to_kv\.weight")


def convert_photomaker_id_encoder(state_dict: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """The official `id_encoder` state dict in this module's names (v1 unchanged; v2's perceiver renamed,
    its fused `to_kv` split into `to_k` / `to_v` as the authors' `chunk(2)` does). Unknown perceiver keys
    are an error naming `label`."""
    out: dict[str, torch.Tensor] = {}
    prefix = "qformer_perceiver."
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        rest = key[len(prefix):]
        kv = _TO_KV.fullmatch(rest)
        if kv:
            to_k, to_v = value.chunk(2, dim=0)
            out[f"{prefix}layers.{kv.group(1)}.attn.to_k.weight"] = to_k
            out[f"{prefix}layers.{kv.group(1)}.attn.to_v.weight"] = to_v
            continue
        for pattern, replacement in _PERCEIVER_KEY_MAP:
            renamed, hits = re.subn(f"^{pattern}", replacement, rest)
            if hits:
                out[prefix + renamed] = value
                break
        else:
            raise BenchError(f"{label}: unknown PhotoMaker v2 perceiver key {key!r}")
    return out


def load_photomaker_id_encoder(state_dict: dict[str, torch.Tensor], version: str, label: str,
                               embed_dim: int = 2048, vision_config: dict | None = None,
                               perceiver_dim_head: int | None = None) -> PhotoMakerIDEncoder:
    """An ID encoder of `version` (the official sizes unless given; `embed_dim` = the UNet's cross-attention
    width) with the official `id_encoder` weights, loaded strictly."""
    encoder = PhotoMakerIDEncoder(version, vision_config or PHOTOMAKER_VISION_CONFIG, embed_dim,
                                  perceiver_dim_head or PERCEIVER_DIM_HEAD)
    converted = convert_photomaker_id_encoder(state_dict, label)
    result = encoder.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BenchError(f"{label}: not a PhotoMaker {version} id_encoder: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]} (a v1 file with version v2 or the reverse?)")
    return encoder.eval()
