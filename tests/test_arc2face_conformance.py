"""The arc2face adapters against Arc2Face's own code (tests/data/arc2face: foivospar/Arc2Face 8f3acd7 on tiny
random weights), and deviations that the check must catch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caphuman_bench.conformance import conformance_command
from caphuman_bench.conformance.arc2face import run_arc2face, run_arc2face_controlnet
from caphuman_bench.errors import BenchError

REFERENCE = Path(__file__).parent / "data" / "arc2face"


@pytest.fixture(scope="module")
def arc2face_report():
    return run_arc2face(REFERENCE)


@pytest.fixture(scope="module")
def controlnet_report():
    return run_arc2face_controlnet(REFERENCE)


def test_arc2face_matches_the_authors_code(arc2face_report):
    assert arc2face_report.passed, [(r.case, r.output, r.max_rel) for r in arc2face_report.failures()]
    checked = {(r.case, r.output) for r in arc2face_report.rows}
    assert ("prompt_embeds_two_identities", "prompt_embeds") in checked
    assert {("denoise_3steps_cfg3", o) for o in ("negative_prompt_embeds", "unet_out", "latents", "image")} <= checked
    assert max(r.max_rel for r in arc2face_report.rows) <= 1e-4


def test_arc2face_controlnet_matches_the_authors_code(controlnet_report):
    assert controlnet_report.passed, [(r.case, r.output, r.max_rel) for r in controlnet_report.failures()]
    checked = {(r.case, r.output) for r in controlnet_report.rows}
    assert {("control_image", "control_image"), ("ffhq_align_celeba_pad", "aligned"),
            ("ffhq_align_large_shrink", "aligned")} <= checked
    assert {("denoise_3steps_cfg3", o) for o in ("controlnet_cond", "controlnet_down_03", "controlnet_mid", "unet_out",
                                                 "latents")} <= checked
    # pixels: the ControlNet image and the FFHQ alignment are equal, not close
    assert all(r.max_abs == 0 for r in controlnet_report.rows if r.output in ("control_image", "aligned"))


def test_the_command_prints_the_table(capsys):
    assert conformance_command("arc2face_controlnet") == 0
    out = capsys.readouterr().out
    assert "ffhq_align_celeba_pad" in out and "0 failed" in out


def test_swapping_in_the_face_at_the_wrong_token_fails(monkeypatch):
    """The embedding must replace the "id" token of "photo of a id person"; the token after it ("person") is wrong."""
    import caphuman_bench.models.arc2face as model

    original = model.id_token_mask

    def next_token(tokenizer, batch_size):
        input_ids, mask = original(tokenizer, batch_size)
        return input_ids, mask.roll(1, dims=1)

    monkeypatch.setattr(model, "id_token_mask", next_token)
    failed = {(r.case, r.output) for r in run_arc2face(REFERENCE).failures()}
    assert ("prompt_embeds_two_identities", "prompt_embeds") in failed
    assert {("denoise_3steps_cfg3", "unet_out"), ("denoise_3steps_cfg3", "latents")} <= failed
    assert ("denoise_3steps_cfg3", "negative_prompt_embeds") not in failed  # the empty prompt has no "id"


def test_normalbae_control_image_fails(monkeypatch):
    """ControlNet 1.1's normalbae convention (`normals_to_controlnet_image`: x flipped, its own background) is not
    the pose demo's EMOCA normals."""
    import caphuman_bench.conformance.arc2face as check
    from caphuman_bench.methods.head_renders import normals_to_controlnet_image

    monkeypatch.setattr(check, "normals_to_arc2face_image", normals_to_controlnet_image)
    failed = {(r.case, r.output) for r in run_arc2face_controlnet(REFERENCE, only=["control_image", "denoise"]).failures()}
    assert ("control_image", "control_image") in failed
    assert {("denoise_3steps_cfg3", "controlnet_cond"), ("denoise_3steps_cfg3", "latents")} <= failed
    assert ("denoise_3steps_cfg3", "prompt_embeds") not in failed


def test_hard_reflect_padding_fails_the_alignment(monkeypatch):
    """FFHQ's padding is blurred and faded to the median colour away from the photo; plain reflection is not it."""
    import caphuman_bench.faces.ffhq_align as align

    def reflect(photo, pad, side):
        left, top, right, bottom = pad
        return Image.fromarray(np.pad(np.asarray(photo), ((top, bottom), (left, right), (0, 0)), "reflect"))

    monkeypatch.setattr(align, "_soft_padding", reflect)
    failed = {r.case for r in run_arc2face_controlnet(REFERENCE, only=["ffhq_align_celeba_pad"]).failures()}
    assert failed == {"ffhq_align_celeba_pad"}


def test_unknown_case_and_missing_file_are_named(tmp_path):
    with pytest.raises(BenchError, match=r"no case named \['nope'\]"):
        run_arc2face(REFERENCE, only=["nope"])
    shutil.copytree(REFERENCE, tmp_path / "ref", ignore=shutil.ignore_patterns("*.py"))
    shutil.rmtree(tmp_path / "ref" / "models" / "controlnet")
    with pytest.raises(BenchError, match=r"models/controlnet: missing"):
        run_arc2face_controlnet(tmp_path / "ref", only=["denoise"])
