"""Known-answer vectors for one training step of diffusers' v0.25.0 fine-tuning example scripts.

Runs the scripts themselves (`main()` of examples/textual_inversion/textual_inversion.py,
examples/dreambooth/train_dreambooth.py with and without prior preservation, and
examples/dreambooth/train_dreambooth_lora.py), imported from `--diffusers-repo`, for one optimizer step on
CPU in float32 over a tiny random SD-1.5 built here and saved in the diffusers layout. Their random draws
are fixed from outside: the VAE posterior sample, the noise and the timesteps are drawn here and handed
in (DiagonalGaussianDistribution.sample, torch.randn_like and the loop's torch.randint are patched);
the crop, flip, prompt template and class image the scripts drew are read back from the batch they
built. Stored: the tiny base model (base/), the instance and class images, every draw, the batch the
script fed its VAE, the script's loss and the trained parameters it saved. README.md says how to run it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image

RESOLUTION = 32
NUM_TRAIN_TIMESTEPS = 1000
SEED = 0
LEARNING_RATE = 1e-2  # large enough that one AdamW step stands far above float32 rounding of the weights
SUBJECT_NOUN = "woman"
SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_start": 0.00085,
                    "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                    "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon"}


def redraw(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter from `generator` (diffusers zero-initialises output convs, which would zero the gradients)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(math.prod(param.shape[1:])))


def build_base(folder: Path, tokenizer_dir: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(sample_size=RESOLUTION // 8, block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, cross_attention_dim=4, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2,
                        sample_size=RESOLUTION)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                                                num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu"))
    generator = torch.Generator().manual_seed(SEED)
    for module in (unet, vae, text_encoder):
        redraw(module, generator)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=1))
    shutil.copytree(tokenizer_dir, folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))


def make_images(folder: Path) -> dict[str, np.ndarray]:
    """A non-square reference (so Resize + RandomCrop has room) and two class images, smooth random colour fields."""
    generator = np.random.default_rng(SEED)

    def field(height: int, width: int) -> np.ndarray:
        coarse = generator.uniform(0, 255, size=(4, 4, 3))
        return np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR))

    images = {"instance": field(40, 48), "class_0": field(RESOLUTION, RESOLUTION), "class_1": field(36, RESOLUTION)}
    for name, array in images.items():
        target = folder / ("instance" if name == "instance" else "class")
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(target / f"{name}.png")
    return images


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Capture:
    """Patches that hand the scripts fixed draws and record what they computed."""

    def __init__(self, latent_eps: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> None:
        self.latent_eps, self.noise, self.timesteps = latent_eps, noise, timesteps
        self.record: dict = {}

    @contextlib.contextmanager
    def active(self):
        from accelerate import Accelerator
        from diffusers import AutoencoderKL
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_utils import ModelMixin
        from peft.utils import get_peft_model_state_dict

        originals = (DiagonalGaussianDistribution.sample, torch.randn_like, torch.randint, AutoencoderKL.encode,
                     Accelerator.backward)
        originals_lora, original_step = ModelMixin.add_adapter, torch.optim.AdamW.step
        capture = self

        def sample(self, generator=None):
            assert self.mean.shape == capture.latent_eps.shape, (self.mean.shape, capture.latent_eps.shape)
            return self.mean + self.std * capture.latent_eps

        def randn_like(tensor, *args, **kwargs):
            if tensor.shape == capture.noise.shape:
                return capture.noise.clone()
            return originals[1](tensor, *args, **kwargs)

        def randint(*args, **kwargs):
            if len(args) >= 2 and args[0] == 0 and args[1] == NUM_TRAIN_TIMESTEPS:
                return capture.timesteps.clone()
            return originals[2](*args, **kwargs)

        def encode(self, x, *args, **kwargs):
            capture.record["pixel_values"] = x.detach().clone()
            return originals[3](self, x, *args, **kwargs)

        def backward(self, loss, **kwargs):
            capture.record["loss"] = float(loss.detach())
            return originals[4](self, loss, **kwargs)

        def step(self, *args, **kwargs):  # the gradients the update uses (after clipping)
            capture.record["grads"] = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
            return original_step(self, *args, **kwargs)

        def add_adapter(self, config, adapter_name="default"):
            originals_lora(self, config, adapter_name)
            capture.record["lora_initial"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self).items()}

        DiagonalGaussianDistribution.sample = sample
        torch.randn_like, torch.randint = randn_like, randint
        AutoencoderKL.encode, Accelerator.backward = encode, backward
        ModelMixin.add_adapter, torch.optim.AdamW.step = add_adapter, step
        try:
            yield self
        finally:
            DiagonalGaussianDistribution.sample = originals[0]
            torch.randn_like, torch.randint = originals[1], originals[2]
            AutoencoderKL.encode, Accelerator.backward = originals[3], originals[4]
            ModelMixin.add_adapter, torch.optim.AdamW.step = originals_lora, original_step


def draws_for(batch: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latent = (batch, 4, RESOLUTION // 8, RESOLUTION // 8)
    return {"latent_eps": torch.randn(latent, generator=generator), "noise": torch.randn(latent, generator=generator),
            "timesteps": torch.randint(NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)}


def dreambooth_transform(array: np.ndarray) -> tuple[np.ndarray, int]:
    """Resize(shorter side, bilinear) as torchvision does; the caller finds the crop by matching."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    return np.asarray(resize(Image.fromarray(array), RESOLUTION, interpolation=InterpolationMode.BILINEAR))


def find_crop(resized: np.ndarray, pixels: torch.Tensor) -> list[int]:
    target = pixels.permute(1, 2, 0).numpy()
    for top in range(resized.shape[0] - RESOLUTION + 1):
        for left in range(resized.shape[1] - RESOLUTION + 1):
            crop = resized[top : top + RESOLUTION, left : left + RESOLUTION].astype(np.float32) / 127.5 - 1.0
            if np.abs(crop - target).max() < 1e-6:
                return [top, left]
    raise AssertionError("no crop of the resized image equals the script's batch")


def run_dreambooth(repo: Path, base: Path, data: Path, images: dict, work: Path, prior: bool, lora: bool) -> dict:
    script = repo / "examples" / "dreambooth" / ("train_dreambooth_lora.py" if lora else "train_dreambooth.py")
    module = load_script(script, "train_dreambooth_lora" if lora else "train_dreambooth")
    output = work / ("lora" if lora else "dreambooth") / ("prior" if prior else "plain")
    args = ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data / "instance"),
            "--output_dir", str(output), "--instance_prompt", f"a photo of sks {SUBJECT_NOUN}", "--resolution", str(RESOLUTION),
            "--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--learning_rate", str(LEARNING_RATE),
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", "1", "--seed", str(SEED),
            "--mixed_precision", "no", "--checkpointing_steps", "1000"]
    if lora:
        args += ["--rank", "4"]
    if prior:
        args += ["--with_prior_preservation", "--prior_loss_weight", "1.0", "--class_data_dir", str(data / "class"),
                 "--class_prompt", f"a photo of {SUBJECT_NOUN}", "--num_class_images", "2"]
    draws = draws_for(2 if prior else 1, SEED + 1 + 2 * lora + prior)
    capture = Capture(**draws)
    with capture.active():
        module.main(module.parse_args(args))
    pixels = capture.record["pixel_values"]
    case = {"crop": find_crop(dreambooth_transform(images["instance"]), pixels[0])}
    if prior:
        for index in (0, 1):
            resized = dreambooth_transform(images[f"class_{index}"])
            with contextlib.suppress(AssertionError):
                case["class_crop"] = find_crop(resized, pixels[1])
                case["class_image"] = index
                break
        assert "class_image" in case
    tensors = {f"{k}": v for k, v in draws.items()}
    tensors["pixel_values"] = pixels
    tensors.update({f"grad/{i:04d}": g for i, g in enumerate(capture.record["grads"])})
    if lora:
        tensors.update({f"lora_initial/{k}": v for k, v in capture.record["lora_initial"].items()})
        trained = safetensors.torch.load_file(output / "pytorch_lora_weights.safetensors")
        tensors.update({f"trained/{k}": v for k, v in trained.items()})
    else:
        trained = safetensors.torch.load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
        tensors.update({f"trained/{k}": v for k, v in trained.items()})
    case["loss"] = capture.record["loss"]
    return case, tensors


def run_textual_inversion(repo: Path, base: Path, data: Path, images: dict, work: Path) -> tuple[dict, dict]:
    module = load_script(repo / "examples" / "textual_inversion" / "textual_inversion.py", "textual_inversion")
    output = work / "textual_inversion"
    sys.argv = ["textual_inversion.py", "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data / "instance"),
                "--learnable_property", "object", "--placeholder_token", "<identity>", "--initializer_token", SUBJECT_NOUN,
                "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
                "--max_train_steps", "1", "--learning_rate", str(LEARNING_RATE), "--scale_lr", "--lr_scheduler", "constant",
                "--lr_warmup_steps", "0", "--seed", str(SEED), "--mixed_precision", "no", "--output_dir", str(output)]
    draws = draws_for(1, SEED + 10)
    capture = Capture(**draws)
    chosen = []

    class RecordingRandom:  # the dataset's `random.choice(self.templates)`: which template it drew
        def __getattr__(self, name):
            return getattr(random, name)

        def choice(self, sequence):
            chosen.append(random.choice(sequence))
            return chosen[-1]

    module.random = RecordingRandom()
    with capture.active():
        module.main()
    template = module.imagenet_templates_small.index(chosen[0])
    pixels = capture.record["pixel_values"][0].permute(1, 2, 0).numpy()
    resized = np.asarray(Image.fromarray(images["instance"]).resize((RESOLUTION, RESOLUTION), resample=Image.BICUBIC))
    flips = [flip for flip in (False, True)
             if np.abs((resized[:, ::-1] if flip else resized).astype(np.float32) / 127.5 - 1.0 - pixels).max() < 1e-6]
    assert len(flips) == 1
    tensors = {**draws, "pixel_values": capture.record["pixel_values"]}
    (embedding_grad,) = capture.record["grads"]
    tensors["grad/0000"] = embedding_grad[-1:]  # the placeholder's row (the token added last); the rest is restored
    tensors.update({f"trained/{k}": v for k, v in safetensors.torch.load_file(output / "learned_embeds.safetensors").items()})
    return {"flip": flips[0], "template": template, "loss": capture.record["loss"]}, tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-repo", type=Path, required=True, help="a checkout of huggingface/diffusers at v0.25.0")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with the CLIP tokenizer (see README)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    import diffusers
    import peft
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = work / "base"
        build_base(base, args.tokenizer)
        images = make_images(work / "data")
        cases, tensors = {}, {}
        for name, run in (
            ("textual_inversion", lambda: run_textual_inversion(args.diffusers_repo, base, work / "data", images, work)),
            ("dreambooth", lambda: run_dreambooth(args.diffusers_repo, base, work / "data", images, work, False, False)),
            ("dreambooth_prior", lambda: run_dreambooth(args.diffusers_repo, base, work / "data", images, work, True, False)),
            ("lora", lambda: run_dreambooth(args.diffusers_repo, base, work / "data", images, work, False, True)),
        ):
            case, case_tensors = run()
            cases[name] = case
            tensors.update({f"{name}/{k}": v.contiguous() for k, v in case_tensors.items()})
        out = args.out
        if (out / "base").exists():
            shutil.rmtree(out / "base")
        for part in ("unet", "vae", "text_encoder", "scheduler"):
            shutil.copytree(base / part, out / "base" / part)
        for name, array in images.items():
            Image.fromarray(array).save(out / f"{name}.png")
        safetensors.torch.save_file(tensors, out / "cases.safetensors")
        (out / "cases.json").write_text(json.dumps({
            "diffusers_tag": "v0.25.0", "resolution": RESOLUTION, "learning_rate": LEARNING_RATE, "seed": SEED,
            "subject": f"a {SUBJECT_NOUN}", "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                                              "transformers": transformers.__version__, "peft": peft.__version__},
            "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
