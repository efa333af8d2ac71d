"""The `lora` baseline (Hu et al., ICLR 2022, as DreamBooth-LoRA): rank-`train_rank` LoRA matrices on
SD-1.5's UNet attention projections, trained per identity on its reference photo with the prompt
"a photo of sks woman" (`caphuman_bench/finetune/training.py`, peft).

Generation loads the identity's file with diffusers' `load_lora_weights` (scale 1) after unloading the
previous identity's (`unload_lora_weights`), and prompts with "a sks woman".
"""

from __future__ import annotations

from pathlib import Path

from caphuman_bench.methods._finetuned import PRIOR_PRESERVATION_PARAMS, FineTunedMethod
from caphuman_bench.registry import register_method


@register_method("lora")
class LoRAMethod(FineTunedMethod):
    recipe = "lora"
    swap_adds_modules = True  # each identity's LoRA layers are loaded after the previous one's are unloaded
    param_types = {**FineTunedMethod.param_types, "train_max_grad_norm": float, "train_identifier": str,
                   "train_rank": int, **PRIOR_PRESERVATION_PARAMS}

    def apply_artefact(self, path: Path) -> None:
        if self._active is not None:
            self.pipe.unload_lora_weights()
        self.pipe.load_lora_weights(str(path.parent), weight_name=path.name)
