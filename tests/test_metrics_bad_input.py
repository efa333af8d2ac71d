"""Odd and broken images through `images.load_rgb` and the face, identity and CLIP metrics.

Every case gets a defined outcome — scored, or a per-item status with a reason — in one batch, so
one bad file never stops the others and never yields a silent number.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from caphuman_bench import weights
from caphuman_bench.images import ImageError, load_rgb
from caphuman_bench.faces.detection import DETECT_MAX_SIDE, detect_faces
from caphuman_bench.metrics.base import ScoreContext, ScoreItem
from caphuman_bench.metrics.clip_score import ClipScore
from caphuman_bench.metrics.face_detection import FaceDetectionRate
from caphuman_bench.metrics.identity import DlibIdentity
from caphuman_bench.metrics.prompt_accuracy import PromptAccuracy

PROMPT = "a photo of a person"
TINY_CLIP = "caphuman-test-bad-input-clip"


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    return _save(image, "PNG")


def _rgba(astronaut: Image.Image) -> Image.Image:
    alpha = Image.new("L", astronaut.size, 0)
    alpha.paste(255, (64, 0, 448, 512))  # opaque centre, transparent sides
    rgba = astronaut.convert("RGBA")
    rgba.putalpha(alpha)
    return rgba


def _sixteen_bit(astronaut: Image.Image) -> Image.Image:
    gray = np.asarray(astronaut.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    image = Image.fromarray(gray)
    assert image.mode == "I;16"
    return image


def _several_faces(astronaut: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (astronaut.width * 2, astronaut.height), "white")
    canvas.paste(astronaut, (0, 0))
    canvas.paste(astronaut.resize((300, 300)), (astronaut.width + 100, 100))
    return canvas


def _wide(astronaut: Image.Image) -> Image.Image:
    """Over DETECT_MAX_SIDE wide but within load_rgb's limit: detected on a downscaled copy."""
    canvas = Image.new("RGB", (DETECT_MAX_SIDE + 400, 600), "white")
    canvas.paste(astronaut, (1500, 40))
    return canvas


# case -> (file bytes from the astronaut photo, expected status of face_detection, detected?)
CASES = {
    "grayscale": (lambda a: _png_bytes(a.convert("L")), "ok", True),
    "palette": (lambda a: _png_bytes(a.convert("P")), "ok", True),
    "rgba": (lambda a: _png_bytes(_rgba(a)), "ok", True),
    "cmyk_jpeg": (lambda a: _save(a.convert("CMYK"), "JPEG"), "ok", True),
    "sixteen_bit": (lambda a: _png_bytes(_sixteen_bit(a)), "ok", True),
    "several_faces": (lambda a: _png_bytes(_several_faces(a)), "ok", True),
    "wide_downscaled": (lambda a: _png_bytes(_wide(a)), "ok", True),
    "no_face": (lambda a: _png_bytes(Image.new("RGB", (256, 256), "gray")), "ok", False),
    "fully_transparent": (lambda a: _png_bytes(Image.new("RGBA", (128, 128), (0, 0, 0, 0))), "ok", False),
    "tiny": (lambda a: _png_bytes(a.resize((24, 24))), "unreadable", None),
    "huge": (lambda a: _png_bytes(Image.new("L", (8200, 40))), "unreadable", None),
    "truncated": (lambda a: _png_bytes(a)[: len(_png_bytes(a)) // 2], "unreadable", None),
    "not_an_image": (lambda a: b"this is not an image", "unreadable", None),
}
REASONS = {"tiny": "too small", "huge": "too large", "truncated": "unreadable image", "not_an_image": "unreadable image"}


@pytest.fixture(scope="module")
def items(astronaut, tmp_path_factory) -> dict[str, ScoreItem]:
    """What the score stage builds: load_rgb, and on ImageError an item with image=None and the reason."""
    folder = tmp_path_factory.mktemp("bad_input")
    out = {}
    for case, (make, _, _) in CASES.items():
        path = folder / f"{case}.img"
        path.write_bytes(make(astronaut))
        try:
            image, error = load_rgb(path), None
        except ImageError as exc:
            image, error = None, str(exc)
        out[case] = ScoreItem(task_id=case, identity_id="astronaut", prompt_id="p", condition_id="c", sample=0,
                              image=image, reference=astronaut, prompt=PROMPT, image_error=error)
    return out


@pytest.fixture(scope="module")
def face_weights():
    return weights.require(["mtcnn", "dlib_shape_predictor_5", "dlib_face_recognition"])


def test_load_rgb_outcomes(items, astronaut):
    for case, item in items.items():
        if CASES[case][1] == "unreadable":
            assert item.image is None and REASONS[case] in item.image_error, case
        else:
            assert item.image.mode == "RGB", case
    # 16-bit is rescaled from its full range, not clipped: it equals the 8-bit gray image
    gray8 = np.asarray(astronaut.convert("L"), dtype=np.int16)
    assert np.abs(np.asarray(items["sixteen_bit"].image, dtype=np.int16)[..., 0] - gray8).max() <= 1
    # transparency is composited on white
    assert np.asarray(items["rgba"].image)[:, :32].min() == 255
    assert np.asarray(items["fully_transparent"].image).min() == 255


def test_face_metrics_give_every_case_a_defined_outcome(items, face_weights):
    context = ScoreContext(weights=face_weights)
    cases = list(items)
    detection, identity = FaceDetectionRate(context), DlibIdentity(context)
    detection.update([items[c] for c in cases])
    identity.update([items[c] for c in cases])
    for case, det_row, id_row in zip(cases, detection.last_rows, identity.last_rows):
        _, status, detected = CASES[case]
        assert det_row.status == status, case
        if status == "unreadable":
            assert REASONS[case] in det_row.reason and REASONS[case] in id_row.reason, case
            assert id_row.status == "unreadable" and all(math.isnan(v) for v in id_row.values.values()), case
            assert math.isnan(det_row.values["face_detection"])
        elif detected:
            assert det_row.values["face_detection"] == 1.0, case
            assert id_row.status == "ok" and 0.8 < id_row.values["id_sim_dlib"] <= 1.0 + 1e-9, case
        else:
            assert det_row.values["face_detection"] == 0.0, case
            assert id_row.status == "no_face" and id_row.values["id_sim_dlib"] == 0.0, case
    rows = dict(zip(cases, detection.last_rows))
    assert rows["several_faces"].extra["n_faces"] >= 2
    agg = detection.compute()
    readable = [c for c in cases if CASES[c][1] == "ok"]
    assert agg["face_detection"]["n"] == len(readable)
    assert agg["_items"] == {"seen": len(cases), "ok": len(readable)}


def test_wide_image_boxes_map_back_to_original_pixels(items, astronaut):
    (own,) = detect_faces([astronaut])
    (wide,) = detect_faces([items["wide_downscaled"].image])
    expected = own.box + np.array([1500, 40, 1500, 40])
    assert np.abs(wide.box - expected).max() < 8


@pytest.fixture(scope="module")
def tiny_clip_context(tmp_path_factory) -> ScoreContext:
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("bad_input_clip")
    config = {"embed_dim": 16, "quick_gelu": True,
              "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    checkpoint = folder / "random_clip.bin"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), checkpoint)
    return ScoreContext(options={"clip_model": TINY_CLIP, "clip_checkpoint": str(checkpoint)},
                        prompts=[PROMPT, "a photo of a person on the beach"])


def test_clip_metrics_give_every_case_a_defined_outcome(items, tiny_clip_context):
    cases = list(items)
    score, accuracy = ClipScore(tiny_clip_context), PromptAccuracy(tiny_clip_context)
    score.update([items[c] for c in cases])
    accuracy.update([items[c] for c in cases])
    for case, score_row, acc_row in zip(cases, score.last_rows, accuracy.last_rows):
        if CASES[case][1] == "unreadable":
            assert score_row.status == acc_row.status == "unreadable" and REASONS[case] in score_row.reason, case
            assert math.isnan(score_row.values["clip_score"]) and math.isnan(acc_row.values["prompt_acc_top1"]), case
        else:
            assert score_row.status == acc_row.status == "ok", case
            assert -1.0 <= score_row.values["clip_score"] <= 1.0, case
            assert acc_row.values["prompt_acc_top1"] in (0.0, 1.0), case
            assert math.isnan(acc_row.values["prompt_acc_top5"]), case  # 2 prompts: top-5 undefined
