"""DECA (reconstructor `deca`): the authors' numbers (tests/data/deca) and deviations the check catches."""

from __future__ import annotations

import pytest
import torch

from caphuman_bench.conformance import run_conformance
from caphuman_bench.errors import BenchError
from caphuman_bench.models import deca_encoder

GROUPS = ("shape", "tex", "exp", "pose", "cam", "light")
CASES = ("inside_kpt68", "inside_bbox", "corner_kpt68", "corner_bbox")


@pytest.mark.slow
def test_crops_and_every_group_match_the_authors_code():
    report = run_conformance("deca")
    assert report.passed, [(r.case, r.output, r.max_rel) for r in report.failures()]
    assert {(r.case, r.output) for r in report.rows} == {(case, output) for case in CASES for output in ("crop", *GROUPS)}


def test_a_detector_box_centred_as_the_old_shift_fails_only_the_bbox_crops(monkeypatch):
    monkeypatch.setattr(deca_encoder, "BBOX_CENTRE_SHIFT", 0.1)
    report = run_conformance("deca", only=["crop"])
    assert {r.case for r in report.failures()} == {"inside_bbox", "corner_bbox"}


def _light_as_rgb_by_band(code: torch.Tensor) -> dict[str, torch.Tensor]:
    parts = COMPOSE(code)
    parts["light"] = code[:, 209:].reshape(code.shape[0], 3, 9).transpose(1, 2)
    return parts


COMPOSE = deca_encoder.decompose


@pytest.mark.slow
def test_light_reshaped_in_the_wrong_order_fails_only_light(monkeypatch):
    monkeypatch.setattr(deca_encoder, "decompose", _light_as_rgb_by_band)
    report = run_conformance("deca", only=["codes"])
    assert {(r.case, r.output) for r in report.failures()} == {(case, "light") for case in CASES}


def test_an_unknown_check_is_named():
    with pytest.raises(BenchError, match=r"no check named \['detail'\]"):
        run_conformance("deca", only=["detail"])
