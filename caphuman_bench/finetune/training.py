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
  shorter side resized to the resolution (bilinear) and a random square crop; with prior preservation
  (`train_with_prior_preservation`, the paper's and the README's recipe for faces) each example pairs
  the reference with one of `train_num_class_images` class images that the base model made from the
  class prompt ("a photo of woman"), both go through the UNet in one batch, and the loss is the
  instance MSE + `train_prior_loss_weight` × the class MSE (`ClassImages` makes and keeps them);
* LoRA (DreamBooth-LoRA): peft `LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian")` on
  the UNet's attention projections only, the DreamBooth data and prompt; saved with diffusers'
  `save_lora_weights`, loaded at generation with `load_lora_weights`.

Differences, on purpose: one process; bfloat16 autocast on CUDA (`train_dtype`) instead of accelerate's
fp16 with a gradient scaler; every random draw (augmentation, prompt template, noise, timestep, VAE
sample, class image) from one `torch.Generator` seeded per identity (`Draws`), so an artefact can be made
again bit for bit on the same machine; class images from a generator seeded per image index (the script's
are unseeded); no validation images or intermediate checkpoints.

One step of each recipe equals the scripts' own step (loss, gradients, update) within 1e-4 relative in
float32: `caphuman_bench/conformance/finetune_recipes.py` on `tests/data/finetune_recipes/`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from caphuman_bench.atomic import atomic_write, write_json_atomic
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
CLASS_IMAGE_BATCH = 4  # train_dreambooth.py's --sample_batch_size (each image has its own generator: no effect on them)
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def prior_preservation(recipe: str, params: dict[str, Any]) -> bool:
    return recipe in ("dreambooth", "lora") and bool(params.get("train_with_prior_preservation", False))


def class_prompt(params: dict[str, Any], subject: str) -> str:
    """DreamBooth's class prompt: the instance prompt without the identifier ("a photo of woman")."""
    return str(params["train_class_prompt"]).format(subject.split()[-1])


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


class Draws:
    """Every random draw of one training run, in the order the loop makes them, from one seeded generator.

    The conformance check replaces it with the draws diffusers' example scripts made (same crop, flip,
    prompt template, class image, VAE sample, noise, timesteps and LoRA initialisation)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def flip(self) -> bool:
        return torch.rand(1, generator=self.generator).item() < TI_FLIP_P

    def choice(self, count: int) -> int:
        """A prompt template (the script's `random.choice`)."""
        return int(torch.randint(count, (1,), generator=self.generator))

    def order(self, count: int) -> list[int]:
        """One epoch's order of the class images (the script's shuffled DataLoader)."""
        return torch.randperm(count, generator=self.generator).tolist()

    def crop(self, height_room: int, width_room: int) -> tuple[int, int]:
        """RandomCrop's top and left, each in [0, room]."""
        top = int(torch.randint(height_room + 1, (1,), generator=self.generator))
        return top, int(torch.randint(width_room + 1, (1,), generator=self.generator))

    def latents(self, distribution) -> torch.Tensor:
        return distribution.sample(generator=self.generator)

    def noise(self, shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def timesteps(self, count: int, num_train_timesteps: int) -> torch.Tensor:
        return torch.randint(num_train_timesteps, (count,), generator=self.generator)

    def add_lora(self, unet: torch.nn.Module, config) -> None:
        """peft draws the LoRA A matrices from torch's global generator: seed it from this run's."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
            unet.add_adapter(config)


class ClassImages:
    """DreamBooth's class images: `count` images the base model makes from the class prompt, as
    train_dreambooth.py makes them before training (`DiffusionPipeline` defaults: SD-1.5's PNDM scheduler,
    50 steps, guidance 7.5, the UNet's native size; float16 on CUDA; saved as JPEG). Image i comes from
    a generator seeded by `train_seed`, the prompt and i, so a folder can be completed or remade image by
    image; each is written atomically and kept once there, with `class_images.json` naming the seeds."""

    RECORD = "class_images.json"

    def __init__(self, base: SD15Components, device: torch.device, dtype: torch.dtype) -> None:
        self.base, self.device, self.dtype = base, device, dtype

    @staticmethod
    def seed(train_seed: int, prompt: str, index: int) -> int:
        digest = hashlib.sha256(f"{train_seed}|{prompt}|{index}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & (2**63 - 1)

    def ensure(self, folder: Path, prompt: str, count: int, train_seed: int) -> list[Path]:
        """The `count` class images of `prompt` in `folder`, making those that are missing."""
        paths = [folder / f"{index:04d}.jpg" for index in range(count)]
        missing = [index for index, path in enumerate(paths) if not path.exists()]
        seeds = {index: self.seed(train_seed, prompt, index) for index in range(count)}
        if missing:
            pipe = self._pipeline()
            for start in range(0, len(missing), CLASS_IMAGE_BATCH):
                chunk = missing[start : start + CLASS_IMAGE_BATCH]
                images = pipe([prompt] * len(chunk), generator=[torch.Generator().manual_seed(seeds[i]) for i in chunk]).images
                for index, image in zip(chunk, images):
                    buffer = io.BytesIO()
                    image.save(buffer, format="JPEG")  # the script's `image.save(f"...{sha1}.jpg")`
                    atomic_write(paths[index], lambda fh, data=buffer.getvalue(): fh.write(data))
        write_json_atomic(folder / self.RECORD, {"prompt": prompt, "count": count, "seeds": [seeds[i] for i in range(count)],
                                                 "dtype": str(self.dtype).removeprefix("torch."), "num_inference_steps": 50,
                                                 "guidance_scale": 7.5, "scheduler": "PNDMScheduler"})
        return paths

    def _pipeline(self):
        from diffusers import PNDMScheduler, StableDiffusionPipeline

        # copies: the base model stays in float32 for the training that follows
        modules = {name: copy.deepcopy(getattr(self.base, name)) for name in ("vae", "text_encoder", "unet")}
        pipe = StableDiffusionPipeline(**modules, tokenizer=self.base.tokenizer, safety_checker=None, feature_extractor=None,
                                       scheduler=PNDMScheduler.from_config(self.base.scheduler_config),
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device, dtype=self.dtype)


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
        self._observe_gradients: Callable[[list[torch.Tensor]], None] | None = None
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        # Frozen parts in the autocast dtype (the scripts' weight_dtype); what trains stays float32.
        self.dtype = TRAIN_DTYPES[str(params.get("train_dtype", "bfloat16"))] if on_cuda else torch.float32
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        _place(base.vae, self.device, self.dtype)
        _place(base.text_encoder, self.device, torch.float32 if recipe == "textual_inversion" else self.dtype)
        _place(base.unet, self.device, torch.float32 if recipe == "dreambooth" else self.dtype)

    def train(self, reference: Image.Image, subject: str, seed: int, class_images: list[Path] = (),
              draws: Draws | None = None, observe_gradients: Callable[[list[torch.Tensor]], None] | None = None) -> TrainedArtefact:
        """`class_images`: with prior preservation, `ClassImages.ensure`'s files for this subject's class prompt.
        `observe_gradients` sees the trained parameters' gradients before each optimizer step (the conformance check)."""
        started = time.perf_counter()
        draws = draws if draws is not None else Draws(seed)
        self._observe_gradients = observe_gradients
        if self.recipe == "textual_inversion":
            artefact = self._textual_inversion(reference.convert("RGB"), subject, draws)
        else:
            if prior_preservation(self.recipe, self.params) and not class_images:
                raise BenchError(f"{self.recipe} with prior preservation needs its class images; none were given")
            samplers = [self._instance_sampler(reference.convert("RGB"), subject, draws)]
            if prior_preservation(self.recipe, self.params):
                samplers.append(self._class_sampler(class_images, subject, draws))
            artefact = (self._dreambooth if self.recipe == "dreambooth" else self._lora)(samplers, draws)
        artefact.seconds = time.perf_counter() - started
        return artefact

    # -- the three recipes --------------------------------------------------------------------

    def _textual_inversion(self, reference: Image.Image, subject: str, draws: Draws) -> TrainedArtefact:
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
            image = resized[:, ::-1] if draws.flip() else resized
            return image, IMAGENET_TEMPLATES_SMALL[draws.choice(len(IMAGENET_TEMPLATES_SMALL))].format(prompt_text)

        rate = float(p["train_learning_rate"])
        if p.get("train_scale_lr"):
            rate *= int(p["train_gradient_accumulation_steps"]) * int(p["train_batch_size"])
        text_encoder.train()
        losses = self._optimise([embeddings], rate, None, [sample], tokenizer, text_encoder, self.base.unet, draws,
                                after_step=restore_other_rows)
        return TrainedArtefact(self.recipe, {placeholder: embeddings[token_ids].detach().float().cpu().contiguous()}, losses)

    def _dreambooth(self, samplers, draws: Draws) -> TrainedArtefact:
        unet = copy.deepcopy(self.base.unet).requires_grad_(True).train()
        trainable = list(unet.parameters())
        losses = self._optimise(trainable, float(self.params["train_learning_rate"]), float(self.params["train_max_grad_norm"]),
                                samplers, self.base.tokenizer, self.base.text_encoder, unet, draws)
        save_dtype = SAVE_DTYPES[str(self.params.get("train_save_dtype", "float16"))]
        return TrainedArtefact(self.recipe, {k: v.detach().to("cpu", save_dtype).contiguous()
                                             for k, v in unet.state_dict().items()}, losses)

    def _lora(self, samplers, draws: Draws) -> TrainedArtefact:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        rank = int(self.params["train_rank"])
        unet = copy.deepcopy(self.base.unet)
        draws.add_lora(unet, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGET_MODULES))
        trainable = [param for param in unet.parameters() if param.requires_grad]
        for param in trainable:
            param.data = param.data.float()  # LoRA weights train in float32 over the frozen half-precision UNet
        unet.train()
        losses = self._optimise(trainable, float(self.params["train_learning_rate"]), float(self.params["train_max_grad_norm"]),
                                samplers, self.base.tokenizer, self.base.text_encoder, unet, draws)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        return TrainedArtefact(self.recipe, {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}, losses)

    # -- shared -------------------------------------------------------------------------------

    def _dreambooth_transform(self, image: Image.Image, draws: Draws) -> np.ndarray:
        """DreamBooth's image transform: Resize(shorter side, bilinear) then RandomCrop."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        size = int(self.params["train_resolution"])
        resized = np.asarray(resize(image, size, interpolation=InterpolationMode.BILINEAR))
        top, left = draws.crop(resized.shape[0] - size, resized.shape[1] - size)
        return resized[top : top + size, left : left + size]

    def _instance_sampler(self, reference: Image.Image, subject: str, draws: Draws):
        prompt = f"a photo of {self.params['train_identifier']} {subject.split()[-1]}"  # "a photo of sks dog"
        return lambda: (self._dreambooth_transform(reference, draws), prompt)

    def _class_sampler(self, class_images: list[Path], subject: str, draws: Draws):
        """One class image per example, each once per epoch in a shuffled order: the script's DataLoader
        (shuffle=True) over its max(class images, instance images) examples, the one reference repeated."""
        prompt = class_prompt(self.params, subject)
        epoch: list[int] = []

        def sample() -> tuple[np.ndarray, str]:
            if not epoch:
                epoch.extend(draws.order(len(class_images)))
            with Image.open(class_images[epoch.pop(0)]) as image:
                return self._dreambooth_transform(image.convert("RGB"), draws), prompt

        return sample

    def _optimise(self, trainable: list[torch.nn.Parameter], learning_rate: float, max_grad_norm: float | None,
                  samplers: list[Callable[[], tuple[np.ndarray, str]]], tokenizer, text_encoder, unet,
                  draws: Draws, after_step: Callable[[], None] | None = None) -> list[float]:
        """`samplers`: the instance sampler, and with prior preservation the class sampler; a batch holds
        `train_batch_size` instance examples then as many class examples, as the script's collate_fn."""
        p = self.params
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, **ADAMW)
        accumulation, batch_size = int(p["train_gradient_accumulation_steps"]), int(p["train_batch_size"])
        text_trains = any(param.requires_grad for param in text_encoder.parameters())
        losses = []
        for _ in range(int(p["train_steps"])):
            step_loss = 0.0
            for _ in range(accumulation):
                # drawn example by example (instance, then its class image), batched instances first
                pairs = [[sample() for sample in samplers] for _ in range(batch_size)]
                images, prompts = zip(*[pair[part] for part in range(len(samplers)) for pair in pairs])
                loss = self._denoising_loss(np.stack(images), list(prompts), tokenizer, text_encoder, unet, draws,
                                            text_trains, prior=len(samplers) > 1)
                (loss / accumulation).backward()
                step_loss += loss.item() / accumulation
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            if self._observe_gradients is not None:
                self._observe_gradients([param.grad for param in trainable])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            losses.append(step_loss)
        return losses

    def _denoising_loss(self, images: np.ndarray, prompts: list[str], tokenizer, text_encoder, unet,
                        draws: Draws, text_trains: bool, prior: bool = False) -> torch.Tensor:
        """MSE of the ε-prediction; with `prior` the batch's second half is class examples and the loss is
        instance MSE + train_prior_loss_weight × class MSE (train_dreambooth.py's torch.chunk split)."""
        vae, scheduler = self.base.vae, self.noise_scheduler
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            latents = draws.latents(vae.encode(pixels.to(self.device, self.dtype)).latent_dist)
            latents = latents * vae.config.scaling_factor
        noise = draws.noise(latents.shape).to(self.device, latents.dtype)
        timesteps = draws.timesteps(len(prompts), scheduler.config.num_train_timesteps).to(self.device)
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
        if not prior:
            return F.mse_loss(prediction.float(), target.float())
        prediction, prediction_prior = torch.chunk(prediction.float(), 2, dim=0)
        target, target_prior = torch.chunk(target.float(), 2, dim=0)
        weight = float(self.params["train_prior_loss_weight"])
        return F.mse_loss(prediction, target) + weight * F.mse_loss(prediction_prior, target_prior)
