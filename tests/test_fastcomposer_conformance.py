"""The FastComposer port against the official code's reference vectors (tests/data/fastcomposer)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import caphuman_bench.pipelines.pipeline_fastcomposer as pipeline_fastcomposer
from caphuman_bench.conformance import conformance_command
from caphuman_bench.conformance.fastcomposer import TOLERANCE, run_conformance
from caphuman_bench.models.fastcomposer import FastComposerPostfuseModule

REFERENCE = Path(__file__).parent / "data" / "fastcomposer"
CASES = ("red_hat_alpha05", "cyberpunk_img_comma_alpha07")
OUTPUTS = ("subject_input_ids", "image_token_index", "image_token_mask", "text_input_ids", "object_pixel_values",
           "object_embeds", "negative_embeds", "text_embeds", "subject_embeds", "augmented_embeds", "timesteps",
           "noise_pred", "step_latents", "latents")


@pytest.fixture(scope="module")
def report():
    return run_conformance(REFERENCE)


def test_every_case_and_output_is_within_tolerance(report):
    assert report.passed, [(r.case, r.output, r.max_rel) for r in report.failures()]
    assert {(r.case, r.output) for r in report.rows} == {(case, output) for case in CASES for output in OUTPUTS}
    assert all(r.max_abs == 0 for r in report.rows if r.output.endswith(("_ids", "_index", "_mask", "timesteps")))
    assert all(r.relative and r.tolerance == TOLERANCE for r in report.rows if r.output.endswith(("embeds", "latents")))


def test_command_prints_a_table_and_exits_zero(capsys):
    assert conformance_command("fastcomposer", REFERENCE) == 0
    out = capsys.readouterr().out
    assert "cyberpunk_img_comma_alpha07" in out and "0 failed" in out


def test_the_old_whitespace_trigger_rule_refuses_the_comma_case(monkeypatch):
    """The defect the vectors pin down: a trigger found only between spaces misses 'img,' (sty-cyberpunk)."""
    official = pipeline_fastcomposer.subject_token_ids

    def between_spaces(special, pad_token_id, prompt):
        if len(re.findall(r"(?<!\S)img(?!\S)", prompt)) != 1:
            raise ValueError(f"prompt {prompt!r} must contain the trigger word 'img' exactly once")
        return official(special, pad_token_id, prompt)

    monkeypatch.setattr(pipeline_fastcomposer, "subject_token_ids", between_spaces)
    with pytest.raises(ValueError, match="exactly once"):
        run_conformance(REFERENCE, only=["cyberpunk_img_comma_alpha07"])


def test_fusing_the_token_after_the_subject_word_fails(monkeypatch):
    official = pipeline_fastcomposer.subject_token_ids
    monkeypatch.setattr(pipeline_fastcomposer, "subject_token_ids",
                        lambda *args: (lambda ids, index: (ids, index + 1))(*official(*args)))
    failed = {r.output for r in run_conformance(REFERENCE, only=["cyberpunk_img_comma_alpha07"]).failures()}
    assert {"image_token_mask", "augmented_embeds", "noise_pred", "latents"} <= failed
    assert "text_embeds" not in failed and "object_embeds" not in failed


def test_layer_norm_before_the_residual_mlp_fails(monkeypatch):
    """fuse = LayerNorm(mlp2(h)) officially; normalising h first changes the fused token and every later step."""
    def swapped(self, text_embeds, object_embeds):
        fused = self.mlp1(torch.cat([text_embeds, object_embeds], dim=-1)) + text_embeds
        return self.mlp2(self.layer_norm(fused))

    monkeypatch.setattr(FastComposerPostfuseModule, "fuse", swapped)
    failed = {r.output for r in run_conformance(REFERENCE, only=["red_hat_alpha05"]).failures()}
    assert {"augmented_embeds", "noise_pred", "latents"} <= failed and "subject_embeds" not in failed
