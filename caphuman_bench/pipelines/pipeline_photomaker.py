"""PhotoMaker (TencentARC, v1 and v2) as a diffusers SDXL pipeline.

Read from the authors' `photomaker/pipeline.py` (`PhotoMakerStableDiffusionXLPipeline`,
`encode_prompt_with_trigger_word`, `__call__`); not on PyPI (the PyPI name `photomaker` is an unrelated
package) and not in diffusers 0.42, hence this port. What it does, as the authors' code:

1. The prompt carries the trigger word right after the class word ("a photo of a woman img ...").
   Both tokenizers know the trigger as an added special token; it is removed, and the class token
   before it repeated `tokens_per_image × number of ID images` times (v1: 1 per image, v2: 2), the ids
   padded / truncated to 77. Both text encoders run on those ids (penultimate hidden states,
   concatenated; pooled output of the second), and the ID encoder fuses the ID tokens into the class
   positions (`caphuman_bench.models.photomaker`).
2. The same prompt without the trigger word is encoded the ordinary SDXL way (`encode_prompt`, with
   the negative prompt).
3. Denoising steps 0 … `start_merge_step` use the text-only embeddings (prompt and pooled), later steps
   the ID-fused ones ("delayed subject conditioning"); the negative branch is the negative prompt
   throughout. Here that switch is a `callback_on_step_end` of diffusers' own SDXL loop, which swaps
   `prompt_embeds` and `add_text_embeds` after step `start_merge_step`.

The LoRA of the checkpoint goes into the UNet with diffusers' `load_lora_weights` and is fused, as the
authors' README does (`pipe.fuse_lora()`).

`caphuman-bench conformance photomaker` / `photomaker_v2` check all of this against the authors' pipeline
(tests/data/photomaker). Unlike the authors' pipeline, which takes one prompt, this one takes a list sharing
the ID images (each row equals the single-prompt result); the text-only prompt drops the trigger from the
string where the authors decode the ids without it (the same ids for every shipped prompt).
"""

from __future__ import annotations

import re

import torch
from diffusers import StableDiffusionXLPipeline

from caphuman_bench.models.photomaker import TOKENS_PER_IMAGE


def id_image_processor(side: int = 224):
    """The authors' `CLIPImageProcessor()` as their transformers 4 ran it (PIL bicubic resize, center crop, CLIP
    mean / std). transformers 5's `CLIPImageProcessor` is torchvision-backed and moves the ID pixel values by up
    to 0.015 (tests/data/photomaker); its PIL backend reproduces them exactly."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size=side, crop_size=side)


class PhotoMakerStableDiffusionXLPipeline(StableDiffusionXLPipeline):
    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, id_encoder,
                 feature_extractor, image_encoder=None, trigger_word: str = "img",
                 force_zeros_for_empty_prompt: bool = True) -> None:
        super().__init__(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor,
                         image_encoder=image_encoder,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
        self.register_modules(id_encoder=id_encoder)
        self.register_to_config(trigger_word=trigger_word)
        for tok in (self.tokenizer, self.tokenizer_2):
            tok.add_tokens([trigger_word], special_tokens=True)

    def load_photomaker_lora(self, lora_state_dict: dict[str, torch.Tensor]) -> None:
        """The checkpoint's `lora_weights` (diffusers' attention-processor LoRA format) into the UNet, fused."""
        self.load_lora_weights(dict(lora_state_dict), adapter_name="photomaker")
        self.fuse_lora()

    def class_token_ids(self, tokenizer, prompt: str, num_id_images: int) -> tuple[list[int], list[bool]]:
        """Token ids with the trigger removed and the class token before it repeated; the mask of those copies."""
        trigger_id = tokenizer.convert_tokens_to_ids(self.config.trigger_word)
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        positions = [i for i, token in enumerate(ids) if token == trigger_id]
        if len(positions) != 1:
            raise ValueError(f"PhotoMaker needs the trigger word {self.config.trigger_word!r} exactly once, after the "
                             f"class word; prompt {prompt!r} has it {len(positions)} times")
        class_index = positions[0] - 1
        clean = [token for token in ids if token != trigger_id]
        copies = num_id_images * TOKENS_PER_IMAGE[self.id_encoder.version]
        expanded = clean[:class_index] + [clean[class_index]] * copies + clean[class_index + 1:]
        max_len = tokenizer.model_max_length
        expanded = (expanded + [tokenizer.pad_token_id] * max_len)[:max_len]
        mask = [class_index <= i < class_index + copies for i in range(max_len)]
        return expanded, mask

    def encode_prompt_with_trigger_word(self, prompts: list[str], num_id_images: int, device: torch.device):
        """(prompt_embeds [B, 77, D], pooled [B, P], class_tokens_mask [B, 77]) of the class-expanded ids;
        SDXL's encoding (penultimate hidden states of both encoders, pooled output of the second)."""
        hidden, pooled, mask = [], None, None
        for tokenizer, text_encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            rows = [self.class_token_ids(tokenizer, p, num_id_images) for p in prompts]
            ids = torch.tensor([r[0] for r in rows], dtype=torch.long, device=device)
            output = text_encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
            mask = torch.tensor([r[1] for r in rows], dtype=torch.bool, device=device)  # the authors keep the last one
        embeds = torch.cat(hidden, dim=-1).to(dtype=self.text_encoder_2.dtype)
        return embeds, pooled, mask

    def without_trigger(self, prompt: str) -> str:
        return re.sub(rf"\s*\b{re.escape(self.config.trigger_word)}\b", "", prompt, count=1)

    @torch.no_grad()
    def __call__(self, prompt: list[str], input_id_images: list, id_embeds: torch.Tensor | None = None,
                 start_merge_step: int = 10, negative_prompt: list[str] | None = None, guidance_scale: float = 5.0,
                 **kwargs):
        """`prompt`: one string per image, each with the trigger word; `input_id_images`: the ID photos (PIL),
        shared by every prompt of the call; `id_embeds` (v2): their ArcFace embeddings [N, 512]."""
        device = self._execution_device
        guided = guidance_scale > 1.0
        dtype = self.unet.dtype
        fused_embeds, fused_pooled, class_mask = self.encode_prompt_with_trigger_word(prompt, len(input_id_images), device)
        text_embeds, negative_embeds, text_pooled, negative_pooled = self.encode_prompt(
            prompt=[self.without_trigger(p) for p in prompt], device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guided, negative_prompt=negative_prompt)
        pixels = self.feature_extractor(input_id_images, return_tensors="pt").pixel_values
        pixels = pixels.to(device=device, dtype=dtype)[None].expand(len(prompt), *pixels.shape)
        if id_embeds is not None:
            id_embeds = id_embeds.to(device=device, dtype=dtype)[None].expand(len(prompt), *id_embeds.shape)
        fused_embeds = self.id_encoder(pixels, fused_embeds.to(dtype), class_mask, id_embeds)

        def merge_identity(pipe, step: int, timestep, tensors: dict) -> dict:
            if step != start_merge_step:
                return {}
            if not guided:
                return {"prompt_embeds": fused_embeds, "add_text_embeds": fused_pooled}
            return {"prompt_embeds": torch.cat([negative_embeds, fused_embeds]),
                    "add_text_embeds": torch.cat([negative_pooled, fused_pooled])}

        return super().__call__(
            prompt_embeds=text_embeds, negative_prompt_embeds=negative_embeds, pooled_prompt_embeds=text_pooled,
            negative_pooled_prompt_embeds=negative_pooled, guidance_scale=guidance_scale,
            callback_on_step_end=merge_identity, callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
            **kwargs)
