"""Arc2Face's identity condition: an ArcFace embedding written into the CLIP text encoder's input.

Arc2Face (Paraperas Papantoniou et al., ECCV 2024; foivospar/Arc2Face, MIT) fine-tunes SD-1.5's
UNet and CLIP text encoder so that the fixed prompt "photo of a id person" carries a face: the
token embedding of "id" is replaced by the unit-norm ArcFace embedding, zero-padded from 512 to the
encoder's width (768), and the encoder runs on as usual (position embeddings added, causal
attention, final layernorm). The user's text prompt plays no part. (`arc2face/utils.py`
`project_face_embs`; `arc2face/models.py` `CLIPTextModelWrapper` only adds the token-embedding
input.)

Here transformers' own `CLIPTextModel` runs unchanged; a forward hook on its token-embedding layer
swaps in the face embeddings for the one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

ID_PROMPT = "photo of a id person"  # arc2face/utils.py project_face_embs
ID_WORD = "id"


def id_token_mask(tokenizer: CLIPTokenizer, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T] of the fixed prompt, bool mask [B, T] of the "id" token)."""
    id_token = tokenizer.encode(ID_WORD, add_special_tokens=False)[0]
    input_ids = tokenizer(ID_PROMPT, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids.repeat(batch_size, 1)
    return input_ids, input_ids == id_token


@torch.no_grad()
def arc2face_prompt_embeds(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, face_embeddings: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings [N, T, D] for N ArcFace embeddings [N, E] (E ≤ D), normalised here to unit length."""
    width = text_encoder.config.hidden_size
    if face_embeddings.ndim != 2 or face_embeddings.shape[1] > width:
        raise ValueError(f"face embeddings must be [N, E] with E <= {width}, got {list(face_embeddings.shape)}")
    device = text_encoder.device
    unit = F.normalize(face_embeddings.float(), dim=1)
    padded = F.pad(unit, (0, width - unit.shape[1])).to(device, text_encoder.dtype)
    input_ids, mask = id_token_mask(tokenizer, len(face_embeddings))
    input_ids, mask = input_ids.to(device), mask.to(device)

    def swap_in_faces(module, inputs, output):
        output = output.clone()
        output[mask] = padded
        return output

    hook = text_encoder.embeddings.token_embedding.register_forward_hook(swap_in_faces)
    try:
        return text_encoder(input_ids)[0]
    finally:
        hook.remove()
