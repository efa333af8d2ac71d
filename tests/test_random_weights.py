"""benchmarks/make_random_weights.py writes what the real loaders accept strictly: full layouts
checked by key set and shape on the meta device, the tiny layout (and the small files) written and
loaded through the loaders a run uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_random_weights as mrw  # noqa: E402

from caphuman_bench.loaders.convert_caphuman import (  # noqa: E402
    SD15_HPARAMS, build_components, caphuman_configs, convert_caphuman_state_dict, load_caphuman_components,
)


def test_full_caphuman_layout_converts_strictly_on_meta():
    state = mrw.caphuman_state_dict("full", device="meta")
    assert len(state) == 1880  # the official checkpoint's key count
    configs = caphuman_configs(SD15_HPARAMS)
    with init_empty_weights():
        modules = build_components(configs)
    converted = convert_caphuman_state_dict(state, configs, modules, require_schedule=False)
    assert sum(len(v) for v in converted.values()) == 1880 - 13  # all but the 13 DDPM schedule buffers


def test_full_network_layouts_match_their_loaders_on_meta():
    from facenet_pytorch import InceptionResnetV1

    from caphuman_bench.models.deca_encoder import DecaEncoder, layout_differences
    from caphuman_bench.models.face_parser import BiSeNet
    from caphuman_bench.models.identity_encoder import _check_keys

    facenet = mrw.facenet_state_dict(device="meta")
    assert facenet["logits.weight"].shape == (8631, 512)  # VGGFace2's 8631 identities, as the release file holds
    with torch.device("meta"):
        _check_keys(InceptionResnetV1(pretrained=None, classify=False).state_dict(),
                    {k: v for k, v in facenet.items() if not k.startswith("logits.")}, "facenet")
        bisenet_expected = BiSeNet().state_dict()
        deca_expected = DecaEncoder().state_dict()
    bisenet = mrw.bisenet_state_dict(device="meta")
    assert {k: v.shape for k, v in bisenet.items()} == {k: v.shape for k, v in bisenet_expected.items()}
    assert layout_differences(mrw.deca_state_dict(device="meta"), deca_expected) == []
    clip = mrw.open_clip_state_dict(device="meta")
    assert clip["visual.proj"].shape == (1024, 768) and clip["text_projection"].shape == (768, 768)  # ViT-L/14: width 1024, embed 768
    assert clip["visual.positional_embedding"].shape == (257, 1024)  # 16 × 16 patches of 14 px + class token


def test_values_are_initialised_by_role():
    g = torch.Generator().manual_seed(0)
    weight = mrw.random_tensor("input_blocks.1.0.in_layers.2.weight", [320, 320, 3, 3], torch.float32, g, "cpu")
    assert abs(weight.std().item() - (1 / (320 * 9)) ** 0.5) < 2e-3  # N(0, 1/fan_in)
    assert torch.equal(mrw.random_tensor("x.norm1.weight", [8], torch.float32, g, "cpu"), torch.ones(8))
    assert torch.equal(mrw.random_tensor("x.proj.bias", [8], torch.float32, g, "cpu"), torch.zeros(8))
    assert torch.equal(mrw.random_tensor("bn.running_var", [8], torch.float32, g, "cpu"), torch.ones(8))
    ids = mrw.random_tensor("vision_model.embeddings.position_ids", [1, 257], torch.int64, g, "cpu")
    assert torch.equal(ids, torch.arange(257)[None])


def test_tiny_checkpoint_and_flame_files_load_through_the_run_loaders(tmp_path):
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.render.head_condition import HeadConditionRenderer, neutral_identity_code

    written = mrw.write_all(tmp_path, layout="tiny", only=["caphuman_ckpt", "flame_model"])
    assert set(written) == {"caphuman_ckpt", "flame_model", "flame_texture", "flame_head_template"}
    checkpoint = torch.load(written["caphuman_ckpt"], weights_only=True)
    assert set(checkpoint) == {"state_dict"}  # a Lightning checkpoint, as released
    components = load_caphuman_components(written["caphuman_ckpt"], hparams=mrw.tiny_hparams())
    assert {"unet", "capface", "scheduler", "tokenizer"} <= set(components)
    assert all(torch.isfinite(p).all() for p in components["capface"].parameters())
    renderer = HeadConditionRenderer.from_files(written["flame_model"], written["flame_texture"], written["flame_head_template"])
    render = renderer.render(neutral_identity_code(), Benchmark.load().conditions["frontal"], size=64)
    assert render.hint.shape == (9, 64, 64)


@pytest.mark.slow
def test_full_size_small_networks_write_and_load(tmp_path):
    from caphuman_bench.models.deca_encoder import load_deca_encoder
    from caphuman_bench.models.face_parser import FaceParser
    from caphuman_bench.models.identity_encoder import load_facenet

    written = mrw.write_all(tmp_path, only=["facenet_vggface2", "face_parser_bisenet", "deca_model"])
    load_facenet(written["facenet_vggface2"])
    FaceParser.from_file(written["face_parser_bisenet"])
    encoder = load_deca_encoder(written["deca_model"])
    with torch.no_grad():
        assert encoder(torch.rand(1, 3, 224, 224)).shape == (1, 236)
