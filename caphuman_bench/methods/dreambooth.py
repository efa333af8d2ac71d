"""The `dreambooth` baseline (Ruiz et al., CVPR 2023): SD-1.5's whole UNet fine-tuned per identity on its
reference photo with the prompt "a photo of sks woman" and, by default, the paper's prior preservation on
class images the base model made from "a photo of woman" (`caphuman_bench/finetune/training.py`).

Generation loads the identity's UNet weights into the pipeline's UNet (strict: every key, every
shape) and prompts with "a sks woman" in place of the subject phrase.
"""

from __future__ import annotations

from pathlib import Path

from caphuman_bench.methods._finetuned import PRIOR_PRESERVATION_PARAMS, FineTunedMethod
from caphuman_bench.registry import register_method


@register_method("dreambooth")
class DreamBoothMethod(FineTunedMethod):
    recipe = "dreambooth"
    param_types = {**FineTunedMethod.param_types, "train_max_grad_norm": float, "train_identifier": str,
                   "train_save_dtype": str, **PRIOR_PRESERVATION_PARAMS}

    def apply_artefact(self, path: Path) -> None:
        import safetensors.torch

        self.pipe.unet.load_state_dict(safetensors.torch.load_file(path), strict=True)
