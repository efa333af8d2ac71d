"""FastComposer's fusion module: the subject's CLIP image embedding written into the text embedding.

A port of `FastComposerPostfuseModule` (mit-han-lab/fastcomposer, `fastcomposer/model.py`, MIT) as a
diffusers model (`ModelMixin` + `ConfigMixin`), so it loads and saves like the other components.
At inference FastComposer changes nothing else: its image encoder is CLIP ViT-L/14's vision tower
with projection (transformers' `CLIPVisionModelWithProjection`: the post-layernorm CLS token through
`visual_projection`, exactly the official `vision_model(x)[1]` → `visual_projection`), its text
encoder is SD-1.5's CLIP text model run on the prompt without the trigger word, and its UNet is a
fine-tuned SD-1.5 UNet. Localized cross-attention supervision is a training loss only.

The fusion, for the text embedding t of the subject token (the word before the trigger "img") and
the subject's image embedding o (both `embed_dim` wide, after the text encoder's final layernorm):

    mlp(x)       = fc2(GELU(fc1(LayerNorm(x))))          (GELU exact, not tanh; hidden = embed_dim)
    fused(t, o)  = LayerNorm(h + mlp2(h)),  h = t + mlp1([t; o])

mlp1 maps 2·embed_dim → embed_dim, mlp2 embed_dim → embed_dim with its residual. Every other
token's embedding is left as it is.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class FastComposerMLP(nn.Module):
    """LayerNorm → Linear → GELU → Linear, with an optional residual (the official `MLP`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool) -> None:
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return y + x if self.use_residual else y


class FastComposerPostfuseModule(ModelMixin, ConfigMixin):
    """Fuses one image embedding per sample into the text embedding at that sample's subject token."""

    @register_to_config
    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.mlp1 = FastComposerMLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = FastComposerMLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse(self, text_embeds: torch.Tensor, object_embeds: torch.Tensor) -> torch.Tensor:
        """The fused embedding of subject tokens [N, D] with their image embeddings [N, D]."""
        fused = self.mlp1(torch.cat([text_embeds, object_embeds], dim=-1)) + text_embeds
        return self.layer_norm(self.mlp2(fused))

    def forward(self, text_embeds: torch.Tensor, object_embeds: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
        """text_embeds [B, T, D]; object_embeds [B, D]; subject_mask [B, T] bool with one True per row.

        Returns the text embeddings with each row's subject token replaced by its fused embedding.
        """
        if not torch.equal(subject_mask.sum(dim=1), torch.ones_like(subject_mask.sum(dim=1))):
            raise ValueError(f"every prompt needs exactly one subject token, got {subject_mask.sum(dim=1).tolist()}")
        object_embeds = object_embeds.to(text_embeds.dtype)
        rows = torch.arange(text_embeds.shape[0], device=text_embeds.device)
        columns = subject_mask.int().argmax(dim=1)
        out = text_embeds.clone()
        out[rows, columns] = self.fuse(text_embeds[rows, columns], object_embeds)
        return out
