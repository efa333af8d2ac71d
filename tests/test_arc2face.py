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
    # one request per call: images of one batch may differ in the last bit with their position on the CPU
    base, other_prompt, other_identity = (controlnet_adapter.generate([request])[0] for request in (
        generation_request(bench), generation_request(bench, prompt_id="sty-van-gogh"), generation_request(bench, identity_id="grace-hopper")))
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


class ConstantDeca(torch.nn.Module):
    """A DECA encoder that gives every crop FLAME's neutral code at a fixed camera: the frame alone moves the head."""

    def __init__(self) -> None:
        from caphuman_bench.models.deca_encoder import CODE_SLICES
        from caphuman_bench.render.head_condition import neutral_identity_code

        super().__init__()
        code = {**neutral_identity_code(), "cam": np.array([7.0, 0.02, 0.05])}
        self.code = torch.nn.Parameter(torch.cat([torch.as_tensor(code[name], dtype=torch.float32).reshape(-1)
                                                  for name in CODE_SLICES]))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.code.expand(len(crops), -1)


def _deca_adapter(tmp_path, size: int = 128):
    """The ControlNet adapter with a constant DECA encoder and the synthetic FLAME head (no weight files)."""
    from caphuman_bench.models.deca_encoder import DecaReconstructor
    from caphuman_bench.render.head_condition import HeadConditionRenderer

    card = get_card("arc2face_controlnet")
    method = get_method(card.adapter)(card, card.resolve_params(None, {"height": size, "width": size}),
                                      MethodContext(device="cpu", workdir=tmp_path))
    method.renderer, method._codes = HeadConditionRenderer.synthetic(device="cpu"), {}
    method.reconstructor = DecaReconstructor(ConstantDeca(), "deca:constant")
    return method


def test_head_is_drawn_into_the_ffhq_aligned_reference(tmp_path, bench):
    """Defect 5: app_controlnet.py run_emoca aligns the pose photo with image_align(ref_img, lmks, output_size=512)
    (68 FAN landmarks), runs EMOCA on the aligned photo as it is and renders into that frame; the reference
    stretched to size² (CapHuman's TestData frame) is not it. The identity's shape comes from the reference."""
    from caphuman_bench.faces.ffhq_align import ffhq_align
    from caphuman_bench.faces.landmarks import dlib_landmarks
    from caphuman_bench.models.deca_encoder import deca_crop_square, encode_crops, landmark_square
    from caphuman_bench.render.head_condition import CropFrame

    size, reference, condition = 128, bench.reference_image("nasa-astronaut"), bench.conditions["yaw-r20"]
    method = _deca_adapter(tmp_path, size)
    render = method.head_render("nasa-astronaut", reference, condition, size)

    (points,) = dlib_landmarks([reference])  # no FAN file here: the dlib stand-in, as the adapter picks
    aligned = ffhq_align(reference, points, size)
    (aligned_points,) = dlib_landmarks([aligned])
    assert aligned_points is not None
    square = landmark_square(aligned_points)
    (aligned_code,) = encode_crops(method.reconstructor.encoder, deca_crop_square(aligned, square)[None])
    shape_code = method.identity_code("nasa-astronaut", reference)
    expected = method.renderer.render(shape_code, {**condition.coefficients(), "cam": aligned_code["cam"]},
                                      "position,pose,expression", size, CropFrame(square.tform, size, size))
    np.testing.assert_array_equal(render.normal, expected.normal)
    # the frame CapHuman draws into (the reference stretched to size², TestData) puts the head elsewhere
    _, stretched = method.photo_code("nasa-astronaut", reference)
    assert not np.allclose(stretched.tform, square.tform, atol=1e-3)
    elsewhere = method.renderer.render(shape_code, {**condition.coefficients(), "cam": aligned_code["cam"]},
                                       "position,pose,expression", size, stretched)
    head, head_elsewhere = np.abs(render.normal).sum(0) > 0, np.abs(elsewhere.normal).sum(0) > 0
    assert head.sum() > 0.05 * size * size and (head != head_elsewhere).mean() > 0.02
    assert method.head_inputs(method.params)["ffhq_align"].startswith("reference (and pose photo) FFHQ-aligned")


def test_a_reference_without_landmarks_is_a_clear_error(tmp_path, bench):
    method = _deca_adapter(tmp_path)
    with pytest.raises(BenchError, match=r"'blank': no 68 face landmarks \(dlib\) in the photo; Arc2Face's pose demo aligns"):
        method.head_render("blank", Image.new("RGB", (64, 64), (90, 90, 90)), bench.conditions["yaw-r20"], 128)


def test_a_pose_photo_is_aligned_the_same_way(tmp_path, bench):
    """A condition with a pose photo is the demo's own case: that photo is FFHQ-aligned and DECA frames the aligned photo."""
    import dataclasses

    from caphuman_bench.faces.ffhq_align import ffhq_align
    from caphuman_bench.faces.landmarks import dlib_landmarks
    from caphuman_bench.models.deca_encoder import landmark_square

    pose_photo, reference = bench.reference_image("grace-hopper"), bench.reference_image("nasa-astronaut")
    pose_photo.save(tmp_path / "pose.png")
    posed = dataclasses.replace(bench.conditions["yaw-r20"], pose_image=str(tmp_path / "pose.png"))
    method = _deca_adapter(tmp_path)
    method.head_render("nasa-astronaut", reference, posed, 128)
    (points,) = dlib_landmarks([pose_photo])
    (aligned_points,) = dlib_landmarks([ffhq_align(pose_photo, points, 128)])
    _, frame = method._codes[f"ffhq-pose-{posed.id}"]
    np.testing.assert_allclose(frame.tform, landmark_square(aligned_points).tform)
    assert (frame.width, frame.height) == (128, 128)
