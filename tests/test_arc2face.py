"""Arc2Face and its pose ControlNet: the ID-token projection, EMOCA's normal-image convention, the ArcFace
runtime check, and smoke runs through the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from caphuman_bench import weights
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import get_card
from caphuman_bench.errors import BenchError, MissingWeightsError
from caphuman_bench.methods.arc2face import build_tiny_arc2face_pipeline, normals_to_arc2face_image
from caphuman_bench.methods.base import MethodContext
from caphuman_bench.models.arc2face import arc2face_prompt_embeds, id_token_mask
from caphuman_bench.registry import get_method
from tests.cli_helpers import cli, image_digests, only_run
from tests.method_helpers import generation_request

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return Benchmark.load()


@pytest.fixture(scope="module")
def controlnet_adapter(tmp_path_factory):
    card = get_card("arc2face_controlnet")
    params = card.resolve_params("smoke", {"num_inference_steps": 2})
    method = get_method(card.adapter)(card, params, MethodContext(device="cpu", workdir=tmp_path_factory.mktemp("method")))
    method.load()
    return method


def test_id_embedding_replaces_the_id_token_and_only_later_tokens_change():
    """project_face_embs: unit-norm embedding, zero-padded to the width, as the "id" token of
    "photo of a id person"; causal attention leaves the tokens before it exactly as the plain prompt's."""
    pipe = build_tiny_arc2face_pipeline(controlnet=False)
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    input_ids, mask = id_token_mask(tokenizer, 2)
    assert mask.sum(dim=1).tolist() == [1, 1] and tokenizer.decode(input_ids[0][mask[0]]).strip() == "id"
    position = int(mask[0].int().argmax())
    faces = torch.randn(2, 16)
    embeds = arc2face_prompt_embeds(encoder, tokenizer, faces)
    with torch.no_grad():
        plain = encoder(input_ids)[0]
    torch.testing.assert_close(embeds[:, :position], plain[:, :position])
    assert (embeds[:, position:] - plain[:, position:]).abs().amax(dim=-1).min() > 1e-4
    torch.testing.assert_close(arc2face_prompt_embeds(encoder, tokenizer, 3.0 * faces), embeds)  # normalised
    with torch.no_grad():
        torch.testing.assert_close(encoder(input_ids)[0], plain)  # the hook is gone
    swapped = {}
    hook = encoder.embeddings.register_forward_hook(lambda m, i, o: swapped.setdefault("x", o))
    arc2face_prompt_embeds(encoder, tokenizer, faces)
    hook.remove()
    positions = encoder.embeddings.position_embedding.weight[position]
    unit = torch.nn.functional.normalize(faces, dim=1)
    torch.testing.assert_close(swapped["x"][:, position], torch.nn.functional.pad(unit, (0, 16)) + positions)
    with pytest.raises(ValueError, match="E <= 32"):
        arc2face_prompt_embeds(encoder, tokenizer, torch.randn(1, 512))


def test_control_image_is_emocas_normal_images():
    """((n * 0.5 + 0.5).clamp(0, 1) * 255).astype(uint8): no axis flip, truncation, background 127."""
    normal = np.zeros((3, 2, 3), dtype=np.float32)
    normal[:, 0, 0] = (0.0, 0.0, 1.0)  # frontal
    normal[:, 0, 1] = (1.0, 0.0, 0.0)  # to the image's right
    normal[:, 0, 2] = (0.0, 1.0, 0.0)  # up
    normal[:, 1, 0] = (0.004, -1.0, -0.3)
    rgb = np.asarray(normals_to_arc2face_image(normal))
    assert rgb[0, 0].tolist() == [127, 127, 255]
    assert rgb[0, 1].tolist() == [255, 127, 127]
    assert rgb[0, 2].tolist() == [127, 255, 127]
    assert rgb[1, 0].tolist() == [128, 0, 89]  # 128.01, 0, 89.25 truncated
    assert rgb[1, 1].tolist() == [127, 127, 127]  # no head


def test_control_image_follows_the_head_condition(controlnet_adapter, bench):
    left = np.asarray(controlnet_adapter.control_image(generation_request(bench, condition_id="yaw-l45"))).astype(int)
    right = np.asarray(controlnet_adapter.control_image(generation_request(bench, condition_id="yaw-r20"))).astype(int)
    assert np.abs(left - right).max() > 50
    head = (np.abs(left - 127).sum(-1) > 0) & (np.abs(right - 127).sum(-1) > 0)
    # red is x: the head turned one way shows normals to one side, turned the other way to the other
    assert np.sign(left[..., 0][head].mean() - 127) != np.sign(right[..., 0][head].mean() - 127)


def test_identity_steers_the_image_and_the_prompt_does_not(controlnet_adapter, bench):
    base, other_prompt, other_identity = controlnet_adapter.generate([
        generation_request(bench), generation_request(bench, prompt_id="sty-van-gogh"), generation_request(bench, identity_id="grace-hopper")])
    assert np.array_equal(np.asarray(base), np.asarray(other_prompt))
    assert not np.array_equal(np.asarray(base), np.asarray(other_identity))
    target = controlnet_adapter.head_target("nasa-astronaut", bench.reference_image("nasa-astronaut"), bench.conditions["yaw-r20"])
    np.testing.assert_allclose(target["pose"], bench.conditions["yaw-r20"].pose)  # pose, jaw from the condition
    np.testing.assert_allclose(target["exp"], bench.conditions["yaw-r20"].exp)


def test_no_face_in_the_reference_is_a_clear_error(controlnet_adapter, bench):
    request = generation_request(bench)
    request.reference = Image.new("RGB", (64, 64), (90, 90, 90))
    request.identity_id = "blank"
    with pytest.raises(BenchError, match="identity 'blank': MTCNN found no face"):
        controlnet_adapter.generate([request])


@pytest.mark.parametrize("name", ["arc2face", "arc2face_controlnet"])
def test_missing_onnxruntime_or_files_stop_the_run_first(name, monkeypatch):
    card = get_card(name)
    cls = get_method(card.adapter)
    needed = cls.required_weights(card, card.resolve_params(None, {}))
    assert set(needed) == set(card.weights)
    with pytest.raises(MissingWeightsError) as info:
        weights.require(needed)
    for text in ("arcface.onnx", "FoivosPar/Arc2Face", "encoder", "stable-diffusion-v1-5"):
        assert text in str(info.value)
    antelope = cls.required_weights(card, card.resolve_params(None, {"arcface": "antelopev2"}))
    assert "arcface_antelopev2" in antelope and "arc2face_arcface" not in antelope
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if it were not installed
    for preset in (None, "smoke"):
        with pytest.raises(BenchError, match=r"onnxruntime.*pip install 'caphuman-bench\[arcface\]'"):
            cls.required_weights(card, card.resolve_params(preset, {}))


@pytest.mark.parametrize("name", ["arc2face", "arc2face_controlnet"])
def test_smoke_run_through_the_cli(name, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", name, "--preset", "smoke", "--runs-dir", runs,
                       "--metrics", "face_detection", "--param", "num_inference_steps=2")
    assert code == 0, err
    run = only_run(runs)
    digests = image_digests(run)
    assert len(digests) == 12 and len(set(digests.values())) > 1
    assert all(Image.open(p).size == (64, 64) for p in (run / "images").glob("*.png"))
    for item in ("run.json", "tasks.jsonl", "status.jsonl", "scores.parquet", "results.json", "leaderboard.md"):
        assert (run / item).exists(), item
    assert json.loads((run / "results.json").read_text())["images"] == {"planned": 12, "ok": 12, "failed": 0, "missing": 0}
    assert (run / "targets").exists() == (name == "arc2face_controlnet")


def _released_layout(tmp_path, controlnet: bool) -> dict:
    """The tiny pipeline saved as the released folders: SD-1.5's (VAE, tokenizer, scheduler), Arc2Face's
    `arc2face/` UNet, `encoder/` (pytorch_model.bin in transformers-4.36 layout) and `controlnet/`."""
    from caphuman_bench.methods.arc2face import write_tiny_arcface_onnx

    pipe = build_tiny_arc2face_pipeline(controlnet=controlnet)
    pipe.save_pretrained(tmp_path / "sd15")
    pipe.unet.save_pretrained(tmp_path / "arc2face")
    encoder = tmp_path / "encoder"
    pipe.text_encoder.config.save_pretrained(encoder)
    torch.save({f"text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}, encoder / "pytorch_model.bin")
    paths = {"stable_diffusion_v1_5": tmp_path / "sd15" / "model_index.json", "arc2face_unet": tmp_path / "arc2face",
             "arc2face_encoder": encoder / "config.json",
             "arc2face_arcface": write_tiny_arcface_onnx(tmp_path / "arcface.onnx")}
    if controlnet:
        pipe.controlnet.save_pretrained(tmp_path / "controlnet")
        paths["arc2face_controlnet"] = tmp_path / "controlnet"
    return pipe, paths


@pytest.mark.parametrize("name", ["arc2face", "arc2face_controlnet"])
def test_released_folders_load_into_the_same_pipeline(name, tmp_path, bench):
    """The full-weights path (from_pretrained of each folder, local files only) on folders in the released layout."""
    from diffusers import DPMSolverMultistepScheduler

    card = get_card(name)
    tiny, paths = _released_layout(tmp_path, controlnet=name == "arc2face_controlnet")
    method = get_method(card.adapter)(card, card.resolve_params(None, {}), MethodContext(device="cpu", weights=paths))
    method.dtype = torch.float32
    pipe = method._load_pipeline()
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    for part in ("unet", "text_encoder", "vae") + (("controlnet",) if name == "arc2face_controlnet" else ()):
        for (key, ours), theirs in zip(getattr(pipe, part).state_dict().items(), getattr(tiny, part).state_dict().values()):
            assert torch.equal(ours, theirs), f"{part}.{key}"
    if name == "arc2face":  # the whole adapter on these files: ArcFace from the onnx file, an image out
        method.load()
        (image,) = method.generate([generation_request(bench)])
        assert image.size == (64, 64)
    (paths["arc2face_unet"] / "config.json").unlink()
    with pytest.raises(BenchError, match=r"weights 'arc2face_unet' incomplete, missing config.json"):
        method._load_pipeline()
