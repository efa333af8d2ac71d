"""What the fine-tuning baselines (`textual_inversion`, `dreambooth`, `lora`) share at generation time.

Each identity gets its own weights, trained on its reference photo by `caphuman-bench finetune`
(`caphuman_bench/finetune/`, stored under `<runs-dir>/finetune/<recipe>-<training hash>/<identity>/`).
`run` does not train on demand: planning a run looks the artefacts up (`artefacts`), stops with one
line naming the `finetune` command when one is missing or does not verify, and records each one's
path and sha256 in `run.json` and in the configuration hash. Before an identity's first image the
adapter hashes its file again and refuses one that changed since planning.

Generation is diffusers' `StableDiffusionPipeline` over the same SD-1.5 the artefacts were trained
from, with the identity phrase ("a sks woman", "a <identity>") in place of the subject phrase. With
`controlnet_head: true` (the `*_controlnet_head` cards, the paper's "+ ControlNet" rows) it is
`StableDiffusionControlNetPipeline` with ControlNet normalbae on the normals of the same head render
CapHuman is steered by (`HeadRenderMixin`, `normals_to_controlnet_image`), as `ip_adapter_controlnet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.finetune.artefacts import ArtefactStore
from caphuman_bench.finetune.training import SAVE_DTYPES, TRAIN_DTYPES
from caphuman_bench.methods.base import GenerationRequest, MethodAdapter, check_latent_size, consecutive_batches
from caphuman_bench.methods.head_renders import HeadRenderMixin, head_weights, normals_to_controlnet_image
from caphuman_bench.weights import sha256_of

BASE_WEIGHTS = ("stable_diffusion_v1_5",)
CONTROLNET_WEIGHTS = ("controlnet_normalbae_sd15",)
# DreamBooth's prior preservation (train_dreambooth.py / train_dreambooth_lora.py --with_prior_preservation)
PRIOR_PRESERVATION_PARAMS = {"train_with_prior_preservation": bool, "train_prior_loss_weight": float,
                             "train_num_class_images": int, "train_class_prompt": str}
SCHEDULERS = ("pndm", "dpm_solver_multistep", "ddim")  # pndm: SD-1.5's own scheduler_config.json


class FineTunedMethod(HeadRenderMixin, MethodAdapter):
    recipe: ClassVar[str]  # the `caphuman_bench.finetune.training` recipe
    swap_adds_modules: ClassVar[bool] = False  # apply_artefact adds modules (LoRA layers): no torch.compile then
    param_types = {
        **MethodAdapter.param_types,
        "num_inference_steps": int,
        "guidance_scale": float,
        "negative_prompt": str,
        "scheduler": str,
        "controlnet_head": bool,
        "controlnet_conditioning_scale": float,
        "mixing": str,
        "dtype": str,
        "tiny": bool,
        # training (every `train_*` parameter is part of the artefacts' training hash)
        "train_steps": int,
        "train_batch_size": int,
        "train_gradient_accumulation_steps": int,
        "train_learning_rate": float,
        "train_resolution": int,
        "train_seed": int,
        "train_dtype": str,
    }

    # -- checks and planning ------------------------------------------------------------------

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        super().check_params(params, where)
        if str(params.get("scheduler", "pndm")) not in SCHEDULERS:
            raise BenchError(f"{where}: parameter 'scheduler' must be one of {', '.join(SCHEDULERS)}, got {params['scheduler']!r}")
        if str(params.get("train_dtype", "bfloat16")) not in TRAIN_DTYPES:
            raise BenchError(f"{where}: parameter 'train_dtype' must be one of {', '.join(TRAIN_DTYPES)}, got {params['train_dtype']!r}")
        if "train_save_dtype" in params and str(params["train_save_dtype"]) not in SAVE_DTYPES:
            raise BenchError(f"{where}: parameter 'train_save_dtype' must be one of {', '.join(SAVE_DTYPES)}, "
                             f"got {params['train_save_dtype']!r}")
        if params.get("train_with_prior_preservation"):
            if "{}" not in str(params.get("train_class_prompt", "")):
                raise BenchError(f"{where}: parameter 'train_class_prompt' must hold '{{}}' for the subject's noun "
                                 f"(\"a photo of {{}}\"), got {params.get('train_class_prompt')!r}")
        for name in ("train_steps", "train_batch_size", "train_gradient_accumulation_steps", "train_num_vectors", "train_rank",
                     "train_num_class_images"):
            if name in params and int(params[name]) < 1:
                raise BenchError(f"{where}: parameter {name!r} must be at least 1, got {params[name]}")
        check_latent_size(params, where, square=bool(params.get("controlnet_head")), names=("height", "width", "train_resolution"))

    @classmethod
    def training_weights(cls, params: dict[str, Any]) -> list[str]:
        """What `finetune` needs: the base model only."""
        return [] if params.get("tiny") else list(BASE_WEIGHTS)

    @classmethod
    def required_weights(cls, card, params: dict[str, Any]) -> list[str]:
        if params.get("tiny"):
            return []
        return [*BASE_WEIGHTS, *((*CONTROLNET_WEIGHTS, *head_weights(params)) if params.get("controlnet_head") else ())]

    @classmethod
    def artefacts(cls, card, params: dict[str, Any], bench, identity_ids: list[str], runs_dir: Path) -> dict[str, dict]:
        store = ArtefactStore(runs_dir, cls.recipe, params)
        found, problems = {}, []
        for identity_id in identity_ids:
            artefact, reason = store.verify(identity_id, bench.reference_sha256(identity_id),
                                            bench.identities[identity_id].subject, full=False)
            if artefact is None:
                problems.append(f"{identity_id}: {reason}")
            else:
                found[identity_id] = artefact.to_run_json(runs_dir)
        if problems:
            raise BenchError(f"{card.name}: {len(problems)} of {len(identity_ids)} identities have no usable fine-tuned weights "
                             f"under {store.root} (first: {problems[0]}); run `caphuman-bench finetune --method {card.name}` "
                             "with this run's --split, --preset, --param and --runs-dir first")
        return found

    # -- generation ---------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionControlNetPipeline,
                               StableDiffusionPipeline)

        from caphuman_bench.finetune.components import load_controlnet, load_sd15

        self.device = torch.device(self.context.device)
        self.dtype = self.compute_dtype(self.device)
        tiny = bool(self.params.get("tiny"))
        base = load_sd15(self.context.weights.get("stable_diffusion_v1_5"), tiny=tiny)
        scheduler_class = {"pndm": PNDMScheduler, "dpm_solver_multistep": DPMSolverMultistepScheduler,
                           "ddim": DDIMScheduler}[str(self.params.get("scheduler", "pndm"))]
        components = {"vae": base.vae, "text_encoder": base.text_encoder, "tokenizer": base.tokenizer, "unet": base.unet,
                      "scheduler": scheduler_class.from_config(base.scheduler_config), "safety_checker": None,
                      "feature_extractor": None, "requires_safety_checker": False}
        if self.params.get("controlnet_head"):
            controlnet = load_controlnet(self.context.weights.get("controlnet_normalbae_sd15"), tiny=tiny, dtype=self.dtype)
            self.pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **components)
            self.load_head_models(self.device, tiny=tiny)
        else:
            self.pipe = StableDiffusionPipeline(**components)
        self.pipe.to(self.device, dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        # fused copies would miss each identity's swapped-in weights; swapped-in modules would recompile per identity
        self.pipe = self.accelerate(self.pipe, fuse_qkv=False, **({"compile": "off"} if self.swap_adds_modules else {}))
        self._active: str | None = None
        self._verified: set[str] = set()

    def apply_artefact(self, path: Path) -> None:
        """Put one identity's fine-tuned weights into `self.pipe`, replacing the previous identity's."""
        raise NotImplementedError

    def _activate(self, identity_id: str) -> dict:
        """The identity's planned artefact, verified against its planned sha256 and loaded into the pipeline."""
        planned = self.context.artefacts.get(identity_id)  # its path already made absolute by the generate stage
        if planned is None:
            raise BenchError(f"{self.card.name}: this run was planned without fine-tuned weights for identity {identity_id!r}; "
                             f"run `caphuman-bench finetune --method {self.card.name}`, then `run` again")
        path = Path(planned["path"])
        if identity_id not in self._verified:
            if not path.exists() or sha256_of(path) != planned["sha256"]:
                raise BenchError(f"{path}: missing, or its sha256 is not the one this run was planned with; "
                                 f"run `caphuman-bench finetune --method {self.card.name}` (it retrains it), then `run` again")
            self._verified.add(identity_id)
        if self._active != identity_id:
            self.apply_artefact(path)
            self._active = identity_id
        return planned

    def head_target(self, identity_id: str, reference: Image.Image, condition):
        """The mixed head code with ControlNet; nothing without (the method ignores the head condition)."""
        return super().head_target(identity_id, reference, condition) if self.params.get("controlnet_head") else None

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        """Batches of consecutive requests of one identity: the pipeline holds one identity's weights at a time."""
        batch_size = int(self.params.get("batch_size", 1))
        return [image for batch in consecutive_batches(requests, batch_size) for image in self._generate_batch(batch)]

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        planned = self._activate(requests[0].identity_id)
        prompts = []
        for request in requests:
            if planned["subject"] not in request.prompt:
                raise BenchError(f"{self.card.name}: prompt {request.prompt!r} does not hold the subject phrase "
                                 f"{planned['subject']!r} the identity {request.identity_id!r} was fine-tuned for")
            prompts.append(request.prompt.replace(planned["subject"], planned["identity_phrase"], 1))
        sizes = {(r.height, r.width) for r in requests}
        if len(sizes) != 1:
            raise BenchError(f"{self.card.name}: a batch needs one size, got {sorted(sizes)}")
        height, width = sizes.pop()
        extra = {}
        if self.params.get("controlnet_head"):
            extra = {"image": [self._control_image(r) for r in requests],
                     "controlnet_conditioning_scale": float(self.params.get("controlnet_conditioning_scale", 1.0))}
        output = self.pipe(
            prompts,
            negative_prompt=[str(self.params.get("negative_prompt", ""))] * len(requests),
            height=height,
            width=width,
            num_inference_steps=int(self.params.get("num_inference_steps", 50)),
            guidance_scale=float(self.params.get("guidance_scale", 7.5)),
            generator=[r.generator for r in requests],
            output_type="pil",
            **extra,
        )
        return list(output.images)

    def _control_image(self, request: GenerationRequest) -> Image.Image:
        render = self.head_render(request.identity_id, request.reference, request.condition, request.height)
        return normals_to_controlnet_image(render.normal)
