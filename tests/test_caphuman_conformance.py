"""The diffusers port against the official CapHuman code's reference vectors (tests/data/caphuman_tiny)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from caphuman_bench.conformance import conformance_command
from caphuman_bench.conformance.caphuman import TOLERANCES, run_conformance
from caphuman_bench.errors import BenchError
from caphuman_bench.models.capface import CapFaceModel

REFERENCE = Path(__file__).parent / "data" / "caphuman_tiny"


@pytest.fixture(scope="module")
def report():
    return run_conformance(REFERENCE)


def test_every_case_and_output_is_within_tolerance(report):
    assert report.passed, [(r.case, r.output, r.max_abs) for r in report.failures()]
    checked = {(r.case, r.output) for r in report.rows}
    for case in ("tau500_t100_kept", "tau500_t900_dropped", "tau0_t900_nodrop", "tau500_t500_boundary",
                 "tau500_mixed_b2_nonsquare"):
        assert {(case, "eps"), (case, "mask"), (case, "control_context")} <= checked
    assert {("ddim5_cfg7_tau500", o) for o in ("samples", "x_inter", "pred_x0")} <= checked
    assert ("tau500_mixed_b2_nonsquare", "control_residual_04") in checked
    assert all(r.max_abs == 0 for r in report.rows if r.output.startswith("hard_mask"))
    ddim = next(r for r in report.rows if r.output == "samples")
    assert ddim.tolerance == TOLERANCES["ddim"] and ddim.max_abs < 1e-3


def test_command_prints_a_table_and_exits_zero(capsys):
    assert conformance_command("caphuman", REFERENCE) == 0
    out = capsys.readouterr().out
    assert "tau500_mixed_b2_nonsquare" in out and "0 failed" in out


def _antialiased_hard_mask(self, mask, size):
    mask = F.interpolate(mask, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return (mask > self.config.mask_threshold).to(mask.dtype)


def test_antialiased_mask_resize_fails(monkeypatch):
    monkeypatch.setattr(CapFaceModel, "hard_mask", _antialiased_hard_mask)
    report = run_conformance(REFERENCE, only=["tau500_t100_kept", "ddim5_cfg7_tau500"])
    failed = {(r.case, r.output) for r in report.failures()}
    assert ("tau500_t100_kept", "eps") in failed and ("ddim5_cfg7_tau500", "samples") in failed
    # the soft mask itself does not depend on the resize
    assert ("tau500_t100_kept", "mask") not in failed


def test_swapped_token_order_fails_the_context_check(monkeypatch):
    """Cross-attention has no positions, so eps cannot see the order: the context intermediate must."""
    original = CapFaceModel.identity_context

    def id_token_first(self, *args, **kwargs):
        context = original(self, *args, **kwargs)
        return torch.cat([context[:, -1:], context[:, :-1]], dim=1)

    monkeypatch.setattr(CapFaceModel, "identity_context", id_token_first)
    failed = {(r.case, r.output) for r in run_conformance(REFERENCE, only=["tau500_t100_kept"]).failures()}
    assert ("tau500_t100_kept", "control_context") in failed
    assert ("tau500_t100_kept", "eps") not in failed


def test_strict_tau_boundary_fails(monkeypatch):
    """Dropping at t >= tau instead of t > tau breaks exactly the boundary case t = tau."""
    original = CapFaceModel.identity_context

    def drop_at_tau(self, image_tokens, id_embedding, timestep, tau=0, use_global=True, use_local=True):
        context = original(self, image_tokens, id_embedding, timestep, tau, use_global, use_local)
        if tau != 0:
            context = context * (torch.as_tensor(timestep).reshape(-1) < tau).to(context.dtype)[:, None, None]
        return context

    monkeypatch.setattr(CapFaceModel, "identity_context", drop_at_tau)
    only = ["tau500_t500_boundary", "tau500_t100_kept"]
    failed = {(r.case, r.output) for r in run_conformance(REFERENCE, only=only).failures()}
    assert ("tau500_t500_boundary", "eps") in failed
    assert ("tau500_t100_kept", "eps") not in failed


def test_missing_reference_file_is_named(tmp_path):
    shutil.copytree(REFERENCE, tmp_path / "ref")
    (tmp_path / "ref" / "cases.json").unlink()
    with pytest.raises(BenchError, match="cases.json"):
        run_conformance(tmp_path / "ref")
