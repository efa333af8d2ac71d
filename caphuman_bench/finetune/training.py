"""Per-identity fine-tuning on the single reference photo: Textual Inversion, DreamBooth, LoRA.

Our own loop on diffusers, transformers and peft, following diffusers' example scripts at v0.25.0
(December 2023, the release of CapHuman's time): `examples/textual_inversion/textual_inversion.py`,
`examples/dreambooth/train_dreambooth.py`, `examples/dreambooth/train_dreambooth_lora.py`. As there:

* the loss is the MSE between the UNet's ε-prediction and the noise added, at a uniformly drawn DDPM
  timestep, to the VAE latent (`latent_dist.sample()` × `scaling_factor`) of the augmented reference;
* AdamW with the scripts' argparse defaults (β 0.9 / 0.999, weight decay 1e-2, ε 1e-8), a constant
  learning rate without warm-up (the README commands), gradient accumulation; DreamBooth and LoRA clip
  the gradient norm at `train_max_grad_norm` (1.0), Textual Inversion does not clip;
* Textual Inversion: `train_num_vectors` new tokens initialised from the subject's noun ("woman"), a
  random `imagenet_templates_small` prompt per sample, the photo resized to resolution² (bicubic, no
  crop) and flipped with p = 0.5; only the new rows of the token-embedding matrix change (the others
  are restored after every step); `train_scale_lr` multiplies the rate by accumulation × batch size;
* DreamBooth: the whole UNet trains, text encoder and VAE frozen; prompt "a photo of sks woman";
  shorter side resized to the resolution (bilinear) and a random square crop; no prior preservation
  (the README's first recipe);
* LoRA (DreamBooth-LoRA): peft `LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian")` on
  the UNet's attention projections only, the DreamBooth data and prompt; saved with diffusers'
  `save_lora_weights`, loaded at generation with `load_lora_weights`.

Differences, on purpose: one process; bfloat16 autocast on CUDA (`train_dtype`) instead of accelerate's
fp16 with a gradient scaler; every random draw (augmentation, prompt template, noise, timestep, VAE
sample) from one `torch.Generator` seeded per identity, so an artefact can be made again bit for bit on
the same machine; no validation images or intermediate checkpoints.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from caphuman_bench.atomic import atomic_write
from caphuman_bench.errors import BenchError
from caphuman_bench.finetune.components import SD15Components

RECIPES = ("textual_inversion", "dreambooth", "lora")
ADAMW = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}  # the three scripts' argparse defaults
# LoRA's target modules in train_dreambooth_lora.py; SD-1.5's UNet has no add_k_proj / add_v_proj.
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TI_FLIP_P = 0.5  # TextualInversionDataset's flip_p
# textual_inversion.py's prompts for `--learnable_property object` (imagenet_templates_small).
IMAGENET_TEMPLATES_SMALL = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
TRAIN_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def identity_phrase(recipe: str, subject: str, params: dict[str, Any]) -> str:
    """What stands for the identity in a prompt instead of the subject phrase ("a woman"):
    Textual Inversion's token takes the noun's place ("a <identity>"), DreamBooth's rare identifier goes
    before it ("a sks woman", the README's "a sks dog")."""
    words = subject.split()
    if not words:
        raise BenchError("an identity's subject phrase is empty; the fine-tuning prompts need its noun")
    if recipe == "textual_inversion":
        return " ".join([*words[:-1], str(params["train_placeholder_token"])])
    return " ".join([*words[:-1], str(params["train_identifier"]), words[-1]])


@dataclass
class TrainedArtefact:
    recipe: str
    tensors: dict[str, torch.Tensor]  # the artefact file's content
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        """One safetensors file, written atomically (a killed save leaves only a temp file, which the next
        `finetune` removes); LoRA's laid out by diffusers' `save_lora_weights`."""
        import safetensors.torch

        def write(tensors: dict[str, torch.Tensor], target) -> None:
            payload = safetensors.torch.save(tensors, metadata={"format": "pt"})
            atomic_write(target, lambda fh: fh.write(payload))

        if self.recipe != "lora":
            write(self.tensors, path)
            return
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=self.tensors, weight_name=path.name,
                                                  save_function=write)

    def details(self) -> dict[str, Any]:
        return {"steps": len(self.losses), "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None, "seconds": round(self.seconds, 2)}


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Frozen, in eval mode, on the device; cast only when the dtype changes (diffusers warns on every cast)."""
    module.to(device).requires_grad_(False).eval()
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


class Trainer:
    """Holds the base model on the device and fine-tunes a fresh copy of it for each identity."""

    def __init__(self, recipe: str, base: SD15Components, params: dict[str, Any], device: str | torch.device) -> None:
        from diffusers import DDPMScheduler

        if recipe not in RECIPES:
            raise BenchError(f"unknown fine-tuning recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
        self.recipe, self.base, self.params = recipe, base, params
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        # Frozen parts in the autocast dtype (the scripts' weight_dtype); what trains stays float32.
        self.dtype = TRAIN_DTYPES[str(params.get("train_dtype", "bfloat16"))] if on_cuda else torch.float32
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        _place(base.vae, self.device, self.dtype)
        _place(base.text_encoder, self.device, torch.float32 if recipe == "textual_inversion" else self.dtype)
        _place(base.unet, self.device, torch.float32 if recipe == "dreambooth" else self.dtype)

    def train(self, reference: Image.Image, subject: str, seed: int) -> TrainedArtefact:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        setup = {"textual_inversion": self._textual_inversion, "dreambooth": self._dreambooth, "lora": self._lora}
        artefact = setup[self.recipe](reference.convert("RGB"), subject, generator)
        artefact.seconds = time.perf_counter() - started
        return artefact

    # -- the three recipes --------------------------------------------------------------------

    def _textual_inversion(self, reference: Image.Image, subject: str, generator: torch.Generator) -> TrainedArtefact:
        p = self.params
        tokenizer = self.base.fresh_tokenizer()
        placeholder = str(p["train_placeholder_token"])
        tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, int(p["train_num_vectors"]))]
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise BenchError(f"parameter 'train_placeholder_token' {placeholder!r} is already a token of the tokenizer; choose another")
        noun = subject.split()[-1]
        noun_ids = tokenizer.encode(noun, add_special_tokens=False)
        if len(noun_ids) != 1:
            raise BenchError(f"subject noun {noun!r} is not a single token; Textual Inversion initialises its token from it")
        text_encoder = copy.deepcopy(self.base.text_encoder)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set just below
        embeddings = text_encoder.get_input_embeddings().weight
        token_ids = tokenizer.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            embeddings[token_ids] = embeddings[noun_ids[0]].clone()
        embeddings.requires_grad_(True)
        original = embeddings.detach().clone()
        frozen_rows = torch.ones(len(tokenizer), dtype=torch.bool)
        frozen_rows[token_ids] = False

        def restore_other_rows() -> None:
            with torch.no_grad():
                embeddings[frozen_rows] = original[frozen_rows]

        prompt_text = " ".join(tokens)
        resized = np.asarray(reference.resize((int(p["train_resolution"]),) * 2, resample=Image.BICUBIC))

        def sample() -> tuple[np.ndarray, str]:
            image = resized[:, ::-1] if torch.rand(1, generator=generator).item() < TI_FLIP_P else resized
            template = IMAGENET_TEMPLATES_SMALL[int(torch.randint(len(IMAGENET_TEMPLATES_SMALL), (1,), generator=generator))]
            return image, template.format(prompt_text)

        rate = float(p["train_learning_rate"])
        if p.get("train_scale_lr"):
            rate *= int(p["train_gradient_accumulation_steps"]) * int(p["train_batch_size"])
        text_encoder.train()
        losses = self._optimise([embeddings], rate, None, sample, tokenizer, text_encoder, self.base.unet, generator,
                                after_step=restore_other_rows)
        return TrainedArtefact(self.recipe, {placeholder: embeddings[token_ids].detach().float().cpu().contiguous()}, losses)

    def _dreambooth(self, reference: Image.Image, subject: str, generator: torch.Generator) -> TrainedArtefact:
        unet = copy.deepcopy(self.base.unet).requires_grad_(True).train()
        trainable = list(unet.parameters())
        losses = self._optimise(trainable, float(self.params["train_learning_rate"]), float(self.params["train_max_grad_norm"]),
                                self._instance_sampler(reference, subject, generator), self.base.tokenizer,
                                self.base.text_encoder, unet, generator)
        save_dtype = SAVE_DTYPES[str(self.params.get("train_save_dtype", "float16"))]
        return TrainedArtefact(self.recipe, {k: v.detach().to("cpu", save_dtype).contiguous()
                                             for k, v in unet.state_dict().items()}, losses)

    def _lora(self, reference: Image.Image, subject: str, generator: torch.Generator) -> TrainedArtefact:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        rank = int(self.params["train_rank"])
        unet = copy.deepcopy(self.base.unet)
        # peft draws the LoRA A matrices from torch's global generator: seed it from this identity's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGET_MODULES))
        trainable = [param for param in unet.parameters() if param.requires_grad]
        for param in trainable:
            param.data = param.data.float()  # LoRA weights train in float32 over the frozen half-precision UNet
        unet.train()
        losses = self._optimise(trainable, float(self.params["train_learning_rate"]), float(self.params["train_max_grad_norm"]),
                                self._instance_sampler(reference, subject, generator), self.base.tokenizer,
                                self.base.text_encoder, unet, generator)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        return TrainedArtefact(self.recipe, {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}, losses)

    # -- shared -------------------------------------------------------------------------------

    def _instance_sampler(self, reference: Image.Image, subject: str, generator: torch.Generator):
        """DreamBooth's data: Resize(shorter side, bilinear) then RandomCrop, the instance prompt."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        size = int(self.params["train_resolution"])
        resized = np.asarray(resize(reference, size, interpolation=InterpolationMode.BILINEAR))
        prompt = f"a photo of {self.params['train_identifier']} {subject.split()[-1]}"  # "a photo of sks dog"

        def sample() -> tuple[np.ndarray, str]:
            top = int(torch.randint(resized.shape[0] - size + 1, (1,), generator=generator))
            left = int(torch.randint(resized.shape[1] - size + 1, (1,), generator=generator))
            return resized[top : top + size, left : left + size], prompt

        return sample

    def _optimise(self, trainable: list[torch.nn.Parameter], learning_rate: float, max_grad_norm: float | None,
                  sample: Callable[[], tuple[np.ndarray, str]], tokenizer, text_encoder, unet,
                  generator: torch.Generator, after_step: Callable[[], None] | None = None) -> list[float]:
        p = self.params
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, **ADAMW)
        accumulation, batch_size = int(p["train_gradient_accumulation_steps"]), int(p["train_batch_size"])
        text_trains = any(param.requires_grad for param in text_encoder.parameters())
        losses = []
        for _ in range(int(p["train_steps"])):
            step_loss = 0.0
            for _ in range(accumulation):
                images, prompts = zip(*(sample() for _ in range(batch_size)))
                loss = self._denoising_loss(np.stack(images), list(prompts), tokenizer, text_encoder, unet, generator,
                                            text_trains)
                (loss / accumulation).backward()
                step_loss += loss.item() / accumulation
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            losses.append(step_loss)
        return losses

    def _denoising_loss(self, images: np.ndarray, prompts: list[str], tokenizer, text_encoder, unet,
                        generator: torch.Generator, text_trains: bool) -> torch.Tensor:
        vae, scheduler = self.base.vae, self.noise_scheduler
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            latents = vae.encode(pixels.to(self.device, self.dtype)).latent_dist.sample(generator=generator)
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(prompts),), generator=generator).to(self.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids.to(self.device)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast, torch.set_grad_enabled(text_trains):
            hidden = text_encoder(ids)[0]
        with autocast:
            prediction = unet(noisy, timesteps, hidden).sample
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise BenchError(f"scheduler prediction_type {scheduler.config.prediction_type!r}: expected epsilon or v_prediction")
        return F.mse_loss(prediction.float(), target.float())
