"""Strict conversion of the full-size official CapHuman layout (1880 keys) into the port, on `meta`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

from caphuman_bench.errors import BenchError
from caphuman_bench.loaders.convert_caphuman import (
    SD15_HPARAMS,
    build_components,
    caphuman_configs,
    check_schedule,
    convert_caphuman_state_dict,
    load_converted,
    schedule_buffers,
)

LAYOUT = Path(__file__).parent / "data" / "caphuman_full_layout.tsv"


def _layout_state_dict() -> dict[str, torch.Tensor]:
    rows = [line.split("\t") for line in LAYOUT.read_text().splitlines()[1:]]
    return {
        key: torch.empty(eval(shape), dtype=getattr(torch, dtype), device="meta")  # noqa: S307 - "[320, 4, 3, 3]"
        for key, shape, dtype in rows
    }


@pytest.fixture(scope="module")
def configs():
    return caphuman_configs(SD15_HPARAMS)


@pytest.fixture(scope="module")
def modules(configs):
    with init_empty_weights():
        return build_components(configs)


def test_sd15_configs_are_the_diffusers_sd15_ones(configs):
    assert configs.unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert configs.unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert configs.unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert configs.unet["attention_head_dim"] == 8 and configs.unet["cross_attention_dim"] == 768
    assert configs.capface["conditioning_embedding_out_channels"] == (16, 32, 96, 256)
    assert configs.capface["image_token_dim"] == 1024 and configs.capface["conditioning_channels"] == 9


def test_full_layout_converts_and_loads_strictly(configs, modules):
    state_dict = _layout_state_dict()
    assert len(state_dict) == 1880
    converted = convert_caphuman_state_dict(state_dict, configs, modules)
    assert sum(len(v) for v in converted.values()) == 1880 - 13  # all but the schedule buffers
    load_converted(modules, converted, assign=True)  # load_state_dict(strict=True, assign=True)
    assert modules["capface"].mask_predict.weight.shape == (1, 320, 3, 3)
    assert modules["capface"].img_linear.weight.shape == (768, 1024)


def test_missing_key_is_named(configs, modules):
    state_dict = _layout_state_dict()
    del state_dict["control_model.zero_convs.5.0.weight"]
    with pytest.raises(BenchError, match=r"missing 1 key.*control_model\.zero_convs\.5\.0\.weight"):
        convert_caphuman_state_dict(state_dict, configs, modules)


def test_extra_key_is_named(configs, modules):
    state_dict = _layout_state_dict()
    state_dict["model.diffusion_model.output_blocks.3.9.weight"] = torch.empty(4, device="meta")
    state_dict["pose_control_model.conv.weight"] = torch.empty(4, device="meta")
    with pytest.raises(BenchError, match=r"pose_control_model\.conv\.weight"):
        convert_caphuman_state_dict(state_dict, configs, modules)
    del state_dict["pose_control_model.conv.weight"]
    with pytest.raises(BenchError, match=r"unexpected 1 key.*model\.diffusion_model\.output_blocks\.3\.9\.weight"):
        convert_caphuman_state_dict(state_dict, configs, modules)


def test_shape_mismatch_is_named(configs, modules):
    state_dict = _layout_state_dict()
    state_dict["id_linear.weight"] = torch.empty(768, 256, device="meta")
    with pytest.raises(BenchError, match=r"shape mismatch.*id_linear\.weight \[768, 256\]"):
        convert_caphuman_state_dict(state_dict, configs, modules)


def test_transformers_4_layout_with_position_ids_is_consumed_and_checked(configs, modules):
    """Official checkpoints (transformers 4.24) nest CLIP under text_model./vision_model. and save position_ids."""
    old = {}
    for key, tensor in _layout_state_dict().items():
        for prefix, inner in (("cond_stage_model.transformer.", "text_model."),
                              ("control_cond_stage_model.transformer.", "vision_model.")):
            if key.startswith(prefix):
                key = prefix + inner + key[len(prefix):]
                break
        old[key] = tensor
    old["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    old["control_cond_stage_model.transformer.vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    converted = convert_caphuman_state_dict(old, configs, modules)
    assert "embeddings.position_ids" not in converted["text_encoder"]
    assert "embeddings.token_embedding.weight" in converted["text_encoder"]
    old["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None].flip(-1)
    with pytest.raises(BenchError, match=r"position_ids is not arange\(77\)"):
        convert_caphuman_state_dict(old, configs, modules)


def test_schedule_buffers_are_checked_against_hparams():
    buffers = {k: torch.tensor(v, dtype=torch.float32) for k, v in schedule_buffers(SD15_HPARAMS).items()}
    check_schedule(buffers, SD15_HPARAMS)
    buffers["alphas_cumprod"] = buffers["alphas_cumprod"] * 1.01
    with pytest.raises(BenchError, match="alphas_cumprod"):
        check_schedule(buffers, SD15_HPARAMS)
