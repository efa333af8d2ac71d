"""CapHuman's identity encoder: a reference photo → (local image tokens, global ID embedding).

What the official inference script (github.com/VamosC/CapHuman `inference.py`, commit 6fb4966) does,
reproduced here from PIL images:

* **global**: `MTCNN(image_size=160)` (margin 0, largest face, prewhitened (x − 127.5) / 128) on the
  reference → facenet-pytorch `InceptionResnetV1` (vggface2) → 512-d, L2-normalised inside the
  network's forward → [B, 1, 512]. When MTCNN finds no face the official code falls back to the
  whole photo resized to 160 × 160 and scaled to [0, 1] (no prewhitening); so does this module,
  and it reports `face_found=False` for that image.
* **local**: the reference whitened by the BiSeNet face parser (`FaceParser.whiten`: background,
  ears, earrings, neck, necklace, cloth, hair, hat → white) → CLIP image preprocessing of
  `CLIPProcessor("openai/clip-vit-large-patch14")` (shortest edge 224 with PIL bicubic, centre crop
  224, CLIP mean/std; the PIL backend, as transformers 4.24 did) → `CLIPVisionModel`
  `last_hidden_state` (the encoder output, before `post_layernorm`, which transformers applies to the
  pooled CLS only) → [B, 257, 1024] for ViT-L/14.

The CLIP vision weights are not OpenAI's download but the copy inside `caphuman.ckpt`
(`control_cond_stage_model.transformer.*`, frozen during training, so the same numbers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.weights import load_torch_file
from caphuman_bench.models.face_parser import BiSeNet, FaceParser

CAPHUMAN_CLIP_VISION_PREFIX = "control_cond_stage_model.transformer."
FACENET_INPUT_SIZE = 160


def clip_vit_l14_vision_config():
    """The published `openai/clip-vit-large-patch14` vision configuration (no download needed)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def clip_vision_state_dict_from_caphuman(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The CLIP vision tensors of an official CapHuman state dict, in today's `CLIPVisionModel` names.

    Checkpoints saved under the repo's transformers 4.24 name them
    `control_cond_stage_model.transformer.vision_model.*` and also hold the `position_ids` buffer
    (an arange, checked and dropped); transformers ≥ 5 has no `vision_model.` level.
    """
    picked = {k[len(CAPHUMAN_CLIP_VISION_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CAPHUMAN_CLIP_VISION_PREFIX)}
    if not picked:
        raise BenchError(f"{source}: no CLIP vision weights (keys starting with {CAPHUMAN_CLIP_VISION_PREFIX!r})")
    renamed = {k.removeprefix("vision_model."): v for k, v in picked.items()}
    position_ids = renamed.pop("embeddings.position_ids", None)
    if position_ids is not None and not torch.equal(position_ids.reshape(-1).long(), torch.arange(position_ids.numel())):
        raise BenchError(f"{source}: {CAPHUMAN_CLIP_VISION_PREFIX}vision_model.embeddings.position_ids is not 0..N-1")
    return renamed


def load_clip_vision(state_dict: dict[str, torch.Tensor], source: str, config=None):
    """A `CLIPVisionModel` (ViT-L/14 unless `config`) holding exactly `state_dict`; errors name keys."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionModel

    with init_empty_weights():  # parameters on `meta`: no 1.2 GB random init before loading
        model = CLIPVisionModel(config or clip_vit_l14_vision_config())
    _check_keys(model.state_dict(), state_dict, f"{source}: CLIP vision ({CAPHUMAN_CLIP_VISION_PREFIX}*)")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def load_facenet(path: str | os.PathLike):
    """facenet-pytorch `InceptionResnetV1` with the weights file at `path` (e.g. vggface2 `.pt`).

    The file's `logits.*` classifier (8631 VGGFace2 identities) is not needed for embeddings and
    is dropped; every other key must match.
    """
    from facenet_pytorch import InceptionResnetV1

    path = Path(path)
    state_dict = load_torch_file(path, "FaceNet weights")
    if not isinstance(state_dict, dict):
        raise BenchError(f"{path}: FaceNet weights must be a state dict, got {type(state_dict).__name__}")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("logits.")}
    model = InceptionResnetV1(pretrained=None, classify=False)
    _check_keys(model.state_dict(), state_dict, f"{path}: FaceNet InceptionResnetV1")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], where: str) -> None:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing:
        raise BenchError(f"{where}: missing key(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise BenchError(f"{where}: unexpected key(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for key, value in given.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise BenchError(f"{where}: key {key!r} has shape {list(value.shape)}, expected {list(expected[key].shape)}")


@dataclass
class IdentityTokens:
    """What CapFace's context is made of, for a batch of reference photos."""

    image_tokens: torch.Tensor  # [B, N, D]: CLIP vision last_hidden_state of the whitened reference
    id_embedding: torch.Tensor  # [B, 1, 512]: L2-normalised FaceNet embedding
    face_found: list[bool]  # MTCNN found a face (else the official whole-image fallback was used)


class IdentityEncoder(nn.Module):
    """Reference photos → `IdentityTokens`; reusable by any method that needs CapHuman's ID features."""

    def __init__(self, facenet: nn.Module, clip_vision: nn.Module, face_parser: FaceParser, device: str | torch.device = "cpu"):
        super().__init__()
        from facenet_pytorch import MTCNN
        from transformers import CLIPImageProcessorPil

        self.facenet = facenet.eval()
        self.clip_vision = clip_vision.eval()
        self.face_parser = face_parser.eval()
        # MTCNN keeps its own device attribute: build it for the target device, never move it later.
        self.mtcnn = MTCNN(image_size=FACENET_INPUT_SIZE, margin=0, device=torch.device(device))
        self.clip_processor = CLIPImageProcessorPil()
        self.to(device)

    @classmethod
    def from_pretrained_files(
        cls,
        facenet_path: str | os.PathLike,
        face_parser_path: str | os.PathLike,
        clip_vision_state_dict: dict[str, torch.Tensor],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "caphuman checkpoint",
    ) -> "IdentityEncoder":
        """Real weights: vggface2 FaceNet, `79999_iter.pth`, and the CLIP vision tensors of an
        official CapHuman state dict (the whole dict may be passed; `source` names it in errors)."""
        clip_vision = load_clip_vision(clip_vision_state_dict_from_caphuman(clip_vision_state_dict, source), source)
        encoder = cls(load_facenet(facenet_path), clip_vision, FaceParser.from_file(face_parser_path), device)
        # MTCNN and the face parser's argmax stay in float32; the two embedding networks follow `dtype`.
        encoder.facenet.to(dtype=dtype)
        encoder.clip_vision.to(dtype=dtype)
        return encoder

    @classmethod
    def random(cls, image_token_dim: int | None = None, seed: int = 0, device: str | torch.device = "cpu") -> "IdentityEncoder":
        """Random weights, for tests and the smoke preset. Real MTCNN (it ships with facenet-pytorch).

        With `image_token_dim`, ViT-L/14 is replaced by a 2-layer CLIP vision model of that width
        with 56-pixel patches (17 tokens at 224 px); without, it is the full ViT-L/14 architecture.
        FaceNet and BiSeNet always keep their full architecture.
        """
        from facenet_pytorch import InceptionResnetV1
        from transformers import CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(seed)
        if image_token_dim is None:
            config = clip_vit_l14_vision_config()
        else:
            config = CLIPVisionConfig(hidden_size=image_token_dim, intermediate_size=2 * image_token_dim, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=224, patch_size=56, hidden_act="quick_gelu")
        return cls(InceptionResnetV1(pretrained=None, classify=False), CLIPVisionModel(config), FaceParser(BiSeNet()), device)

    @property
    def device(self) -> torch.device:
        return next(self.clip_vision.parameters()).device

    @torch.no_grad()
    def encode_global(self, images: list[Image.Image]) -> tuple[torch.Tensor, list[bool]]:
        """[B, 1, 512] FaceNet embeddings (unit L2 norm) and whether MTCNN found each face."""
        from torchvision import transforms

        fallback = transforms.Compose([transforms.Resize((FACENET_INPUT_SIZE, FACENET_INPUT_SIZE)), transforms.ToTensor()])
        crops, found = [], []
        for image in images:
            crop = self.mtcnn(image.convert("RGB"))
            found.append(crop is not None)
            crops.append(crop if crop is not None else fallback(image.convert("RGB")))
        dtype = next(self.facenet.parameters()).dtype
        embeddings = self.facenet(torch.stack(crops).to(self.device, dtype))
        return embeddings.unsqueeze(1), found

    @torch.no_grad()
    def whitened_references(self, images: list[Image.Image]) -> list[Image.Image]:
        return [self.face_parser.whiten(image) for image in images]

    @torch.no_grad()
    def encode_local(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, N, D] CLIP vision tokens of the face-parsed (whitened) references."""
        return self.encode_whitened(self.whitened_references(images))

    @torch.no_grad()
    def encode_whitened(self, whitened: list[Image.Image]) -> torch.Tensor:
        pixels = self.clip_processor(images=whitened, return_tensors="pt")["pixel_values"]
        dtype = next(self.clip_vision.parameters()).dtype
        return self.clip_vision(pixel_values=pixels.to(self.device, dtype)).last_hidden_state

    @torch.no_grad()
    def forward(self, images: list[Image.Image]) -> IdentityTokens:
        id_embedding, found = self.encode_global(images)
        return IdentityTokens(self.encode_local(images), id_embedding, found)
