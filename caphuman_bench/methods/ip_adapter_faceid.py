"""IP-Adapter-FaceID and IP-Adapter-FaceID-Plus v2 on SD-1.5 (h94/IP-Adapter-FaceID), with or without
ControlNet head control (`controlnet: normals|landmarks`, as `sd15`).

Loaded by diffusers' own `load_ip_adapter` (which also applies the checkpoint's LoRA through peft)
and fed precomputed embeddings, as diffusers documents for Face ID:
- identity: the reference's ArcFace embedding, L2-normalised (insightface's `normed_embedding`), as
  `ip_adapter_image_embeds`; the unconditional branch gets zeros (the official `get_image_embeds`).
  The embedding comes from the project's ArcFace path (`faces.arcface`: MTCNN's 5 landmarks →
  insightface alignment → onnxruntime), with the recogniser the checkpoints were trained on,
  buffalo_l's `w600k_r50.onnx` (the model card's `FaceAnalysis(name="buffalo_l")`), by default.
- Plus v2 also sets, on the projection layer, the CLIP ViT-H penultimate hidden states of the
  224 px aligned face crop (`norm_crop(image_size=224)`; unconditional: the encoder on an all-zero
  input, as the official code and diffusers' `encode_image`), `shortcut = True` and
  `shortcut_scale` (the official `s_scale`). The crop goes to CLIP in BGR order by default
  (`face_crop_channels: bgr`), as the model card's usage makes it: `face_align.norm_crop` of a
  `cv2.imread` image, handed to `CLIPImageProcessor` as is (h94/IP-Adapter-FaceID README,
  "IP-Adapter-FaceID-Plus"); `rgb` is the other reading.
- With a ControlNet, the ControlNet cross-attends to the text tokens followed by the FaceID image
  tokens (`controlnet_sees_image_tokens: true`, the default), as in the authors' code, which appends
  the image tokens to the prompt embeddings and hands those to the pipeline, ControlNet included
  (tencent-ailab/IP-Adapter ip_adapter/ip_adapter_faceid.py, `IPAdapterFaceID.generate`, commit
  62e4af9d; its FaceID classes leave the ControlNet's attention as it is). `false` is diffusers'
  native IP-Adapter path, where the ControlNet sees the text tokens only.

Defaults are the model card's / `IPAdapterFaceID.generate`'s (written in the cards). Where we differ
from the authors' demo: the base model is SD-1.5 itself (the card's demo uses Realistic Vision
V4.0), the face is found by MTCNN instead of insightface's SCRFD, and images are square.

With `tiny: true` (the smoke preset) everything is random and built in code: the tiny SD-1.5 of
`sd15` (cross-attention width 64, so Plus' resampler has one 64-wide head), FaceID state dicts in
the official file layout (LoRA on every attention processor included), and a stand-in for the ArcFace
ONNX session; MTCNN (packaged weights) still finds the reference's face.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import GenerationRequest
from caphuman_bench.methods.reference_faces import ReferenceFaces, require_onnxruntime
from caphuman_bench.methods.sd15 import StableDiffusion15Method, build_tiny_sd15_pipeline, weights_folder
from caphuman_bench.registry import register_method

VARIANT_WEIGHTS = {"faceid": "ip_adapter_faceid_sd15", "plusv2": "ip_adapter_faceid_plusv2_sd15"}
ARCFACE_WEIGHTS = ("arcface_buffalo_l", "arcface_antelopev2")
FACE_CROP_CHANNELS = ("bgr", "rgb")
ID_EMBED_DIM = 512  # ArcFace
FACE_CROP = 224  # Plus: the aligned face crop CLIP sees (norm_crop image_size=224)


# ----------------------------------------------------------------------------------------------
# the tiny smoke model


def tiny_faceid_state_dict(unet, variant: str, generator: torch.Generator, clip_dim: int = 32, lora_rank: int = 4,
                           depth: int = 4) -> dict:
    """Random IP-Adapter-FaceID (`faceid`) or FaceID-Plus (`plusv2`) weights in the official file layout:
    "image_proj" (`MLPProjModel` / `ProjPlusModel` of tencent-ailab/IP-Adapter ip_adapter_faceid.py) and
    "ip_adapter" (every attention processor i in `attn_processors` order: LoRA `to_{q,k,v,out}_lora`;
    cross-attention ones also `to_k_ip` / `to_v_ip`)."""
    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) / math.sqrt(shape[-1])

    width = unet.config.cross_attention_dim
    proj = {"proj.0.weight": draw(2 * ID_EMBED_DIM, ID_EMBED_DIM), "proj.0.bias": torch.zeros(2 * ID_EMBED_DIM),
            "proj.2.weight": draw(4 * width, 2 * ID_EMBED_DIM), "proj.2.bias": torch.zeros(4 * width),
            "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}
    if variant == "plusv2":  # FacePerceiverResampler(dim=width, heads=width // 64, embedding_dim=clip_dim)
        inner = 64 * (width // 64)
        resampler = {"proj_in.weight": draw(width, clip_dim), "proj_in.bias": torch.zeros(width),
                     "proj_out.weight": draw(width, width), "proj_out.bias": torch.zeros(width),
                     "norm_out.weight": torch.ones(width), "norm_out.bias": torch.zeros(width)}
        for i in range(depth):
            for norm in (f"layers.{i}.0.norm1", f"layers.{i}.0.norm2", f"layers.{i}.1.0"):
                resampler[f"{norm}.weight"], resampler[f"{norm}.bias"] = torch.ones(width), torch.zeros(width)
            resampler[f"layers.{i}.0.to_q.weight"] = draw(inner, width)
            resampler[f"layers.{i}.0.to_kv.weight"] = draw(2 * inner, width)
            resampler[f"layers.{i}.0.to_out.weight"] = draw(width, inner)
            resampler[f"layers.{i}.1.1.weight"] = draw(4 * width, width)
            resampler[f"layers.{i}.1.3.weight"] = draw(width, 4 * width)
        proj.update({f"perceiver_resampler.{k}": v for k, v in resampler.items()})
    layers: dict[str, torch.Tensor] = {}
    for index, name in enumerate(unet.attn_processors):
        attention = unet.get_submodule(name.removesuffix(".processor"))
        hidden, key_dim = attention.to_q.weight.shape[0], attention.to_k.weight.shape[1]
        for part, in_dim in (("to_q", hidden), ("to_k", key_dim), ("to_v", key_dim), ("to_out", hidden)):
            layers[f"{index}.{part}_lora.down.weight"] = draw(lora_rank, in_dim)
            layers[f"{index}.{part}_lora.up.weight"] = draw(hidden, lora_rank)
        if not name.endswith("attn1.processor"):
            layers[f"{index}.to_k_ip.weight"] = draw(hidden, key_dim)
            layers[f"{index}.to_v_ip.weight"] = draw(hidden, key_dim)
    return {"image_proj": proj, "ip_adapter": layers}


class TinyArcFaceSession:
    """Stands in for the ArcFace onnxruntime session in the smoke preset (same `get_inputs` / `run`
    interface, so `arcface_embeddings` runs unchanged): a fixed random linear map of the aligned
    112 px crop, average-pooled 8 × 8, to 512 numbers."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(ID_EMBED_DIM, 3 * 14 * 14, generator=generator) / math.sqrt(3 * 14 * 14)

    def get_inputs(self):
        return [SimpleNamespace(name="input.1")]

    def run(self, _outputs, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(feeds["input.1"]), 8).flatten(1)
        return [(pooled @ self.weight.T).numpy()]


def face_crop_for_clip(photo: Image.Image, landmarks: np.ndarray, bgr: bool) -> np.ndarray:
    """Plus v2's CLIP input: the 224 px aligned face crop, channels reversed when `bgr` (the model card's order)."""
    from caphuman_bench.faces.arcface import arcface_align

    crop = arcface_align(photo, landmarks, FACE_CROP)
    return np.ascontiguousarray(crop[..., ::-1]) if bgr else crop


# ----------------------------------------------------------------------------------------------
# the adapter


@register_method("ip_adapter_faceid")
class IPAdapterFaceIDMethod(StableDiffusion15Method):
    param_types = {
        **StableDiffusion15Method.param_types,
        "variant": str,
        "ip_adapter_scale": float,
        "shortcut_scale": float,
        "arcface_weights": str,
        "face_crop_channels": str,
        "controlnet_sees_image_tokens": bool,
    }
    tiny_context_dim = 64

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        super().check_params(params, where)
        if str(params.get("variant", "faceid")) not in VARIANT_WEIGHTS:
            raise BenchError(f"{where}: parameter 'variant' must be one of {', '.join(VARIANT_WEIGHTS)}, got {params['variant']!r}")
        if str(params.get("arcface_weights", ARCFACE_WEIGHTS[0])) not in ARCFACE_WEIGHTS:
            raise BenchError(f"{where}: parameter 'arcface_weights' must be one of {', '.join(ARCFACE_WEIGHTS)}, "
                             f"got {params['arcface_weights']!r}")
        if str(params.get("face_crop_channels", "bgr")) not in FACE_CROP_CHANNELS:
            raise BenchError(f"{where}: parameter 'face_crop_channels' must be one of {', '.join(FACE_CROP_CHANNELS)}, "
                             f"got {params['face_crop_channels']!r}")

    @classmethod
    def required_weights(cls, card, params: dict[str, Any]) -> list[str]:
        """The weights, and before them the two libraries the method cannot run without."""
        from diffusers.utils import USE_PEFT_BACKEND

        if not USE_PEFT_BACKEND:
            raise BenchError(f"{card.name}: IP-Adapter-FaceID's LoRA is applied through peft, which is not installed: "
                             "pip install 'caphuman-bench' (it pins peft)")
        if params.get("tiny"):
            return []
        require_onnxruntime(card.name)
        variant = str(params.get("variant", "faceid"))
        extra = [VARIANT_WEIGHTS[variant], str(params.get("arcface_weights", ARCFACE_WEIGHTS[0]))]
        if variant == "plusv2":
            extra.append("ip_adapter_image_encoder_sd15")
        return [*super().required_weights(card, params), *extra]

    @property
    def variant(self) -> str:
        return str(self.params.get("variant", "faceid"))

    def load(self) -> None:
        self._identities: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._controlnet_image_tokens: torch.Tensor | None = None
        super().load()
        if self.controlnet != "none":
            self.pipe.controlnet.register_forward_pre_hook(self._append_image_tokens, with_kwargs=True)

    def _append_image_tokens(self, _controlnet, args, kwargs):
        """The ControlNet's context: the pipeline's text tokens, then this call's image tokens (the authors' order)."""
        if self._controlnet_image_tokens is None:
            return None
        kwargs["encoder_hidden_states"] = torch.cat([kwargs["encoder_hidden_states"], self._controlnet_image_tokens], dim=1)
        return args, kwargs

    def build_tiny_pipeline(self):
        pipe = build_tiny_sd15_pipeline(self.controlnet != "none", image_encoder=self.variant == "plusv2",
                                        context_dim=self.tiny_context_dim)
        clip_dim = pipe.image_encoder.config.hidden_size if pipe.image_encoder is not None else 32
        state_dict = tiny_faceid_state_dict(pipe.unet, self.variant, torch.Generator().manual_seed(1), clip_dim)
        pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None, low_cpu_mem_usage=False)
        self.reference_faces = ReferenceFaces("IP-Adapter-FaceID", TinyArcFaceSession(), detect_device=str(self.device))
        return pipe

    def build_pipeline(self, image_encoder=None):
        """SD-1.5 (+ ControlNet) of `sd15`, the FaceID checkpoint (read with weights_only=True), ArcFace."""
        from transformers import CLIPVisionModelWithProjection

        from caphuman_bench.faces.arcface import load_arcface
        from caphuman_bench.weights import load_torch_file

        paths = self.context.weights
        if self.variant == "plusv2":
            folder = weights_folder("ip_adapter_image_encoder_sd15", Path(paths["ip_adapter_image_encoder_sd15"]))
            image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=self.dtype, local_files_only=True)
        pipe = super().build_pipeline(image_encoder)
        weights_id = VARIANT_WEIGHTS[self.variant]
        state_dict = load_torch_file(paths[weights_id], f"IP-Adapter-FaceID weights ({weights_id})")
        if not isinstance(state_dict, dict) or not {"image_proj", "ip_adapter"} <= set(state_dict):
            raise BenchError(f"{paths[weights_id]}: not an IP-Adapter checkpoint (needs 'image_proj' and 'ip_adapter')")
        # image_encoder_folder=None: Plus' CLIP encoder is registered above from its own manifest entry.
        pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None)
        session = load_arcface(paths[str(self.params.get("arcface_weights", ARCFACE_WEIGHTS[0]))], str(self.device))
        self.reference_faces = ReferenceFaces("IP-Adapter-FaceID", session, detect_device=str(self.device))
        return pipe

    @torch.no_grad()
    def identity_embeds(self, identity_id: str, photos: list[Image.Image]):
        """(normalised ArcFace embedding [1, 1, 512], Plus' (CLIP hidden states, unconditional ones) or None),
        once per identity. Several photos (a `references` split): the mean of their raw ArcFace embeddings,
        normalised, and the mean of their face crops' CLIP hidden states."""
        if identity_id not in self._identities:
            detections, embeddings = zip(*self.reference_faces.faces(identity_id, photos))
            crops = None
            if self.variant == "plusv2":
                bgr = self.params.get("face_crop_channels", "bgr") == "bgr"
                crops = [Image.fromarray(face_crop_for_clip(p, d.landmarks, bgr)) for p, d in zip(photos, detections)]
            self.add_identity(identity_id, list(embeddings), crops)
        return self._identities[identity_id]

    @torch.no_grad()
    def add_identity(self, identity_id: str, embeddings: list[np.ndarray], crops: list[Image.Image] | None) -> None:
        """An identity's embeddings from its photos' raw ArcFace embeddings and (Plus) face crops as CLIP sees them."""
        raw = np.mean(embeddings, axis=0)
        normed = torch.tensor(raw / np.linalg.norm(raw), dtype=self.dtype, device=self.device).view(1, 1, -1)
        clip = None
        if self.variant == "plusv2":
            encoded = [self.pipe.encode_image(crop, self.device, 1, output_hidden_states=True) for crop in crops]
            clip = tuple(torch.stack([e[i] for e in encoded]).mean(dim=0) for i in (0, 1))
        self._identities[identity_id] = (normed, clip)

    def group_key(self, request: GenerationRequest):
        """diffusers gives every prompt of a call the same IP-Adapter embedding: one identity per call."""
        return request.identity_id

    @torch.no_grad()
    def extra_pipeline_inputs(self, requests: list[GenerationRequest], guided: bool) -> dict[str, Any]:
        identity, clip = self.identity_embeds(requests[0].identity_id, requests[0].references)
        self.pipe.set_ip_adapter_scale(float(self.params.get("ip_adapter_scale", 1.0)))
        n = len(requests)
        if clip is not None:
            positive, negative = clip  # [1, tokens, width] each
            layer = self.pipe.unet.encoder_hid_proj.image_projection_layers[0]
            # [batch, images, tokens, width], unconditional rows first as the pipeline stacks the id embeddings
            layer.clip_embeds = torch.cat([negative] * n + [positive] * n if guided else [positive] * n)[:, None]
            layer.shortcut = True  # Plus v2
            layer.shortcut_scale = float(self.params.get("shortcut_scale", 1.0))
        embeds = torch.cat([torch.zeros_like(identity), identity]) if guided else identity
        self._controlnet_image_tokens = None
        if self.controlnet != "none" and self.params.get("controlnet_sees_image_tokens", True):
            # the rows the pipeline hands the UNet (each embedding once per prompt, unconditional ones first)
            rows = torch.cat([torch.zeros_like(identity)] * n + [identity] * n) if guided else identity.repeat(n, 1, 1)
            (tokens,) = self.pipe.unet.encoder_hid_proj([rows])  # [rows, 1, tokens, width]
            self._controlnet_image_tokens = tokens.flatten(1, 2)
        return {"ip_adapter_image_embeds": [embeds]}
