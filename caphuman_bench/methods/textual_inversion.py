"""The `textual_inversion` baseline (Gal et al., ICLR 2023): one new token per identity, learned from its
reference photo (`caphuman_bench/finetune/training.py`), in SD-1.5's prompts in place of the subject's noun.

Generation loads the learned embedding with diffusers' `load_textual_inversion` ("a <identity>
wearing a red hat"); the previous identity's token is unloaded first (`unload_textual_inversion`).
"""

from __future__ import annotations

from pathlib import Path

from caphuman_bench.methods._finetuned import FineTunedMethod
from caphuman_bench.registry import register_method


@register_method("textual_inversion")
class TextualInversionMethod(FineTunedMethod):
    recipe = "textual_inversion"
    param_types = {**FineTunedMethod.param_types, "train_scale_lr": bool, "train_num_vectors": int,
                   "train_placeholder_token": str}

    def apply_artefact(self, path: Path) -> None:
        if self._active is not None:
            self.pipe.unload_textual_inversion()
        self.pipe.load_textual_inversion(str(path))
