"""Does one step of our fine-tuning recipes compute what diffusers' v0.25.0 example scripts compute?

`tests/data/finetune_recipes/` (README there) holds one optimizer step of `textual_inversion.py`,
`train_dreambooth.py` (with and without prior preservation) and `train_dreambooth_lora.py`, run by their
own `main()` on a tiny random SD-1.5 (`base/`, diffusers layout) with the draws fixed from outside.
`Trainer` takes the same step here from the same base, image, crop/flip/template/class image, VAE sample,
noise, timesteps (and LoRA initialisation), through `RecordedDraws`. Compared, each relative to the
largest reference value: the loss, the gradients the optimizer step used (after clipping), and the
trained parameters' change (after − before: one AdamW step, so a sign error in any gradient shows as
2 × the rate) and values.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from caphuman_bench.conformance import register_conformance
from caphuman_bench.conformance.base import ConformanceReport, compare, required
from caphuman_bench.errors import BenchError
from caphuman_bench.finetune.components import SD15Components
from caphuman_bench.finetune.training import Draws, Trainer

VECTORS = "finetune_recipes"
TOLERANCE = 1e-4  # relative, float32 on CPU (the bound)
ADAM_STEADY_GRADIENT = 1e-5  # 1000 x AdamW's eps: nearer 0 one step's size follows the gradient's float32 noise
RECIPE_CASES = {"textual_inversion": ("textual_inversion",), "dreambooth": ("dreambooth", "dreambooth_prior"),
                "lora": ("lora",)}
# The scripts' command lines in make_vectors.py, as our parameters (float32: the CPU trains in float32).
COMMON = {"train_steps": 1, "train_batch_size": 1, "train_gradient_accumulation_steps": 1, "train_seed": 0,
          "train_dtype": "float32"}
DREAMBOOTH = {**COMMON, "train_max_grad_norm": 1.0, "train_identifier": "sks", "train_save_dtype": "float32",
              "train_with_prior_preservation": False, "train_prior_loss_weight": 1.0, "train_num_class_images": 2,
              "train_class_prompt": "a photo of {}"}
CASE_PARAMS = {
    "textual_inversion": ("textual_inversion", {**COMMON, "train_scale_lr": True, "train_num_vectors": 1,
                                                "train_placeholder_token": "<identity>"}),
    "dreambooth": ("dreambooth", DREAMBOOTH),
    "dreambooth_prior": ("dreambooth", {**DREAMBOOTH, "train_with_prior_preservation": True}),
    "lora": ("lora", {**DREAMBOOTH, "train_rank": 4}),
}


class RecordedDraws(Draws):
    """The draws the script made in one case, handed out in the order our loop asks for them."""

    def __init__(self, case: dict, tensors: dict[str, torch.Tensor], name: str) -> None:
        self.case, self.tensors, self.name = case, tensors, name
        self.crops = [case[k] for k in ("crop", "class_crop") if k in case]
        self.templates = [case["template"]] if "template" in case else []

    def _tensor(self, key: str) -> torch.Tensor:
        full = f"{self.name}/{key}"
        if full not in self.tensors:
            raise BenchError(f"cases.safetensors: tensor {full!r} is missing")
        return self.tensors[full]

    def flip(self) -> bool:
        return bool(self.case["flip"])

    def choice(self, count: int) -> int:
        return int(self.templates.pop(0))

    def order(self, count: int) -> list[int]:
        """The class image the script's first batch held, first."""
        first = int(self.case["class_image"])
        return [first] + [i for i in range(count) if i != first]

    def crop(self, height_room: int, width_room: int) -> tuple[int, int]:
        top, left = self.crops.pop(0)
        return int(top), int(left)

    def latents(self, distribution) -> torch.Tensor:
        eps = self._tensor("latent_eps")
        if tuple(eps.shape) != tuple(distribution.mean.shape):
            raise BenchError(f"case {self.name!r}: the loop encodes a batch of shape {list(distribution.mean.shape)}, "
                             f"the script's was {list(eps.shape)}")
        return distribution.mean + distribution.std * eps.to(distribution.mean)

    def noise(self, shape: torch.Size) -> torch.Tensor:
        noise = self._tensor("noise")
        if tuple(noise.shape) != tuple(shape):
            raise BenchError(f"case {self.name!r}: the loop asks for noise of shape {list(shape)}, the script drew {list(noise.shape)}")
        return noise

    def timesteps(self, count: int, num_train_timesteps: int) -> torch.Tensor:
        return self._tensor("timesteps")

    def add_lora(self, unet: torch.nn.Module, config) -> None:
        from peft.utils import set_peft_model_state_dict

        unet.add_adapter(config)
        prefix = f"{self.name}/lora_initial/"
        initial = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(unet, initial)
        if getattr(result, "unexpected_keys", None):
            raise BenchError(f"case {self.name!r}: LoRA weights the UNet has no place for: {result.unexpected_keys[:3]}")


def load_base(reference_dir: Path) -> SD15Components:
    """The tiny SD-1.5 of the vectors (base/, diffusers layout; the tokenizer is CLIP's, built offline)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from caphuman_bench.loaders.convert_caphuman import clip_tokenizer

    base = required(reference_dir, "base")
    scheduler_config = json.loads(required(base, "scheduler/scheduler_config.json").read_text())
    return SD15Components(
        vae=AutoencoderKL.from_pretrained(base / "vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder", local_files_only=True),
        tokenizer=clip_tokenizer(77),
        unet=UNet2DConditionModel.from_pretrained(base / "unet", local_files_only=True),
        scheduler_config={k: v for k, v in scheduler_config.items() if not k.startswith("_")},
    )


def _flat(tensors: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().double().flatten() for k in keys])


def check_case(reference_dir: Path, name: str, meta: dict, tensors: dict[str, torch.Tensor], device: str) -> list:
    recipe, params = CASE_PARAMS[name]
    case = meta["cases"][name]
    params = {**params, "train_learning_rate": float(meta["learning_rate"]), "train_resolution": int(meta["resolution"])}
    base = load_base(reference_dir)
    before_unet = {k: v.clone() for k, v in base.unet.state_dict().items()}
    reference = Image.open(required(reference_dir, "instance.png")).convert("RGB")
    class_images = [required(reference_dir, f"class_{i}.png") for i in (0, 1)]
    gradients = []
    artefact = Trainer(recipe, base, params, device).train(reference, meta["subject"], seed=0, class_images=class_images,
                                                           draws=RecordedDraws(case, tensors, name),
                                                           observe_gradients=lambda grads: gradients.extend(grads))
    rows = [compare(name, "loss", torch.tensor([artefact.losses[0]]), torch.tensor([float(case["loss"])]), TOLERANCE,
                    relative=True)]
    grad_keys = sorted(k for k in tensors if k.startswith(f"{name}/grad/"))
    if recipe == "textual_inversion":
        gradients = [gradients[0][-1:]]  # the placeholder's row, as stored
    if len(gradients) != len(grad_keys):
        raise BenchError(f"case {name!r}: {len(gradients)} trained parameters here, the script trained {len(grad_keys)}")
    reference_grad = torch.cat([tensors[k].double().flatten() for k in grad_keys])
    rows.append(compare(name, f"gradient ({len(grad_keys)} tensors)", torch.cat([g.double().flatten() for g in gradients]),
                        reference_grad, TOLERANCE, relative=True))
    prefix = f"{name}/trained/"
    trained = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if recipe == "textual_inversion":
        noun = base.tokenizer.encode(meta["subject"].split()[-1], add_special_tokens=False)[0]
        start = {"<identity>": base.text_encoder.get_input_embeddings().weight[noun].detach()[None]}
        ours = artefact.tensors
    elif recipe == "dreambooth":
        start, ours = before_unet, artefact.tensors
    else:  # the script saved peft names under "unet."; ours are the same state dict, converted for diffusers' loader
        start = {f"unet.{k[len(name) + len('/lora_initial/'):]}": v for k, v in tensors.items()
                 if k.startswith(f"{name}/lora_initial/")}
        ours = _lora_as_saved(artefact.tensors, trained)
    keys = list(ours)  # the trained parameters' order, which the gradients follow
    if sorted(keys) != sorted(trained):
        raise BenchError(f"case {name!r}: trained tensors differ in names: ours {sorted(set(keys) - set(trained))[:3]}, "
                         f"script's {sorted(set(trained) - set(keys))[:3]}")
    if [t.numel() for t in gradients] != [ours[k].numel() for k in keys]:
        raise BenchError(f"case {name!r}: the gradients do not follow the trained tensors' order")
    # Adam's first step is lr * g / (|g| + eps): where 0 < |g| < ~1000 eps its size hangs on float32 noise in g,
    # so those coordinates are left out of the update rows (the gradient row covers them); g = 0 (LoRA's A
    # before B moves) leaves the weight decay alone, which is compared.
    steady = (reference_grad.abs() >= ADAM_STEADY_GRADIENT) | (reference_grad == 0)
    label = f"{len(keys)} tensors" if len(keys) > 1 else keys[0]
    if not steady.all():
        label += f"; {int((~steady).sum())} of {steady.numel()} with 0 < |grad| < {ADAM_STEADY_GRADIENT:g} left out"
    ours_update, reference_update = _flat(ours, keys) - _flat(start, keys), _flat(trained, keys) - _flat(start, keys)
    rows.append(compare(name, f"update ({label})", ours_update[steady], reference_update[steady], TOLERANCE, relative=True))
    rows.append(compare(name, f"trained ({label})", _flat(ours, keys)[steady], _flat(trained, keys)[steady], TOLERANCE,
                        relative=True))
    return rows


def _lora_as_saved(ours: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our artefact's LoRA names mapped onto the script's (peft's lora_A / lora_B under "unet.")."""
    renamed = {}
    for key, value in ours.items():
        name = key if key.startswith("unet.") else f"unet.{key}"
        name = name.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        renamed[name] = value
    return renamed


def run_recipe(recipe: str, reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    meta = json.loads(required(reference_dir, "cases.json").read_text())
    tensors = load_file(required(reference_dir, "cases.safetensors"))
    report = ConformanceReport(Path(reference_dir), f"diffusers {meta['diffusers_tag']} example scripts, one step")
    for name in RECIPE_CASES[recipe]:
        if only and name not in only:
            continue
        if name not in meta["cases"]:
            raise BenchError(f"{reference_dir}/cases.json: case {name!r} missing")
        report.rows += check_case(Path(reference_dir), name, meta, tensors, device)
    return report


@register_conformance("textual_inversion", vectors=VECTORS)
def textual_inversion(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    return run_recipe("textual_inversion", reference_dir, device, only)


@register_conformance("dreambooth", vectors=VECTORS)
def dreambooth(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    return run_recipe("dreambooth", reference_dir, device, only)


@register_conformance("lora", vectors=VECTORS)
def lora(reference_dir: Path, device: str = "cpu", only: list[str] | None = None) -> ConformanceReport:
    return run_recipe("lora", reference_dir, device, only)
