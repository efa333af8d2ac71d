"""FastComposer: the fusion formula, the subject token, delayed conditioning, and a smoke run through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.methods.base import with_trigger_word
from caphuman_bench.methods.fastcomposer import build_tiny_fastcomposer_pipeline
from caphuman_bench.models.fastcomposer import FastComposerPostfuseModule
from caphuman_bench.pipelines.pipeline_fastcomposer import subject_pixel_values, subject_token_ids
from tests.cli_helpers import cli, image_digests, only_run
from tests.method_helpers import generation_request


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_tiny_fastcomposer_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _mlp(x, mlp):
    """The official `MLP.forward`, written out: fc2(GELU(fc1(LayerNorm(x)))) (+ x with the residual)."""
    y = F.layer_norm(x, (x.shape[-1],), mlp.layernorm.weight, mlp.layernorm.bias, eps=1e-5)
    y = F.linear(F.gelu(F.linear(y, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    return y + x if mlp.use_residual else y


def test_fusion_is_the_official_formula_at_the_subject_token_only():
    torch.manual_seed(0)
    module = FastComposerPostfuseModule(embed_dim=16).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    text, objects = torch.randn(2, 9, 16), torch.randn(2, 16)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3] = mask[1, 6] = True
    with torch.no_grad():
        fused = module(text, objects, mask)
        for row, col in ((0, 3), (1, 6)):
            t, o = text[row, col], objects[row]
            h = _mlp(torch.cat([t, o]), module.mlp1) + t  # fuse_fn: mlp1([t; o]) + t
            expected = F.layer_norm(_mlp(h, module.mlp2), (16,), module.layer_norm.weight, module.layer_norm.bias)
            torch.testing.assert_close(fused[row, col], expected)
    changed = (fused != text).any(dim=-1)
    assert torch.equal(changed, mask)  # every other token's embedding is untouched
    with pytest.raises(ValueError, match="exactly one subject token"):
        module(text, objects, torch.zeros(2, 9, dtype=torch.bool))


def test_subject_token_is_the_word_before_the_trigger_wherever_it_stands(pipe):
    """The trigger is split out as the official special token: before a comma too ('img,', sty-cyberpunk)."""
    for prompt_id, after in (("acc-rainbow-scarf", " wearing"), ("sty-cyberpunk", ",")):
        prompt = with_trigger_word(generation_request(Benchmark.load(), prompt_id=prompt_id), "img")
        assert f"a woman img{after}" in prompt
        ids, index = subject_token_ids(pipe.trigger_tokenizer, pipe.tokenizer.pad_token_id, prompt)
        assert ids == pipe._tokens([prompt.replace("img", "")], torch.device("cpu"))[0].tolist()
        assert pipe.tokenizer.decode([ids[index]]).strip() == "woman"
        _, _, _, mask = pipe.encode_prompt([prompt], [""], torch.device("cpu"))
        assert mask[0].nonzero().flatten().tolist() == [index]
    assert "img" not in pipe.tokenizer.get_vocab()  # the pipeline's own tokenizer is left as it is


def test_trigger_rules(pipe):
    def index(prompt):
        return subject_token_ids(pipe.trigger_tokenizer, pipe.tokenizer.pad_token_id, prompt)[1]

    assert index("a man img reading") == index("a man img, reading") == index("a man img. reading") == 2
    for bad in ("a man reading", "img a man", "a man img and a woman img"):
        with pytest.raises(ValueError, match="trigger word"):
            index(bad)


def test_subject_image_is_padded_square_with_black_then_resized():
    """PadToSquare(fill=0): (long - short) // 2 on both sides; then CLIP normalisation."""
    image = Image.new("RGB", (40, 60), (255, 255, 255))  # 40 wide, 60 high → 10 black columns each side
    pixels = subject_pixel_values(image, 60, 60)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    raw = pixels * std[:, None, None] + mean[:, None, None]
    assert raw.shape == (3, 60, 60)
    torch.testing.assert_close(raw[:, :, :10], torch.zeros(3, 60, 10), atol=1e-6, rtol=0)
    torch.testing.assert_close(raw[:, :, 10:50], torch.ones(3, 60, 40), atol=1e-6, rtol=0)


def _images(pipe, references, alpha, prompt="a photo of a woman img reading a book"):
    out = pipe([prompt] * len(references), references, height=64, width=64, num_inference_steps=3, alpha=alpha,
               generator=[torch.Generator().manual_seed(5) for _ in references], output_type="np")
    return out.images


def test_delayed_subject_conditioning(pipe):
    """alpha = 0: every step sees the text alone, so the reference cannot matter; alpha = 1: all but step 0 see it."""
    gray, noise = Image.new("RGB", (48, 48), (128, 128, 128)), Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    text_only = _images(pipe, [gray, noise], alpha=0.0)
    np.testing.assert_allclose(text_only[0], text_only[1], atol=1e-5)  # float noise of batched matmuls only
    with_subject = _images(pipe, [gray, noise], alpha=1.0)
    assert np.abs(with_subject[0] - with_subject[1]).max() > 1e-3  # 100 × the float noise above
    np.testing.assert_allclose(_images(pipe, [gray], alpha=1.0)[0], with_subject[0], atol=1e-5)  # batch-independent


def test_smoke_run_through_the_cli(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "fastcomposer", "--preset", "smoke", "--runs-dir", runs,
                       "--metrics", "face_detection", "--param", "num_inference_steps=2")
    assert code == 0, err
    run = only_run(runs)
    digests = image_digests(run)
    assert len(digests) == 12 and len(set(digests.values())) > 1
    assert all(Image.open(p).size == (64, 64) for p in (run / "images").glob("*.png"))
    for name in ("run.json", "tasks.jsonl", "status.jsonl", "scores.parquet", "results.json", "leaderboard.md"):
        assert (run / name).exists(), name
    results = json.loads((run / "results.json").read_text())
    assert results["images"] == {"planned": 12, "ok": 12, "failed": 0, "missing": 0}
