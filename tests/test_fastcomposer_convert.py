"""The FastComposer converter: the official `FastComposerModel.state_dict()` layout, strictly, keys named on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from caphuman_bench.conformance.fastcomposer import official_state_dict
from caphuman_bench.errors import BenchError
from caphuman_bench.loaders.convert_caphuman import load_checkpoint_file
from caphuman_bench.loaders.convert_fastcomposer import COMPONENTS, convert_fastcomposer_state_dict, fastcomposer_modules
from caphuman_bench.methods.fastcomposer import build_tiny_fastcomposer_pipeline

VECTORS = Path(__file__).parent / "data" / "fastcomposer"
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def official_layout(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """What the official checkpoint holds for these modules: attribute-prefixed keys, transformers 4.x
    `position_ids` buffers, and diffusers 0.16's names for the VAE's attention."""
    out = {}
    for name in COMPONENTS:
        for key, tensor in modules[name].state_dict().items():
            if name == "vae" and ".attentions." in key:
                for new, old in LEGACY.items():
                    key = key.replace(f".{new}.", f".{old}.")
            out[f"{name}.{key}"] = tensor
    n_text = modules["text_encoder"].embeddings.position_embedding.weight.shape[0]
    n_vision = modules["image_encoder"].vision_model.embeddings.position_embedding.weight.shape[0]
    out["text_encoder.embeddings.position_ids"] = torch.arange(n_text)[None]
    out["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(n_vision)[None]
    return out


def _modules(seed):
    return {name: getattr(build_tiny_fastcomposer_pipeline(seed=seed), name) for name in COMPONENTS}


@pytest.fixture(scope="module")
def source():
    return _modules(seed=0)


@pytest.fixture(scope="module")
def target():
    """Other random weights of the same architecture (tests only read its names and shapes, or load into it)."""
    return _modules(seed=1)


def test_official_layout_converts_exactly(source, target, tmp_path):
    state = official_layout(source)
    assert any(".attentions.0.query." in k for k in state)  # the legacy names are exercised
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    converted = convert_fastcomposer_state_dict(load_checkpoint_file(path), target, label=str(path))
    for name in COMPONENTS:
        target[name].load_state_dict(converted[name], strict=True)
        for key, tensor in source[name].state_dict().items():
            assert torch.equal(target[name].state_dict()[key], tensor), f"{name}.{key}"


def test_released_architecture_maps_one_to_one():
    """The full-size SD-1.5 / CLIP ViT-L/14 configs accept the official layout (meta tensors: shapes only)."""
    modules = fastcomposer_modules(meta=True)
    state = official_layout(modules)
    converted = convert_fastcomposer_state_dict(state, modules)
    assert sum(len(v) for v in converted.values()) == len(state) - 2  # all but the two position_ids buffers
    assert converted["postfuse_module"]["mlp1.fc1.weight"].shape == (768, 1536)
    assert converted["image_encoder"]["visual_projection.weight"].shape == (768, 1024)


def test_the_layout_above_is_the_authors_own():
    """`official_layout` against a real `FastComposerModel.state_dict()` of the authors' code (the conformance
    vectors' tiny model, tests/data/fastcomposer): the same key names and shapes. The file keeps only the token
    table's rows the cases use; its row count comes from hparams.json, as the check rebuilds it."""
    hparams = json.loads((VECTORS / "hparams.json").read_text())
    shapes = {key: list(tensor.shape) for key, tensor in official_state_dict(VECTORS / "state_dict.safetensors", hparams).items()}
    ours = official_layout(fastcomposer_modules(meta=True, hparams=hparams))
    assert {key: list(tensor.shape) for key, tensor in ours.items()} == shapes


def test_missing_extra_and_misshapen_keys_are_named(source, target):
    state = official_layout(source)
    del state["postfuse_module.mlp2.fc1.bias"]
    state["unet.extra_block.weight"] = torch.zeros(1)
    state["ema_param"] = torch.zeros(1)
    state["image_encoder.visual_projection.weight"] = torch.zeros(3, 3)
    with pytest.raises(BenchError) as info:
        convert_fastcomposer_state_dict(state, target, label="ckpt.bin")
    message = str(info.value)
    assert message.startswith("ckpt.bin: ")
    for text in ("postfuse_module.mlp2.fc1.bias", "unet.extra_block.weight", "ema_param",
                 "image_encoder.visual_projection.weight [3, 3]"):
        assert text in message, text


def test_position_ids_must_be_arange(source, target):
    state = official_layout(source)
    state["text_encoder.embeddings.position_ids"] = torch.arange(77).flip(0)[None]
    with pytest.raises(BenchError, match=r"text_encoder.embeddings.position_ids is not arange\(77\)"):
        convert_fastcomposer_state_dict(state, target)


def test_a_file_that_runs_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "pytorch_model.bin"
    torch.save({"unet.x": Payload()}, path)
    with pytest.raises(BenchError, match="weights_only"):
        load_checkpoint_file(path)
