"""The `caphuman` method: reference photo + prompt + head condition → image, through `CapHumanPipeline`.

Per identity, once per run (cached under the run's `cache/method/` so a resumed run skips them):
the identity tokens (`IdentityEncoder`: CLIP tokens of the face-parsed photo + FaceNet embedding) and
the reference's FLAME code (DECA's, the official one, or another `reconstructor`'s). Per identity × head
condition: the 9-channel head render of the reference's code mixed with the condition (`params["mixing"]`,
the official `--modes`); code and renders come from `HeadRenderMixin` (methods/head_renders.py), shared
with `ip_adapter_controlnet`.

Switches (passed to the pipeline; see `CapFaceModel`): `tau` zeroes CapFace's whole identity context
at DDIM steps with t > tau (0 = never; any tau >= 999 also never drops, so tau = 0 and tau >= 1000
give the same image); `use_global: false` / `use_local: false` zero the projected ID token / image
tokens. The head condition and its mask are never dropped: CapFace keeps steering the head pose.

Backbone (`backbone`): "caphuman" (the checkpoint's own SD-1.5), "realistic_vision" (the official
script's Realistic Vision V3.0 + vae-ft-mse overlay), or the path of any SD-1.5-family model — an LDM
single file (`.safetensors` / `.ckpt`) or a diffusers folder (`unet/`, `vae/`, `text_encoder/`) — whose
parts replace the checkpoint's UNet, VAE and text encoder (CapFace stays). A path's sha256 is part of
the run's configuration (`artefacts.backbone` in run.json), so another file never reuses old images.

With `tiny: true` (the smoke preset) every network has random weights and needs no file: the tiny
CapHuman of `build_tiny_caphuman_pipeline`, a tiny CLIP / full-size random FaceNet and BiSeNet with
the real MTCNN, and the synthetic FLAME-format head from FLAME's neutral code with the shape and
expression the reconstructor's tiny random model reads from the reference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from caphuman_bench.atomic import atomic_write, read_cached
from caphuman_bench.errors import BenchError
from caphuman_bench.faces.memo import BoundedMemo
from caphuman_bench.methods.base import GenerationRequest, MethodAdapter
from caphuman_bench.methods.head_renders import HeadRenderMixin, head_weights
from caphuman_bench.pipelines.acceleration import FAST, accelerate_pipeline, attention_backend, resolve_levers
from caphuman_bench.registry import register_method

log = logging.getLogger(__name__)
BACKBONES = ("caphuman", "realistic_vision")
BASE_WEIGHTS = ("caphuman_ckpt", "facenet_vggface2", "face_parser_bisenet")
OVERLAY_WEIGHTS = ("realistic_vision_v3", "vae_ft_mse")
DEVICE_MEMO = 32  # head conditions (4.7 MB each at 512² in bf16) and identities kept on the device; tasks come identity by identity


@register_method("caphuman")
class CapHumanMethod(HeadRenderMixin, MethodAdapter):
    param_types = {
        **MethodAdapter.param_types,
        "num_inference_steps": int,
        "guidance_scale": float,
        "eta": float,
        "tau": int,  # a DDPM timestep
        "use_global": bool,
        "use_local": bool,
        "mixing": str,
        "backbone": str,
        "negative_prompt": str,
        "dtype": str,
        "tiny": bool,
    }

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        super().check_params(params, where)
        backbone = params.get("backbone", "caphuman")
        if backbone not in BACKBONES and not Path(backbone).exists():
            raise BenchError(f"{where}: parameter 'backbone' must be one of {', '.join(BACKBONES)} or the path of an "
                             f"SD-1.5-family model (single file or diffusers folder); {backbone!r} is neither")
        if int(params.get("height", 512)) != int(params.get("width", 512)):
            raise BenchError(f"{where}: CapHuman renders square head conditions; parameters 'height' and 'width' must be equal")
        if float(params.get("tau", 0)) < 0:
            raise BenchError(f"{where}: parameter 'tau' must be >= 0 (0 = never drop the identity tokens)")

    @classmethod
    def required_weights(cls, card, params: dict[str, Any]) -> list[str]:
        if params.get("tiny"):
            return []
        extra = OVERLAY_WEIGHTS if params.get("backbone") == "realistic_vision" else ()
        return [*BASE_WEIGHTS, *head_weights(params), *extra]

    @classmethod
    def artefacts(cls, card, params: dict[str, Any], bench, identity_ids: list[str], runs_dir: Path) -> dict[str, dict]:
        """A backbone given by path: its files' sha256 (a replaced file is another configuration)."""
        backbone = params.get("backbone", "caphuman")
        if backbone in BACKBONES:
            return {}
        from caphuman_bench.provenance import config_hash
        from caphuman_bench.weights import sha256_of

        path = Path(backbone).resolve()
        if path.is_dir():  # a diffusers folder: the digest of its files' digests
            digest = config_hash({str(f.relative_to(path)): sha256_of(f) for f in sorted(path.rglob("*")) if f.is_file()})
        else:
            digest = sha256_of(path)
        return {"backbone": {"path": str(path), "sha256": digest}}

    def _backbone_path(self) -> Path | None:
        backbone = self.params.get("backbone", "caphuman")
        return None if backbone in BACKBONES else Path(backbone)

    # ------------------------------------------------------------------------------------------
    # building

    def load(self) -> None:
        self.device = torch.device(self.context.device)
        self.dtype = self.compute_dtype(self.device)
        if self.params.get("tiny"):
            self._load_tiny()
        else:
            self._load_full()
        self.pipe.set_progress_bar_config(disable=True)
        # the fast path (compile, channels-last, fused QKV, cuDNN attention) on CUDA for the full model;
        # the tiny smoke model would spend longer compiling than generating
        self.levers = resolve_levers(self.device, fast=FAST, tiny=bool(self.params.get("tiny")))
        accelerate_pipeline(self.pipe, self.levers)
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._codes: dict[str, dict[str, np.ndarray]] = {}
        self._hints = BoundedMemo(DEVICE_MEMO)
        self._device_tokens = BoundedMemo(DEVICE_MEMO)

    def _load_tiny(self) -> None:
        from caphuman_bench.models.identity_encoder import IdentityEncoder
        from caphuman_bench.pipelines.tiny import build_tiny_caphuman_pipeline

        self.pipe = build_tiny_caphuman_pipeline(seed=0)
        if self._backbone_path() is not None:  # a tiny SD-1.5-layout model, in the tests
            from caphuman_bench.loaders.convert_caphuman import overlay_any_backbone

            overlay_any_backbone({n: getattr(self.pipe, n) for n in ("unet", "vae", "text_encoder")}, None, self._backbone_path())
        self.pipe = self.pipe.to(self.device, self.dtype)
        token_dim = self.pipe.capface.config.image_token_dim
        self.identity_encoder = IdentityEncoder.random(image_token_dim=token_dim, seed=0, device=self.device)
        self.load_head_models(self.device, tiny=True)

    def _load_full(self) -> None:
        from caphuman_bench.loaders.convert_caphuman import load_caphuman_components
        from caphuman_bench.models.face_parser import FaceParser
        from caphuman_bench.models.identity_encoder import IdentityEncoder, load_facenet
        from caphuman_bench.pipelines.pipeline_caphuman import CapHumanPipeline

        paths = self.context.weights
        overlay = self.params.get("backbone") == "realistic_vision"
        components = load_caphuman_components(
            paths["caphuman_ckpt"],
            backbone_path=paths["realistic_vision_v3"] if overlay else self._backbone_path(),
            vae_path=paths["vae_ft_mse"] if overlay else None,
            device=self.device,
            dtype=self.dtype,
        )
        clip_vision = components.pop("image_encoder")
        self.pipe = CapHumanPipeline(**components)
        self.identity_encoder = IdentityEncoder(
            load_facenet(paths["facenet_vggface2"]).to(dtype=self.dtype), clip_vision,
            FaceParser.from_file(paths["face_parser_bisenet"]), self.device,
        )
        self.load_head_models(self.device, tiny=False)

    # ------------------------------------------------------------------------------------------
    # per-run pre-computation, cached in the run directory

    def identity_tokens(self, identity_id: str, reference: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens [1, N, D], ID embedding [1, 1, 512]) in float32 on the CPU."""
        if identity_id in self._tokens:
            return self._tokens[identity_id]
        key = self._fingerprint(reference)
        path = self._cache_path("identity", f"{identity_id}.{key}.safetensors")
        from safetensors.torch import load_file

        cached = read_cached(path, lambda p: load_file(str(p))) if path is not None else None
        if cached is not None and {"image_tokens", "id_embedding"} <= set(cached):
            tokens = (cached["image_tokens"], cached["id_embedding"])
        else:
            encoded = self.identity_encoder([reference])
            if not encoded.face_found[0]:
                log.warning("identity %s: MTCNN found no face; FaceNet sees the whole photo (official fallback)", identity_id)
            tokens = (encoded.image_tokens.float().cpu(), encoded.id_embedding.float().cpu())
            if path is not None:
                from safetensors.torch import save

                data = save({"image_tokens": tokens[0].contiguous(), "id_embedding": tokens[1].contiguous()},
                            metadata={"face_found": json.dumps(encoded.face_found)})
                atomic_write(path, lambda fh: fh.write(data))
        self._tokens[identity_id] = tokens
        return tokens

    # ------------------------------------------------------------------------------------------
    # generation

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        batch_size = max(1, int(self.params.get("batch_size", 1)))
        images: list[Image.Image] = []
        for start in range(0, len(requests), batch_size):
            images.extend(self._generate_batch(requests[start : start + batch_size]))
        return images

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        sizes = {(r.height, r.width) for r in requests}
        if len(sizes) != 1 or any(h != w for h, w in sizes):
            raise BenchError(f"caphuman: a batch needs one square size, got {sorted(sizes)}")
        size = sizes.pop()[0]
        hints, image_tokens, id_embeddings = [], [], []
        for request in requests:
            tokens, embedding = self.identity_on_device(request.identity_id, request.reference)
            image_tokens.append(tokens)
            id_embeddings.append(embedding)
            hints.append(self.condition_image(request, size))
        negative = str(self.params.get("negative_prompt", ""))
        padding = self._compiled_padding(len(requests))
        if padding:  # a compiled pipeline keeps one batch shape: a short last batch would recompile
            requests = requests + [replace(requests[-1], generator=torch.Generator().manual_seed(0))] * padding
            hints, image_tokens, id_embeddings = hints + [hints[-1]] * padding, image_tokens + [image_tokens[-1]] * padding, \
                id_embeddings + [id_embeddings[-1]] * padding
        with attention_backend(self.levers):
            output = self._call_pipe(requests, hints, image_tokens, id_embeddings, negative)
        return list(output.images)[: len(requests) - padding]

    def identity_on_device(self, identity_id: str, reference: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """`identity_tokens` on the device in the model's dtype, kept like the head conditions: a batch
        concatenates them there instead of copying 67 MB of float32 tokens over at every batch."""
        tokens = self._device_tokens.get(identity_id)
        if tokens is None:
            tokens = tuple(t.to(self.device, self.dtype) for t in self.identity_tokens(identity_id, reference))
            self._device_tokens.put(identity_id, tokens)
        return tokens

    def condition_image(self, request: GenerationRequest, size: int) -> torch.Tensor:
        """The request's head condition [9, size, size] on the device in the model's dtype, kept for the
        next tasks of the same identity × condition (its 35 prompts): a batch is then stacked on the
        device, not assembled from ~600 MB of float32 on the host and copied over at every batch."""
        key = self.render_key(request.identity_id, request.condition, size)
        hint = self._hints.get(key)
        if hint is None:
            render = self.head_render(request.identity_id, request.reference, request.condition, size)
            hint = torch.from_numpy(render.hint).to(self.device, self.dtype)
            self._hints.put(key, hint)
        return hint

    def _compiled_padding(self, count: int) -> int:
        if self.levers.compile == "off":
            return 0
        return max(0, int(self.params.get("batch_size", 1)) - count)

    def _call_pipe(self, requests, hints, image_tokens, id_embeddings, negative):
        return self.pipe(
            [r.prompt for r in requests],
            condition_image=torch.stack(hints).to(self.device, self.dtype),
            image_tokens=torch.cat(image_tokens).to(self.device, self.dtype),
            id_embedding=torch.cat(id_embeddings).to(self.device, self.dtype),
            negative_prompt=[negative] * len(requests),
            num_inference_steps=int(self.params.get("num_inference_steps", 20)),
            guidance_scale=float(self.params.get("guidance_scale", 7.0)),
            eta=float(self.params.get("eta", 0.0)),
            tau=float(self.params.get("tau", 0)),
            use_global=bool(self.params.get("use_global", True)),
            use_local=bool(self.params.get("use_local", True)),
            generator=[r.generator for r in requests],
            output_type="pil",
        )
