"""The IP-Adapter rows against tencent-ailab/IP-Adapter's own code (vectors in tests/data/ip_adapter/)."""

from __future__ import annotations

import pytest

from caphuman_bench.conformance import VECTORS_ROOT, conformance_checks, run_conformance
from caphuman_bench.conformance.ip_adapter import CARD_CASES, check_card

VECTORS = VECTORS_ROOT / "ip_adapter"


@pytest.mark.parametrize("card", sorted(CARD_CASES))
def test_card_reproduces_the_authors_code(card):
    assert conformance_checks()[card].vectors == "ip_adapter"
    report = run_conformance(card)
    assert report.passed, [(row.output, row.max_rel) for row in report.failures()]
    outputs = {row.output for row in report.rows}
    assert {"image_tokens", "uncond_image_tokens", "eps", "latents", "samples"} <= outputs
    assert ("controlnet_context" in outputs) == card.endswith(("controlnet", "controlnet_head"))


def test_a_controlnet_reading_text_only_fails_the_faceid_check():
    """diffusers' native path (the ControlNet sees the 77 text tokens, not the 4 FaceID tokens after them)
    is not what the authors' IPAdapterFaceID.generate computes."""
    rows = {row.output.split(" ")[0]: row for row in check_card(VECTORS, "ip_adapter_faceid_controlnet_head",
                                                                 {"controlnet_sees_image_tokens": False})}
    assert "[4, 77, 64], authors' [4, 81, 64]" in next(r.output for r in rows.values() if r.output.startswith("controlnet_context"))
    assert not rows["controlnet_context"].passed
    assert not rows["eps"].passed and not rows["samples"].passed and rows["samples"].max_rel > 1e-2
    assert rows["image_tokens"].passed  # the adapter itself still matches


def test_the_plus_face_controlnet_reads_text_only_as_the_authors_cn_processor():
    """IPAdapterPlus gives the ControlNet CNAttnProcessor, which drops the 16 image tokens: the authors'
    ControlNet context there is the 77 text tokens, as diffusers' (checked equal, not only close)."""
    (row,) = [r for r in check_card(VECTORS, "ip_adapter_controlnet") if r.output == "controlnet_context"]
    assert row.max_abs == 0.0
