"""InstantID with the smoke preset: the target head's keypoints, InstantID's draw_kps convention,
identity and head reaching the image, the CLI end to end on the demo split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from caphuman_bench import weights
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import get_card
from caphuman_bench.errors import MissingWeightsError
from caphuman_bench.methods.base import MethodContext
from caphuman_bench.pipelines.pipeline_instantid import draw_keypoints
from caphuman_bench.registry import get_method
from tests.cli_helpers import cli, only_run
from tests.method_helpers import generation_request


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return Benchmark.load()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    card = get_card("instantid")
    method = get_method(card.adapter)(card, card.resolve_params("smoke", {}),
                                      MethodContext(device="cpu", workdir=tmp_path_factory.mktemp("method")))
    method.load()
    return method


def test_draw_keypoints_follows_draw_kps():
    """At 1024 px (infer.py's face size): limbs eye/eye/mouth/mouth → nose in the colour of their first
    keypoint at 60 % (255 · 0.6 → 153), stick half-width 4; discs of radius 10 in full colour on top:
    red, green, blue, yellow, magenta for left eye, right eye, nose, mouth left, mouth right."""
    kps = np.array([[300, 400], [700, 400], [500, 550], [350, 750], [650, 750]], dtype=float)
    rgb = np.asarray(draw_keypoints(kps, 1024, 1024))
    assert rgb.shape == (1024, 1024, 3) and rgb.dtype == np.uint8
    full = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    for (x, y), colour in zip(kps.astype(int), full):
        assert tuple(rgb[y, x]) == colour
        assert tuple(rgb[y, x + 9]) == colour or tuple(rgb[y, x - 9]) == colour  # radius 10
    for (a, b), colour in zip(((0, 2), (1, 2), (3, 2), (4, 2)),
                              ((153, 0, 0), (0, 153, 0), (153, 153, 0), (153, 0, 153))):
        x, y = ((kps[a] + kps[b]) / 2).astype(int)
        assert tuple(rgb[y, x]) == colour
        direction = (kps[b] - kps[a]) / np.linalg.norm(kps[b] - kps[a])
        normal = np.array([-direction[1], direction[0]])
        inside, outside = (np.array([x, y]) + 2 * normal).astype(int), (np.array([x, y]) + 8 * normal).astype(int)
        assert tuple(rgb[inside[1], inside[0]]) == colour  # within the half-width 4
        assert tuple(rgb[outside[1], outside[0]]) == (0, 0, 0)
    assert tuple(rgb[400, 300 - 13]) == (0, 0, 0) and tuple(rgb[0, 0]) == (0, 0, 0)
    # at 64 px the radius scales to 1: only the keypoint's own neighbourhood is full colour
    small = np.asarray(draw_keypoints(kps / 16, 64, 64))
    assert tuple(small[25, 18]) == (255, 0, 0) and tuple(small[25, 22]) != (255, 0, 0)


def test_target_keypoints_follow_the_yaw(adapter, bench):
    """The five keypoints of the target head: a yaw-left head's lie left of a yaw-right one's, same rows."""
    for left, right in (("yaw-l20", "yaw-r20"), ("yaw-l45", "yaw-r45")):
        lk = adapter.target_keypoints(generation_request(bench, condition_id=left, size=512))
        rk = adapter.target_keypoints(generation_request(bench, condition_id=right, size=512))
        assert lk.shape == (5, 2)
        assert np.all(lk[:, 0] < rk[:, 0])
        np.testing.assert_allclose(lk[:, 1], rk[:, 1], atol=3)
    frontal = adapter.target_keypoints(generation_request(bench, condition_id="frontal", size=512))
    assert frontal[0, 0] < frontal[2, 0] < frontal[1, 0]  # eyes either side of the nose, InsightFace's order
    assert frontal[3, 0] < frontal[4, 0] and frontal[:2, 1].max() < frontal[2, 1] < frontal[3:, 1].min()


def test_conditioning_image_differs_between_head_conditions(adapter, bench):
    images = [np.asarray(adapter.control_image(generation_request(bench, condition_id=c, size=256))) for c in ("frontal", "yaw-l45")]
    assert not np.array_equal(*images)
    assert {tuple(c) for c in images[0].reshape(-1, 3)} >= {(255, 0, 0), (0, 255, 0), (0, 0, 255)}


def test_smoke_images_depend_on_seed_identity_and_head(adapter, bench):
    def pixels(**kw):
        (image,) = adapter.generate([generation_request(bench, **kw)])
        return np.asarray(image)

    base = pixels()
    assert base.shape == (64, 64, 3) and base.std() > 0
    assert np.array_equal(pixels(), base)
    assert not np.array_equal(pixels(seed=8), base)
    assert not np.array_equal(pixels(identity_id="grace-hopper"), base)
    assert not np.array_equal(pixels(condition_id="yaw-l45"), base)


def test_head_target_is_the_mixed_code(adapter, bench):
    condition = bench.conditions["yaw-r20"]
    target = adapter.head_target("nasa-astronaut", bench.reference_image("nasa-astronaut"), condition)
    np.testing.assert_allclose(target["cam"], condition.cam)
    np.testing.assert_allclose(target["pose"][:3], condition.pose[:3])


def test_run_end_to_end_on_the_demo_split(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "instantid", "--preset", "smoke", "--runs-dir", runs,
                       "--metrics", "face_detection")
    assert code == 0, err
    run = only_run(runs)
    images = sorted((run / "images").glob("*.png"))
    assert len(images) == 12 and {Image.open(p).size for p in images} == {(64, 64)}
    results = json.loads((run / "results.json").read_text())
    assert results["images"] == {"planned": 12, "ok": 12, "failed": 0, "missing": 0}
    assert len(list((run / "targets").iterdir())) > 0  # the head targets it was steered to
    for name in ("run.json", "tasks.jsonl", "status.jsonl", "scores.parquet", "leaderboard.md"):
        assert (run / name).exists()


def test_full_run_without_files_names_every_file_first():
    card = get_card("instantid")
    needed = get_method(card.adapter).required_weights(card, card.resolve_params(None, {}))
    assert set(needed) == set(card.weights)
    with pytest.raises(MissingWeightsError) as info:
        weights.require(needed)
    for text in ("ip-adapter.bin", "InstantX/InstantID", "ControlNetModel", "glintr100.onnx", "stable-diffusion-xl-base-1.0",
                 "landmark_embedding.npy", "deca_model.tar"):
        assert text in str(info.value)


@pytest.mark.slow
def test_pipeline_loads_from_files_in_the_official_formats(adapter, bench, tmp_path):
    """The non-smoke loading path of the networks: an SDXL diffusers folder, IdentityNet's
    `ControlNetModel/` folder and `ip-adapter.bin` (torch pickle of {"image_proj": Resampler,
    "ip_adapter": to_k_ip / to_v_ip numbered 1, 3, 5, ...}) at tiny size; the result generates."""
    from diffusers import StableDiffusionXLPipeline

    from caphuman_bench.methods.ip_adapter_controlnet import tiny_ip_adapter_plus_state_dict
    from caphuman_bench.pipelines.tiny_sdxl import tiny_sdxl_components

    components = tiny_sdxl_components(0, controlnet=True)
    components.pop("controlnet").save_pretrained(tmp_path / "ControlNetModel")
    StableDiffusionXLPipeline(**components).save_pretrained(tmp_path / "sdxl")
    state_dict = tiny_ip_adapter_plus_state_dict(components["unet"], 512, torch.Generator().manual_seed(2))
    torch.save(state_dict, tmp_path / "ip-adapter.bin")
    pipe = adapter._load_pipeline({"stable_diffusion_xl_base": tmp_path / "sdxl",
                                   "instantid_controlnet": tmp_path / "ControlNetModel" / "diffusion_pytorch_model.safetensors",
                                   "instantid_ip_adapter": tmp_path / "ip-adapter.bin"})
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    torch.testing.assert_close(projection.latents.detach(), state_dict["image_proj"]["latents"])
    request = generation_request(bench)
    images = pipe([request.prompt], image=[adapter.control_image(request)], face_embedding=torch.randn(512),
                  height=64, width=64, num_inference_steps=2, generator=[request.generator])
    assert np.asarray(images[0]).shape == (64, 64, 3)
    torch.save({"image_proj": {}}, tmp_path / "ip-adapter.bin")
    with pytest.raises(Exception, match="not InstantID's ip-adapter.bin"):
        adapter._load_pipeline({"stable_diffusion_xl_base": tmp_path / "sdxl",
                                "instantid_controlnet": tmp_path / "ControlNetModel",
                                "instantid_ip_adapter": tmp_path / "ip-adapter.bin"})


def test_the_negative_prompt_is_cut_at_77_tokens_as_the_authors_do_without_a_warning(adapter, caplog):
    """infer.py's negative prompt has 92 tokens; the authors' pipeline (diffusers' encode_prompt) keeps the
    first 75 (77 with the start and end tokens), as the conformance vectors made with it on this very prompt show (tests/data/instantid).
    Here: the same cut, no "92 > 77" warning from transformers, one INFO line for the run's log."""
    import logging

    from caphuman_bench.pipelines.pipeline_instantid import clip_token_count

    pipe, negative = adapter.pipe, adapter.params["negative_prompt"]
    assert clip_token_count(pipe.tokenizer, negative) == (92, 75)
    kept = pipe.tokenizer(negative, truncation=True, max_length=77).input_ids
    cut = pipe.tokenizer.decode(kept, skip_special_tokens=True)
    assert pipe.tokenizer(cut).input_ids == kept  # the first 75 tokens, as text

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    heard = Records()
    transformers_log = logging.getLogger("transformers")  # does not propagate: caplog would not hear it
    transformers_log.addHandler(heard)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        tokenizer.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)
    try:
        embeds = {text: pipe.encode_prompt(["a photo"], device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=True, negative_prompt=[text])
                  for text in (negative, cut)}
    finally:
        transformers_log.removeHandler(heard)
    assert not [r for r in heard.records if "sequence length is longer" in r.getMessage()]
    for full, truncated in zip(embeds[negative], embeds[cut]):
        torch.testing.assert_close(full, truncated, rtol=0, atol=0)

    with caplog.at_level(logging.INFO, logger="caphuman_bench.methods.instantid"):
        adapter._note_negative_prompt_cut()
    assert "the negative prompt has 92 tokens; both text encoders read the first 75" in caplog.text
