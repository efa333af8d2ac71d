"""One training step of our Textual Inversion, DreamBooth (± prior preservation) and LoRA recipes against
diffusers' v0.25.0 example scripts, run by their own main() (tests/data/finetune_recipes, README there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from caphuman_bench.errors import BenchError
from caphuman_bench.conformance import conformance_checks, conformance_command, run_conformance
from caphuman_bench.conformance import finetune_recipes

REFERENCE = Path(__file__).parent / "data" / "finetune_recipes"
CASES = {"textual_inversion": ["textual_inversion"], "dreambooth": ["dreambooth", "dreambooth_prior"], "lora": ["lora"]}


@pytest.mark.parametrize("recipe", list(CASES))
def test_one_step_matches_the_example_script(recipe):
    report = run_conformance(recipe)
    assert report.passed, [(r.case, r.output, r.max_rel) for r in report.failures()]
    assert conformance_checks()[recipe].default_reference() == REFERENCE
    for case in CASES[recipe]:
        outputs = [r.output.split(" ")[0] for r in report.rows if r.case == case]
        assert outputs == ["loss", "gradient", "update", "trained"], outputs
    assert all(r.relative and r.tolerance == 1e-4 for r in report.rows)


def test_command_exits_zero(capsys):
    assert conformance_command("lora", REFERENCE) == 0
    assert "4 passed, 0 failed" in capsys.readouterr().out


def test_dreambooth_without_prior_preservation_fails_the_prior_case(monkeypatch):
    """Defect 6 as a deviation: the script's prior-preservation step is not what our loop does without it."""
    recipe, params = finetune_recipes.CASE_PARAMS["dreambooth_prior"]
    monkeypatch.setitem(finetune_recipes.CASE_PARAMS, "dreambooth_prior",
                        (recipe, {**params, "train_with_prior_preservation": False}))
    with pytest.raises(BenchError, match=r"batch of shape \[1, .*the script's was \[2, "):  # the script: instance + class
        run_conformance("dreambooth", only=["dreambooth_prior"])


@pytest.mark.parametrize("change", [{"train_prior_loss_weight": 0.5}, {"train_max_grad_norm": 1e-3}])
def test_a_different_prior_weight_or_clipping_fails(monkeypatch, change):
    recipe, params = finetune_recipes.CASE_PARAMS["dreambooth_prior"]
    monkeypatch.setitem(finetune_recipes.CASE_PARAMS, "dreambooth_prior", (recipe, {**params, **change}))
    report = run_conformance("dreambooth", only=["dreambooth_prior"])
    failed = {r.output.split(" ")[0] for r in report.failures()}
    assert failed >= ({"loss", "gradient"} if "train_prior_loss_weight" in change else {"gradient"}), failed
