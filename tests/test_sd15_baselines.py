"""The SD-1.5 baselines: `sd15` (prompt only), `controlnet_head` / `controlnet_landmarks` (ControlNet on the
target head), IP-Adapter-FaceID / FaceID-Plus v2 with and without `+controlnet_head`; smoke presets only."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from caphuman_bench import weights
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import get_card
from caphuman_bench.errors import BenchError, MissingWeightsError
from caphuman_bench.faces.arcface import ARCFACE_TEMPLATE, arcface_align
from caphuman_bench.methods.base import MethodContext
from caphuman_bench.registry import get_method
from caphuman_bench.render.landmarks import draw_openpose_face
from tests.cli_helpers import cli, only_run
from tests.method_helpers import generated_pixels, generation_request

CARDS = ("sd15", "controlnet_head", "controlnet_landmarks", "ip_adapter_faceid", "ip_adapter_faceid_plusv2",
         "ip_adapter_faceid_controlnet_head", "ip_adapter_faceid_plusv2_controlnet_head")
SLOW_CARDS = {"controlnet_head", "ip_adapter_faceid", "ip_adapter_faceid_plusv2", "ip_adapter_faceid_controlnet_head"}  # covered by the others


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return Benchmark.load()


def _adapter(name: str, tmp_path_factory, **overrides):
    card = get_card(name)
    params = get_method(card.adapter).validated_params(card, "smoke", {"num_inference_steps": 1, **overrides})
    method = get_method(card.adapter)(card, params, MethodContext(device="cpu", workdir=tmp_path_factory.mktemp(name)))
    method.load()
    return method


# ----------------------------------------------------------------------------------------------
# end to end through the CLI


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CARDS else n for n in CARDS])
def test_smoke_run_on_the_demo_split(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    code, out, err = cli(capsys, monkeypatch, "run", "--method", name, "--preset", "smoke", "--runs-dir", runs,
                         "--metrics", "face_detection")
    assert code == 0, err
    run = only_run(runs)
    images = sorted((run / "images").glob("*.png"))
    assert len(images) == 12 and all(Image.open(p).size == (64, 64) for p in images)
    results = json.loads((run / "results.json").read_text())
    assert results["images"] == {"planned": 12, "ok": 12, "failed": 0, "missing": 0}
    assert results["method"] == f"{name} (smoke)" and "face_detection" in results["metrics"]
    for part in ("run.json", "tasks.jsonl", "status.jsonl", "scores.parquet", "leaderboard.md"):
        assert (run / part).exists(), part
    card = get_card(name)
    targets = sorted((run / "targets").glob("*")) if (run / "targets").exists() else []
    assert bool(targets) == (card.head_input != "none")  # head-aware methods record what they were steered to
    assert f"{name} (smoke)" in out


# ----------------------------------------------------------------------------------------------
# head control


@pytest.fixture(scope="module")
def landmarks_adapter(tmp_path_factory):
    return _adapter("controlnet_landmarks", tmp_path_factory)


@pytest.fixture(scope="module")
def normals_adapter(tmp_path_factory):
    return _adapter("ip_adapter_faceid_plusv2_controlnet_head", tmp_path_factory)


def test_condition_images_follow_the_head_condition(landmarks_adapter, normals_adapter, bench):
    for adapter in (landmarks_adapter, normals_adapter):
        left = np.asarray(adapter.control_image(generation_request(bench, condition_id="yaw-l45")))
        right = np.asarray(adapter.control_image(generation_request(bench, condition_id="yaw-r20")))
        assert left.shape == right.shape == (64, 64, 3) and not np.array_equal(left, right)
    # landmarks: a yaw to the left moves the dots to the left
    columns = [np.nonzero(np.asarray(landmarks_adapter.control_image(generation_request(bench, condition_id=c)))[..., 0])[1].mean()
               for c in ("yaw-l45", "yaw-r45")]
    assert columns[0] < columns[1] - 2


def test_landmark_image_is_the_openpose_drawing_of_the_target_heads_visible_landmarks(landmarks_adapter, bench):
    request = generation_request(bench, condition_id="yaw-l45")
    render = landmarks_adapter.head_render(request.identity_id, request.reference, request.condition, 64)
    points = landmarks_adapter.head_landmarks(request.identity_id, request.reference, request.condition, 64)
    visible = landmarks_adapter.landmarks.facing_camera(render.target)
    assert 0 < (~visible).sum() < 20  # the far jaw line of the turned head is left out
    image = np.asarray(landmarks_adapter.control_image(request))
    np.testing.assert_array_equal(image, np.asarray(draw_openpose_face(points, 64, visible=visible)))
    white = image[..., 0] == 255
    assert white.sum() > 20 and render.mask[0][white].mean() > 0.9  # the dots lie on the rendered head


def test_head_control_changes_the_image_and_a_prompt_only_method_has_no_target(landmarks_adapter, bench, tmp_path_factory):
    assert not np.array_equal(generated_pixels(landmarks_adapter, bench, condition_id="yaw-l45"), generated_pixels(landmarks_adapter, bench))
    floor = _adapter("sd15", tmp_path_factory)
    request = generation_request(bench)
    assert floor.head_target(request.identity_id, request.reference, request.condition) is None
    # the floor ignores reference and head condition: same prompt and seed, same image
    same = "a photo of a person"
    assert np.array_equal(generated_pixels(floor, bench, prompt=same),
                          generated_pixels(floor, bench, identity_id="grace-hopper", condition_id="yaw-l45", prompt=same))
    target = landmarks_adapter.head_target(request.identity_id, request.reference, request.condition)
    np.testing.assert_allclose(target["pose"][:3], request.condition.pose[:3])


# ----------------------------------------------------------------------------------------------
# identity (IP-Adapter-FaceID)


def test_faceid_identity_reaches_the_image_only_through_the_adapter(normals_adapter, bench):
    base = generated_pixels(normals_adapter, bench)
    assert np.array_equal(generated_pixels(normals_adapter, bench), base)  # same seed, same bytes
    assert not np.array_equal(generated_pixels(normals_adapter, bench, identity_id="grace-hopper"), base)
    no_identity, same = {"ip_adapter_scale": 0.0, "controlnet_sees_image_tokens": False}, "a photo of a person"
    # with scale 0 and a ControlNet that reads text only, the ArcFace path is closed: another identity's photo
    # under the same head (the reference's shape reaches the render), same prompt, condition and seed, same image
    # (with the authors' ControlNet context, the tokens still reach it)
    assert np.array_equal(generated_pixels(normals_adapter, bench, no_identity, prompt=same),
                          generated_pixels(normals_adapter, bench, no_identity, identity_id="grace-hopper", prompt=same,
                                           head_of="nasa-astronaut"))
    assert not np.array_equal(generated_pixels(normals_adapter, bench, {"shortcut_scale": 0.0}), base)  # Plus v2's shortcut acts


def test_faceid_embeddings_as_diffusers_documents_them(normals_adapter, bench):
    """Normalised ArcFace embedding, zeros for the unconditional branch; Plus: CLIP hidden states of the
    224 px aligned crop on the projection layer, unconditional rows first, shortcut on."""
    requests = [generation_request(bench), generation_request(bench, seed=4)]
    inputs = normals_adapter.extra_pipeline_inputs(requests, guided=True)
    (embeds,) = inputs["ip_adapter_image_embeds"]
    assert embeds.shape == (2, 1, 512)
    assert torch.all(embeds[0] == 0) and torch.linalg.vector_norm(embeds[1]).item() == pytest.approx(1.0, abs=1e-5)
    layer = normals_adapter.pipe.unet.encoder_hid_proj.image_projection_layers[0]
    positive, negative = normals_adapter.identity_embeds("nasa-astronaut", requests[0].references)[1]
    assert layer.clip_embeds.shape[:2] == (4, 1) and layer.shortcut
    assert torch.equal(layer.clip_embeds[1, 0], negative[0]) and torch.equal(layer.clip_embeds[2, 0], positive[0])


def test_faceid_batches_never_mix_identities(normals_adapter, bench):
    base = generated_pixels(normals_adapter, bench)
    normals_adapter.params["batch_size"] = 3
    try:
        images = normals_adapter.generate([generation_request(bench, "grace-hopper", "frontal", 1), generation_request(bench),
                                           generation_request(bench, "grace-hopper", "frontal", 1)])
    finally:
        normals_adapter.params["batch_size"] = 2
    assert np.array_equal(np.asarray(images[1]), base)
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[2]))


def test_controlnet_cross_attends_to_text_then_faceid_tokens_as_the_authors(normals_adapter, bench):
    """IPAdapterFaceID(Plus).generate appends the image tokens to prompt_embeds, and the pipeline hands those
    to the ControlNet too (tencent-ailab/IP-Adapter ip_adapter_faceid.py @ 62e4af9d); diffusers' native path
    gives it the 77 text tokens only (`controlnet_sees_image_tokens: false`)."""
    seen: dict[str, torch.Tensor] = {}

    def record(_module, _args, kwargs, _output):
        seen["context"] = kwargs["encoder_hidden_states"]

    requests = [generation_request(bench), generation_request(bench, seed=4)]
    handle = normals_adapter.pipe.controlnet.register_forward_hook(record, with_kwargs=True)
    try:
        normals_adapter.generate(requests)
        with_tokens = seen["context"]
        embeds = normals_adapter.extra_pipeline_inputs(requests, guided=True)["ip_adapter_image_embeds"][0]
        (tokens,) = normals_adapter.pipe.unet.encoder_hid_proj([embeds.repeat_interleave(2, dim=0)])
        assert with_tokens.shape[:2] == (4, 77 + 4)  # [unconditional ×2, conditional ×2], text + 4 FaceID tokens
        torch.testing.assert_close(with_tokens[:, 77:], tokens.flatten(1, 2))
        base = generated_pixels(normals_adapter, bench)
        text_only = generated_pixels(normals_adapter, bench, {"controlnet_sees_image_tokens": False})
    finally:
        handle.remove()
    assert seen["context"].shape[1] == 77 and not np.array_equal(base, text_only)


def test_plusv2_clip_sees_the_face_crop_in_bgr_as_the_model_card(normals_adapter, bench, monkeypatch):
    """The model card crops a cv2.imread (BGR) image with norm_crop and gives it to CLIPImageProcessor as is."""
    request = generation_request(bench)
    detection = normals_adapter.reference_faces.faces("bgr-check", request.references)[0][0]
    rgb = arcface_align(request.reference, detection.landmarks, 224)
    seen, real = [], normals_adapter.pipe.encode_image
    monkeypatch.setattr(normals_adapter.pipe, "encode_image", lambda image, *a, **k: seen.append(image) or real(image, *a, **k))
    for channels, expected in (("bgr", rgb[..., ::-1]), ("rgb", rgb)):
        seen.clear()
        monkeypatch.setitem(normals_adapter.params, "face_crop_channels", channels)
        normals_adapter.identity_embeds(f"bgr-check-{channels}", request.references)
        (image,) = seen
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_face_crop_for_clip_follows_insightface_norm_crop_at_224():
    """norm_crop(image_size=224): the ArcFace template scaled ×2; dots at the landmarks land there."""
    landmarks = ARCFACE_TEMPLATE * 1.5 + np.array([40.0, 30.0])
    canvas = Image.new("RGB", (300, 300), "black")
    draw = ImageDraw.Draw(canvas)
    for x, y in landmarks:
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(255, 255, 255))
    aligned = arcface_align(canvas, landmarks, 224)
    assert aligned.shape == (224, 224, 3)
    for x, y in ARCFACE_TEMPLATE * 2:
        assert aligned[int(round(y)), int(round(x))].min() > 200


# ----------------------------------------------------------------------------------------------
# before any work: parameters, libraries, weights


def test_full_runs_name_every_file_they_lack():
    expected = {
        "controlnet_landmarks": ("control_v11p_sd15_openpose", "landmark_embedding.npy", "generic_model.pkl", "deca_model.tar"),
        "ip_adapter_faceid": ("ip-adapter-faceid_sd15.bin", "h94/IP-Adapter-FaceID", "w600k_r50.onnx", "stable-diffusion-v1-5"),
        "ip_adapter_faceid_plusv2_controlnet_head": ("ip-adapter-faceid-plusv2_sd15.bin", "image_encoder",
                                                     "control_v11p_sd15_normalbae", "generic_model.pkl"),
    }
    for name, files in expected.items():
        card = get_card(name)
        needed = get_method(card.adapter).required_weights(card, card.resolve_params(None, {}))
        assert set(needed) == set(card.weights), name
        with pytest.raises(MissingWeightsError) as info:
            weights.require(needed)
        assert all(text in str(info.value) for text in files), name


def test_faceid_without_onnxruntime_stops_before_any_work_naming_the_extra(monkeypatch):
    card = get_card("ip_adapter_faceid")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(BenchError, match=r"onnxruntime.*pip install 'caphuman-bench\[arcface\]'"):
        get_method(card.adapter).required_weights(card, card.resolve_params(None, {}))
    assert get_method(card.adapter).required_weights(card, card.resolve_params("smoke", {})) == []  # tiny: no ONNX


@pytest.mark.parametrize(("name", "override", "message"), [
    ("sd15", {"controlnet": "depth"}, "parameter 'controlnet' must be one of none, normals, landmarks"),
    ("controlnet_head", {"height": 64, "width": 128}, "'height' and 'width' must be equal"),
    ("ip_adapter_faceid", {"variant": "plus"}, "parameter 'variant' must be one of faceid, plusv2"),
    ("ip_adapter_faceid", {"arcface_weights": "facenet"}, "parameter 'arcface_weights' must be one of"),
    ("ip_adapter_faceid_plusv2", {"face_crop_channels": "bgra"}, "parameter 'face_crop_channels' must be one of bgr, rgb"),
])
def test_bad_parameters_are_named(name, override, message):
    card = get_card(name)
    with pytest.raises(BenchError, match=message):
        get_method(card.adapter).validated_params(card, "smoke", override)


def test_cards_declare_every_parameter_their_adapter_reads():
    for name in CARDS:
        card = get_card(name)
        adapter = get_method(card.adapter)
        plus_only = {"shortcut_scale", "face_crop_channels"}
        declared = set(adapter.param_types) - (plus_only if card.params.get("variant") == "faceid" else set())
        assert set(card.params) == declared, name
        assert adapter.validated_params(card, "smoke", {}) == card.resolve_params("smoke", {})
