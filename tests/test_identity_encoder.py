"""BiSeNet port, CapHuman whitening and the identity encoder, with random weights (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.models.face_parser import WHITENED_IDS, BiSeNet, FaceParser
from caphuman_bench.models.identity_encoder import (
    CAPHUMAN_CLIP_VISION_PREFIX,
    IdentityEncoder,
    clip_vision_state_dict_from_caphuman,
    load_clip_vision,
    load_facenet,
)

FULL_LAYOUT = Path(__file__).parent / "data" / "caphuman_full_layout.tsv"


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())  # public domain NASA portrait, 512 x 512


@pytest.fixture(scope="module")
def tiny_encoder() -> IdentityEncoder:
    return IdentityEncoder.random(image_token_dim=64, seed=0)


def _random_like(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else torch.full_like(v, 7))
            for k, v in model.state_dict().items()}


def test_bisenet_loads_79999_iter_layout_strictly(tmp_path):
    state_dict = _random_like(BiSeNet())
    # The released 79999_iter.pth: 191 tensors (with BatchNorm counters), 13.3 M numbers = 53 MB float32.
    assert len(state_dict) == 191
    assert sum(v.numel() for v in state_dict.values()) == 13_313_119
    assert state_dict["cp.resnet.conv1.weight"].shape == (64, 3, 7, 7)
    assert state_dict["cp.resnet.layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state_dict["cp.arm32.conv_atten.weight"].shape == (128, 128, 1, 1)
    assert state_dict["ffm.convblk.conv.weight"].shape == (256, 256, 1, 1)  # res8 (128) + cp8 (128)
    assert state_dict["conv_out.conv_out.weight"].shape == (19, 256, 1, 1)
    assert state_dict["conv_out32.conv_out.weight"].shape == (19, 64, 1, 1)
    path = tmp_path / "79999_iter.pth"
    torch.save(state_dict, path)
    parser = FaceParser.from_file(path)
    loaded = parser.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())


def test_bisenet_refuses_missing_and_renamed_keys(tmp_path):
    state_dict = _random_like(BiSeNet())
    del state_dict["cp.arm16.bn_atten.running_var"]
    torch.save(state_dict, tmp_path / "missing.pth")
    with pytest.raises(BenchError, match=r"missing\.pth.*missing key\(s\) cp\.arm16\.bn_atten\.running_var"):
        FaceParser.from_file(tmp_path / "missing.pth")

    state_dict = _random_like(BiSeNet())
    state_dict["module.ffm.conv1.weight"] = state_dict.pop("ffm.conv1.weight")
    torch.save(state_dict, tmp_path / "renamed.pth")
    with pytest.raises(BenchError, match=r"missing key\(s\) ffm\.conv1\.weight; unexpected key\(s\) module\.ffm\.conv1\.weight"):
        FaceParser.from_file(tmp_path / "renamed.pth")

    state_dict = _random_like(BiSeNet())
    state_dict["conv_out.conv_out.weight"] = torch.zeros(18, 256, 1, 1)
    torch.save(state_dict, tmp_path / "shape.pth")
    with pytest.raises(BenchError, match=r"'conv_out\.conv_out\.weight' has shape \[18, 256, 1, 1\]"):
        FaceParser.from_file(tmp_path / "shape.pth")


def test_whitening_keeps_only_face_classes(monkeypatch):
    # The official list: background 0, ears 7/8, earring 9, neck 14, necklace 15, cloth 16, hair 17, hat 18.
    assert WHITENED_IDS == (0, 7, 8, 9, 14, 15, 16, 17, 18)
    labels = np.repeat(np.arange(19, dtype=np.uint8), 2)[None, :].repeat(4, axis=0)  # 4 x 38, two columns per class
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, size=(4, 38, 3), dtype=np.uint8)
    parser = FaceParser()
    monkeypatch.setattr(parser, "parse", lambda image: labels)
    out = np.asarray(parser.whiten(Image.fromarray(pixels)))
    for class_id in range(19):
        columns = slice(2 * class_id, 2 * class_id + 2)
        if class_id in (0, 7, 8, 9, 14, 15, 16, 17, 18):
            assert (out[:, columns] == 255).all(), class_id
        else:  # skin, brows, eyes, glasses, nose, mouth, lips keep their pixels
            assert np.array_equal(out[:, columns], pixels[:, columns]), class_id


def test_parse_uses_imagenet_normalisation_at_native_size(astronaut):
    from torchvision import transforms

    parser = FaceParser(BiSeNet().eval())
    image = astronaut.resize((96, 64))
    x = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(transforms.ToTensor()(image))
    with torch.no_grad():
        expected = parser.net(x[None])[0].argmax(0).numpy()
    labels = parser.parse(image)
    assert labels.shape == (64, 96)
    assert np.array_equal(labels, expected)


def test_clip_preprocessing_is_pil_bicubic_224_with_clip_mean_std(tiny_encoder, astronaut):
    image = astronaut.crop((0, 0, 512, 400))  # not square: shortest edge to 224, then centre crop
    pixels = tiny_encoder.clip_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    resized = image.resize((int(224 * 512 / 400), 224), Image.Resampling.BICUBIC)
    left = (resized.width - 224) // 2
    crop = np.asarray(resized.crop((left, 0, left + 224, 224)), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = torch.from_numpy((crop - mean) / std).permute(2, 0, 1)
    assert pixels.shape == (3, 224, 224)
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)


def test_mtcnn_finds_the_astronaut_face(tiny_encoder, astronaut):
    boxes, probs = tiny_encoder.mtcnn.detect(astronaut)
    assert boxes is not None and probs[0] > 0.99
    x0, y0, x1, y1 = boxes[0]
    assert 150 < (x0 + x1) / 2 < 250 and 50 < (y0 + y1) / 2 < 150  # her face is upper left of centre


def test_tiny_encoder_shapes_and_unit_norm(tiny_encoder, astronaut):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    tokens = tiny_encoder([astronaut, noise])
    assert tokens.image_tokens.shape == (2, 17, 64)
    assert tokens.id_embedding.shape == (2, 1, 512)
    torch.testing.assert_close(tokens.id_embedding.norm(dim=-1), torch.ones(2, 1))
    assert tokens.face_found == [True, False]  # noise: the official whole-image fallback
    # Same photo twice in one batch → the same tokens (no cross-sample leakage).
    again = tiny_encoder([noise])
    torch.testing.assert_close(again.image_tokens[0], tokens.image_tokens[1], atol=1e-5, rtol=1e-5)


def test_global_embedding_is_facenet_of_the_prewhitened_mtcnn_crop(tiny_encoder, astronaut):
    from facenet_pytorch import MTCNN

    crop = MTCNN(image_size=160, margin=0)(astronaut)
    assert crop.min() < -0.5  # prewhitened (x - 127.5) / 128, not [0, 1]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(tiny_encoder.facenet(crop[None]), dim=-1)
    embedding, found = tiny_encoder.encode_global([astronaut])
    assert found == [True]
    torch.testing.assert_close(embedding[:, 0], expected)


def _official_clip_vision_layout() -> dict[str, torch.Tensor]:
    """The CapHuman checkpoint's CLIP vision keys as transformers 4.24 saved them (meta tensors)."""
    state_dict = {}
    for line in FULL_LAYOUT.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        if key.startswith(CAPHUMAN_CLIP_VISION_PREFIX):
            legacy = CAPHUMAN_CLIP_VISION_PREFIX + "vision_model." + key[len(CAPHUMAN_CLIP_VISION_PREFIX):]
            state_dict[legacy] = torch.empty([int(s) for s in shape.strip("[]").split(",") if s.strip()], device="meta")
    state_dict[CAPHUMAN_CLIP_VISION_PREFIX + "vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    return state_dict


@pytest.mark.skipif(not FULL_LAYOUT.exists(), reason="tests/data/caphuman_full_layout.tsv not shipped")
def test_full_size_clip_vision_from_caphuman_layout_gives_257x1024_tokens():
    state_dict = _official_clip_vision_layout()
    assert len(state_dict) == 392  # 391 tensors + the 4.24 position_ids buffer
    model = load_clip_vision(clip_vision_state_dict_from_caphuman(state_dict, "caphuman.ckpt"), "caphuman.ckpt")
    with torch.no_grad():
        tokens = model(pixel_values=torch.empty(2, 3, 224, 224, device="meta")).last_hidden_state
    assert tokens.shape == (2, 257, 1024)

    del state_dict[CAPHUMAN_CLIP_VISION_PREFIX + "vision_model.encoder.layers.23.mlp.fc2.bias"]
    with pytest.raises(BenchError, match=r"caphuman\.ckpt: CLIP vision .*missing key\(s\) encoder\.layers\.23\.mlp\.fc2\.bias"):
        load_clip_vision(clip_vision_state_dict_from_caphuman(state_dict, "caphuman.ckpt"), "caphuman.ckpt")


def test_facenet_file_loads_without_its_classifier_and_names_missing_keys(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    state_dict = _random_like(InceptionResnetV1())
    state_dict["logits.weight"] = torch.zeros(8631, 512)  # the vggface2 file carries its classifier
    state_dict["logits.bias"] = torch.zeros(8631)
    torch.save(state_dict, tmp_path / "vggface2.pt")
    model = load_facenet(tmp_path / "vggface2.pt")
    assert torch.equal(model.state_dict()["last_linear.weight"], state_dict["last_linear.weight"])

    del state_dict["block8.conv2d.weight"]
    torch.save(state_dict, tmp_path / "broken.pt")
    with pytest.raises(BenchError, match=r"broken\.pt: FaceNet InceptionResnetV1: missing key\(s\) block8\.conv2d\.weight"):
        load_facenet(tmp_path / "broken.pt")


def test_from_pretrained_files_reads_the_official_checkpoint_layout(tmp_path, monkeypatch, astronaut):
    """FaceNet and BiSeNet files + CLIP vision tensors named as in caphuman.ckpt (transformers 4.24:
    `vision_model.` level and `position_ids`); ViT-L/14 is swapped for a tiny config to stay fast."""
    from facenet_pytorch import InceptionResnetV1
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import caphuman_bench.models.identity_encoder as identity_encoder

    tiny = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            image_size=224, patch_size=56, hidden_act="quick_gelu")
    monkeypatch.setattr(identity_encoder, "clip_vit_l14_vision_config", lambda: tiny)
    torch.manual_seed(0)
    vision = CLIPVisionModel(tiny).eval()
    checkpoint = {CAPHUMAN_CLIP_VISION_PREFIX + "vision_model." + k: v for k, v in vision.state_dict().items()}
    checkpoint[CAPHUMAN_CLIP_VISION_PREFIX + "vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    checkpoint["id_linear.weight"] = torch.zeros(768, 512)  # other parts of the checkpoint are ignored
    facenet = InceptionResnetV1().eval()
    torch.save(facenet.state_dict(), tmp_path / "vggface2.pt")
    parser_net = BiSeNet().eval()
    torch.save(parser_net.state_dict(), tmp_path / "79999_iter.pth")

    encoder = IdentityEncoder.from_pretrained_files(tmp_path / "vggface2.pt", tmp_path / "79999_iter.pth", checkpoint)
    tokens = encoder([astronaut])
    whitened = FaceParser(parser_net).whiten(astronaut)
    pixels = encoder.clip_processor(images=[whitened], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected_local = vision(pixel_values=pixels).last_hidden_state
        expected_global = facenet(encoder.mtcnn(astronaut)[None])
    torch.testing.assert_close(tokens.image_tokens, expected_local)
    torch.testing.assert_close(tokens.id_embedding[:, 0], expected_global)

    checkpoint[CAPHUMAN_CLIP_VISION_PREFIX + "vision_model.embeddings.position_ids"] = torch.arange(1, 18)[None]
    with pytest.raises(BenchError, match=r"position_ids is not 0\.\.N-1"):
        IdentityEncoder.from_pretrained_files(tmp_path / "vggface2.pt", tmp_path / "79999_iter.pth", checkpoint)
