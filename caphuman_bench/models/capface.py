"""CapFace, the CapHuman control branch, as a diffusers `ControlNetModel` with an identity context.

CapFace is a ControlNet in every respect that diffusers already models: a copy of the UNet encoder
and middle block, the 8-conv hint encoder (`ControlNetConditioningEmbedding` with 9 input channels
and (16, 32, 96, 256) widths is exactly the official `input_hint_block`), and 1x1 output convs.
It differs in three places, added here:

* its cross-attention context is the *identity* context, not the text: `[img_linear(image tokens),
  id_linear(ID vector)]` (local tokens first, the global ID token last), built by `identity_context`;
* a mask head `mask_predict` (3x3 conv -> 1 channel, sigmoid) on the hint-encoder features, whose
  thresholded output gates every residual before the UNet adds it (`predict_mask`, `gate_residuals`);
* time-dependent identity dropout tau and the ablation switches `use_global` / `use_local`.

The forward pass is `ControlNetModel.forward` unchanged, called with
`encoder_hidden_states=identity_context(...)` and `controlnet_cond=hint` — or with the hint's
features (`encode_hint`), which the hint encoder passes through: the hint is the same at every
sampling step, so the pipeline encodes it once instead of running eight full-resolution convolutions
per step (the same arithmetic, done once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn


class HintEncoder(ControlNetConditioningEmbedding):
    """diffusers' hint encoder, through which features it already produced pass unchanged (told apart
    by their channel count, which CapFaceModel keeps different from the hint's)."""

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        if conditioning.shape[1] == self.conv_out.out_channels:
            return conditioning
        return super().forward(conditioning)


class CapFaceModel(ControlNetModel):
    """ControlNet + mask head + identity projections (see module docstring).

    Switches, all applied to the projected identity context `c` [B, N_img + 1, D]:

    * `tau` (official `drop_control_cond_t`): `c <- c * 1[t <= tau]` per sample, so the identity
      only steers the late, low-noise steps. `tau = 0` turns the rule off (nothing is ever dropped),
      exactly like the official code; since DDPM timesteps lie in [0, 999], any `tau >= 999` also
      never drops, so `tau = 0` and `tau >= 1000` give identical outputs.
    * `use_local=False` / `use_global=False` zero the image tokens / the ID token after their
      projection (bias included). Zeroing, not removing: the zeroed tokens are exactly what the tau
      rule produces for dropped samples, and the branch keeps the token count it was trained with
      (258 for the full model), so the ablation changes only the information, not the attention
      layout.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 9,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
        # CapFace additions
        id_embedding_dim: int = 512,
        image_token_dim: int = 1024,
        mask_threshold: float = 0.5,
    ):
        # The signature repeats ControlNetModel's so that its config round-trips through
        # save_pretrained / from_pretrained without "unexpected config attribute" warnings.
        super().__init__(
            in_channels=in_channels,
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            only_cross_attention=only_cross_attention,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            use_linear_projection=use_linear_projection,
            class_embed_type=class_embed_type,
            addition_embed_type=addition_embed_type,
            addition_time_embed_dim=addition_time_embed_dim,
            num_class_embeds=num_class_embeds,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            global_pool_conditions=global_pool_conditions,
            addition_embed_type_num_heads=addition_embed_type_num_heads,
        )
        if conditioning_channels == block_out_channels[0]:
            raise ValueError(f"conditioning_channels ({conditioning_channels}) must differ from block_out_channels[0]: "
                             "the hint encoder tells hints from encoded hints by their channels")
        # the same module and parameters, one method more (a new module would draw other random weights)
        self.controlnet_cond_embedding.__class__ = HintEncoder
        # Input width = hint-encoder output = block_out_channels[0] (the official code hard-codes 320,
        # which equals model_channels only for the SD-1.5-sized model).
        self.mask_predict = nn.Conv2d(block_out_channels[0], 1, kernel_size=3, padding=1)
        self.id_linear = nn.Linear(id_embedding_dim, cross_attention_dim)
        self.img_linear = nn.Linear(image_token_dim, cross_attention_dim)

    def identity_context(
        self,
        image_tokens: torch.Tensor,
        id_embedding: torch.Tensor,
        timestep: torch.Tensor | int,
        tau: float = 0,
        use_global: bool = True,
        use_local: bool = True,
    ) -> torch.Tensor:
        """`[img_linear(image_tokens), id_linear(id_embedding)]` [B, N+1, D] after the tau rule and switches."""
        local_tokens = self.img_linear(image_tokens)
        global_token = self.id_linear(id_embedding)
        if not use_local:
            local_tokens = torch.zeros_like(local_tokens)
        if not use_global:
            global_token = torch.zeros_like(global_token)
        context = torch.cat([local_tokens, global_token], dim=1)
        if tau != 0:
            t = torch.as_tensor(timestep, device=context.device).reshape(-1)
            keep = (t <= tau).to(context.dtype).expand(context.shape[0])
            context = context * keep[:, None, None]
        return context

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The hint encoder's features [B, block_out_channels[0], h, w] at latent resolution, which
        `forward` (as `controlnet_cond`) and `predict_mask` accept in place of the hint."""
        return self.controlnet_cond_embedding(hint)

    def predict_mask(self, hint: torch.Tensor) -> torch.Tensor:
        """Soft face mask [B, 1, h, w] at latent resolution from the hint or its features."""
        return torch.sigmoid(self.mask_predict(self.controlnet_cond_embedding(hint)))

    def gate_residuals(
        self,
        down_residuals: tuple[torch.Tensor, ...] | list[torch.Tensor],
        mid_residual: torch.Tensor,
        mask: torch.Tensor,
        copies: int = 1,
        hard_masks: dict[tuple[int, int], torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multiply each residual by the hard mask `1[resize(mask) > threshold]` at its own size.

        The official UNet gates each residual with the mask resized to the decoder feature it is added
        to; that feature always has the residual's spatial size, so gating before handing the residuals
        to `UNet2DConditionModel` is the same computation. `copies` > 1 returns each gated residual
        repeated along the batch (the halves of classifier-free guidance), written by the product
        itself: one pass over the residual instead of a product and then a concatenation. `hard_masks`
        keeps the 0/1 masks by size across calls with the same `mask` (the steps of one generation).
        """
        hard_masks = {} if hard_masks is None else hard_masks

        def gate(residual: torch.Tensor) -> torch.Tensor:
            size = tuple(residual.shape[-2:])
            if size not in hard_masks:
                hard_masks[size] = self.hard_mask(mask, size)
            hard = hard_masks[size]
            if copies == 1:
                return residual * hard
            layout = torch.contiguous_format if residual.is_contiguous() else torch.channels_last
            out = torch.empty((copies * residual.shape[0], *residual.shape[1:]), dtype=torch.result_type(residual, hard),
                              device=residual.device, memory_format=layout)
            torch.mul(residual.expand(copies, *residual.shape), hard, out=out.view(copies, *residual.shape))
            return out

        return [gate(r) for r in down_residuals], gate(mid_residual)

    def hard_mask(self, mask: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
        """0/1 mask at `size`: bilinear resize without anti-aliasing, as torchvision 0.14 (official pin) did."""
        if tuple(mask.shape[-2:]) != tuple(size):
            mask = F.interpolate(mask, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
        return (mask > self.config.mask_threshold).to(mask.dtype)
