"""The InstantID port against the authors' pipeline's reference vectors (tests/data/instantid)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from caphuman_bench.conformance import conformance_command
from caphuman_bench.conformance.instantid import RELATIVE_TOLERANCE, run_conformance
from caphuman_bench.errors import BenchError
from caphuman_bench.pipelines import pipeline_instantid
from caphuman_bench.pipelines.pipeline_instantid import StableDiffusionXLInstantIDPipeline

REFERENCE = Path(__file__).parent / "data" / "instantid"


@pytest.fixture(scope="module")
def report():
    return run_conformance(REFERENCE)


def test_every_case_and_output_is_within_tolerance(report):
    assert report.passed, [(r.case, r.output, r.max_rel) for r in report.failures()]
    checked = {(r.case, r.output) for r in report.rows}
    for case in ("prompt0_seed0", "prompt1_seed1"):
        for output in ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids", "image_tokens", "controlnet_context",
                       "control_image", "controlnet_down_00", "controlnet_mid", "timesteps", "noise_pred", "latents"):
            assert (case, output) in checked
    assert {("both_prompts_batched", "noise_pred"), ("both_prompts_batched", "latents")} <= checked
    assert {("draw_kps_1024x1024", "rgb"), ("draw_kps_1280x1024", "rgb")} <= checked
    assert all(r.max_abs == 0 for r in report.rows if r.output == "rgb")
    noise = next(r for r in report.rows if r.output == "noise_pred")
    assert noise.relative and noise.tolerance == RELATIVE_TOLERANCE


def test_command_prints_a_table_and_exits_zero(capsys):
    assert conformance_command("instantid", REFERENCE) == 0
    out = capsys.readouterr().out
    assert "both_prompts_batched" in out and "0 failed" in out


def test_face_in_the_unconditional_half_fails(monkeypatch):
    """The authors' unconditional branch sees the Resampler of a zero embedding, not the face."""
    original = StableDiffusionXLInstantIDPipeline.face_embeds

    def face_in_both_halves(self, face_embedding, batch, guided, dtype):
        (face,) = original(self, face_embedding, batch, False, dtype)
        return [torch.cat([face, face]) if guided else face]

    monkeypatch.setattr(StableDiffusionXLInstantIDPipeline, "face_embeds", face_in_both_halves)
    failed = {r.output for r in run_conformance(REFERENCE, only=["prompt0_seed0"]).failures()}
    assert {"image_tokens", "controlnet_context", "controlnet_mid", "noise_pred", "latents"} <= failed
    assert "prompt_embeds" not in failed and "control_image" not in failed


def test_sdxl_default_original_size_fails(monkeypatch):
    """SDXL's usual micro-conditioning (original size 1024²) instead of the image's own size, as the authors."""
    original = StableDiffusionXLInstantIDPipeline._get_add_time_ids

    def at_1024(self, original_size, crops_coords_top_left, target_size, **kwargs):
        return original(self, (1024, 1024), crops_coords_top_left, target_size, **kwargs)

    monkeypatch.setattr(StableDiffusionXLInstantIDPipeline, "_get_add_time_ids", at_1024)
    failed = {r.output for r in run_conformance(REFERENCE, only=["prompt0_seed0"]).failures()}
    assert {"add_time_ids", "noise_pred", "latents"} <= failed
    assert "image_tokens" not in failed


def test_limbs_not_dimmed_fails_the_drawing(monkeypatch):
    monkeypatch.setattr(pipeline_instantid, "LIMB_DIMMING", 1.0)
    report = run_conformance(REFERENCE, only=["draw_kps_1024x1024"])
    assert [(r.case, r.passed) for r in report.rows] == [("draw_kps_1024x1024", False)]


def test_unknown_case_and_missing_file_are_named(tmp_path):
    with pytest.raises(BenchError, match="no case named"):
        run_conformance(REFERENCE, only=["nope"])
    shutil.copytree(REFERENCE, tmp_path / "ref")
    (tmp_path / "ref" / "ip-adapter.safetensors").unlink()
    with pytest.raises(BenchError, match="ip-adapter.safetensors"):
        run_conformance(tmp_path / "ref", only=["prompt0_seed0"])
