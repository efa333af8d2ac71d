"""PhotoMaker (v1 / v2) with the smoke preset: prompt handling as the authors' pipeline, the ID encoder's
fusion and key map, the delayed identity merge, the CLI end to end on the demo split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caphuman_bench import weights
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import get_card
from caphuman_bench.errors import BenchError, MissingWeightsError
from caphuman_bench.methods.base import MethodContext
from caphuman_bench.methods.base import with_trigger_word
from caphuman_bench.methods.photomaker import start_merge_step
from caphuman_bench.models.photomaker import FuseModule, PhotoMakerIDEncoder, convert_photomaker_id_encoder
from caphuman_bench.registry import get_method
from tests.cli_helpers import cli, only_run
from tests.method_helpers import generated_pixels, generation_request


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return Benchmark.load()


def _adapter(name: str, **overrides):
    card = get_card(name)
    method = get_method(card.adapter)(card, card.resolve_params("smoke", overrides), MethodContext(device="cpu"))
    method.load()
    return method


@pytest.fixture(scope="module")
def v1():
    return _adapter("photomaker")


@pytest.fixture(scope="module")
def v2():
    return _adapter("photomaker_v2")


def test_trigger_word_follows_the_class_word(bench):
    """The class word ends the identity's subject phrase: the trigger goes right after the phrase."""
    assert with_trigger_word(generation_request(bench), "img") == "a photo of a woman img wearing a red hat"
    for prompt, expected in (("an oil painting of a woman", "an oil painting of a woman img"),
                             ("a pencil sketch of a woman, neon", "a pencil sketch of a woman img, neon")):
        assert with_trigger_word(generation_request(bench, prompt=prompt), "img") == expected
    with pytest.raises(BenchError, match="does not contain the identity's subject phrase 'a woman'"):
        with_trigger_word(generation_request(bench, prompt="a photo of a cat"), "img")


def test_start_merge_step_is_the_demo_rule():
    assert start_merge_step(20, 50) == 10  # the README's start_merge_step=10
    assert start_merge_step(50, 100) == 30  # capped at 30 as app.py
    assert start_merge_step(20, 3) == 0


@pytest.mark.parametrize("version, copies", [("v1", 1), ("v2", 2)])
def test_class_token_expansion_as_the_authors_pipeline(v1, v2, version, copies):
    """The trigger is removed and the class token before it repeated `copies` times (per ID image); the
    mask marks exactly those copies."""
    pipe = (v1 if version == "v1" else v2).pipe
    tok = pipe.tokenizer
    ids, mask = pipe.class_token_ids(tok, "a photo of a woman img wearing a red hat", num_id_images=1)
    plain = tok("a photo of a " + " ".join(["woman"] * copies) + " wearing a red hat", padding="max_length",
                max_length=77, truncation=True).input_ids
    assert ids == plain and len(ids) == 77
    woman = tok.convert_tokens_to_ids("woman</w>")
    assert [i for i, m in enumerate(mask) if m] == [i for i, t in enumerate(ids) if t == woman]
    with pytest.raises(ValueError, match="exactly once"):
        pipe.class_token_ids(tok, "a photo of a woman wearing a red hat", num_id_images=1)


def test_fuse_module_formula():
    """fused = LayerNorm(MLP2(MLP1([prompt ‖ id]) + prompt)) at the masked positions, in order; others unchanged."""
    torch.manual_seed(0)
    fuse = FuseModule(8).eval()
    prompt = torch.randn(2, 6, 8)
    ids = torch.randn(2, 1, 2, 8)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:3] = mask[1, 4:6] = True
    out = fuse(prompt, ids, mask)
    for b, positions in ((0, (1, 2)), (1, (4, 5))):
        for k, p in enumerate(positions):
            x = torch.cat([prompt[b, p], ids[b, 0, k]])
            m1 = fuse.mlp1.fc2(torch.nn.functional.gelu(fuse.mlp1.fc1(fuse.mlp1.layernorm(x))))
            h = m1 + prompt[b, p]
            m2 = fuse.mlp2.fc2(torch.nn.functional.gelu(fuse.mlp2.fc1(fuse.mlp2.layernorm(h)))) + h
            torch.testing.assert_close(out[b, p], fuse.layer_norm(m2))
    torch.testing.assert_close(out[~mask], prompt[~mask])


TINY_VISION = {"hidden_size": 16, "intermediate_size": 32, "projection_dim": 8, "num_hidden_layers": 1,
               "num_attention_heads": 2, "image_size": 16, "patch_size": 8}


def official_layout(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A v2 ID encoder's weights under the official names of model_v2.py / resampler.py: token_proj,
    token_norm, perceiver_resampler with norm1 / norm2 / to_q / to_kv / to_out and FeedForward 1.0 / 1.1 / 1.3."""
    official = {k: v for k, v in ours.items() if not k.startswith("qformer_perceiver.")}
    if len(official) == len(ours):
        return official
    p, r = "qformer_perceiver.", "qformer_perceiver.perceiver_resampler."
    for part in ("weight", "bias"):
        official[f"{p}token_proj.0.{part}"] = ours[f"{p}proj.net.0.proj.{part}"]
        official[f"{p}token_proj.2.{part}"] = ours[f"{p}proj.net.2.{part}"]
        official[f"{p}token_norm.{part}"] = ours[f"{p}norm.{part}"]
        for name in ("proj_in", "proj_out", "norm_out"):
            official[f"{r}{name}.{part}"] = ours[f"{p}{name}.{part}"]
        for i in range(4):
            official[f"{r}layers.{i}.0.norm1.{part}"] = ours[f"{p}layers.{i}.ln0.{part}"]
            official[f"{r}layers.{i}.0.norm2.{part}"] = ours[f"{p}layers.{i}.ln1.{part}"]
            official[f"{r}layers.{i}.1.0.{part}"] = ours[f"{p}layers.{i}.ff.0.{part}"]
    for i in range(4):
        official[f"{r}layers.{i}.0.to_q.weight"] = ours[f"{p}layers.{i}.attn.to_q.weight"]
        official[f"{r}layers.{i}.0.to_kv.weight"] = torch.cat([ours[f"{p}layers.{i}.attn.to_k.weight"],
                                                              ours[f"{p}layers.{i}.attn.to_v.weight"]])
        official[f"{r}layers.{i}.0.to_out.weight"] = ours[f"{p}layers.{i}.attn.to_out.0.weight"]
        official[f"{r}layers.{i}.1.1.weight"] = ours[f"{p}layers.{i}.ff.1.net.0.proj.weight"]
        official[f"{r}layers.{i}.1.3.weight"] = ours[f"{p}layers.{i}.ff.1.net.2.weight"]
    return official


def test_v2_checkpoint_key_map_covers_the_official_perceiver():
    """The official names map onto every weight of the port, to_kv split into to_k (first half) and to_v."""
    encoder = PhotoMakerIDEncoder("v2", vision_config=TINY_VISION, embed_dim=32, perceiver_dim_head=16)
    ours = encoder.state_dict()
    official = official_layout(ours)
    assert len(official) == len(ours) - 4  # four to_k / to_v pairs fused into to_kv
    converted = convert_photomaker_id_encoder(official, "test")
    assert set(converted) == set(ours)
    for key in ours:
        torch.testing.assert_close(converted[key], ours[key])
    with pytest.raises(BenchError, match="unknown PhotoMaker v2 perceiver key"):
        convert_photomaker_id_encoder({"qformer_perceiver.perceiver_resampler.pos_emb.weight": torch.zeros(1)}, "f.bin")


def _official_v2_tokens(weights: dict, id_embed: torch.Tensor, hidden: torch.Tensor, dim_head: int) -> torch.Tensor:
    """model_v2.py's QFormerPerceiver + resampler.py's FacePerceiverResampler, transcribed on the official
    weight names: token_proj → token_norm; per layer PerceiverAttention (q from norm2(latents), k / v
    from [norm1(x) ‖ norm2(latents)] via to_kv's two halves, softmax(q·k / √d)) and FeedForward, both
    residual; proj_out → norm_out; plus the perceiver's residual to the normed tokens."""
    F = torch.nn.functional
    p, r = "qformer_perceiver.", "qformer_perceiver.perceiver_resampler."

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], weights[f"{name}.weight"], weights[f"{name}.bias"])

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], -1, dim_head).transpose(1, 2)

    tokens = F.linear(F.gelu(F.linear(id_embed, weights[p + "token_proj.0.weight"], weights[p + "token_proj.0.bias"])),
                      weights[p + "token_proj.2.weight"], weights[p + "token_proj.2.bias"])
    dim = weights[p + "token_norm.weight"].shape[0]
    tokens = ln(tokens.reshape(id_embed.shape[0], -1, dim), p + "token_norm")
    x = F.linear(hidden, weights[r + "proj_in.weight"], weights[r + "proj_in.bias"])
    latents = tokens
    for i in range(4):
        layer = f"{r}layers.{i}."
        xn, ln_latents = ln(x, layer + "0.norm1"), ln(latents, layer + "0.norm2")
        q = F.linear(ln_latents, weights[layer + "0.to_q.weight"])
        k, v = F.linear(torch.cat([xn, ln_latents], dim=1), weights[layer + "0.to_kv.weight"]).chunk(2, dim=-1)
        attention = torch.softmax(split(q) @ split(k).transpose(-2, -1) / dim_head ** 0.5, dim=-1) @ split(v)
        latents = F.linear(attention.transpose(1, 2).flatten(2), weights[layer + "0.to_out.weight"]) + latents
        ff = F.linear(F.gelu(F.linear(ln(latents, layer + "1.0"), weights[layer + "1.1.weight"])), weights[layer + "1.3.weight"])
        latents = ff + latents
    out = ln(F.linear(latents, weights[r + "proj_out.weight"], weights[r + "proj_out.bias"]), r + "norm_out")
    return tokens + out


def test_v2_perceiver_computes_the_authors_formula_from_official_weights():
    """The port loaded from official-layout weights gives the authors' v2 ID tokens (every norm, bias and
    projection random, so a swapped norm1 / norm2 or to_kv half would show)."""
    from caphuman_bench.pipelines.tiny import redraw_like_reference

    encoder = PhotoMakerIDEncoder("v2", vision_config=TINY_VISION, embed_dim=32, perceiver_dim_head=16)
    redraw_like_reference(encoder, torch.Generator().manual_seed(7))
    official = official_layout(encoder.state_dict())
    port = PhotoMakerIDEncoder("v2", vision_config=TINY_VISION, embed_dim=32, perceiver_dim_head=16)
    port.load_state_dict(convert_photomaker_id_encoder(official, "test"))
    torch.manual_seed(1)
    id_embed, hidden = torch.randn(3, 512), torch.randn(3, 5, TINY_VISION["hidden_size"])
    port.qformer_perceiver.clip_embeds = hidden[:, None]
    with torch.no_grad():
        ours = port.qformer_perceiver(id_embed)
        reference = _official_v2_tokens(official, id_embed, hidden, dim_head=16)
    assert ours.shape == (3, 2, 32)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_loading_path_with_tiny_files(version, tmp_path, monkeypatch, bench):
    """The non-smoke path on files in the official formats: an SDXL diffusers folder, photomaker-vN.bin
    (torch pickle of {"id_encoder": official names, "lora_weights": attention-processor LoRA}) and, for v2,
    an ArcFace ONNX file run by onnxruntime. Only the sizes are tiny."""
    from diffusers import StableDiffusionXLPipeline

    from caphuman_bench.methods.photomaker import ARCFACE_WEIGHTS, CHECKPOINTS, SDXL_FOLDER, tiny_photomaker_lora
    from caphuman_bench.models import photomaker as models
    from caphuman_bench.pipelines.tiny import redraw_like_reference
    from caphuman_bench.pipelines.tiny_sdxl import TINY_CROSS_ATTENTION_DIM, tiny_sdxl_components

    monkeypatch.setattr(models, "PHOTOMAKER_VISION_CONFIG", TINY_VISION)
    monkeypatch.setattr(models, "PERCEIVER_DIM_HEAD", 32)
    components = tiny_sdxl_components(0)
    StableDiffusionXLPipeline(**components).save_pretrained(tmp_path / "sdxl")
    generator = torch.Generator().manual_seed(5)
    encoder = PhotoMakerIDEncoder(version, TINY_VISION, TINY_CROSS_ATTENTION_DIM, 32)
    redraw_like_reference(encoder, generator)
    checkpoint = tmp_path / f"photomaker-{version}.bin"
    lora = tiny_photomaker_lora(components["unet"], generator)
    torch.save({"id_encoder": official_layout(encoder.state_dict()), "lora_weights": lora}, checkpoint)
    paths = {SDXL_FOLDER: tmp_path / "sdxl" / "model_index.json", CHECKPOINTS[version]: checkpoint}
    if version == "v2":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
        network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 512))
        paths[ARCFACE_WEIGHTS] = tmp_path / "w600k_r50.onnx"
        torch.onnx.export(network.eval(), torch.zeros(1, 3, 112, 112), str(paths[ARCFACE_WEIGHTS]), input_names=["input.1"],
                          output_names=["embedding"], dynamic_axes={"input.1": {0: "n"}}, dynamo=False)
    card = get_card("photomaker" if version == "v1" else "photomaker_v2")
    params = card.resolve_params(None, {"height": 64, "width": 64, "num_inference_steps": 3, "batch_size": 2})
    method = get_method(card.adapter)(card, params, MethodContext(device="cpu", weights=paths))
    method.load()
    assert type(method.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    loaded = method.pipe.id_encoder.state_dict()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(loaded[key], value)
    # the LoRA is fused as the README's pipe.fuse_lora(): W + up · down (no alpha in this format: scale 1)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    fused = method.pipe.unet.get_submodule(name.removesuffix(".processor")).to_q
    base = components["unet"].get_submodule(name.removesuffix(".processor")).to_q.weight
    expected = base + lora[f"unet.{name}.to_q_lora.up.weight"] @ lora[f"unet.{name}.to_q_lora.down.weight"]
    torch.testing.assert_close(getattr(fused, "base_layer", fused).weight.detach(), expected.detach())
    images = method.generate([generation_request(bench), generation_request(bench, seed=4)])
    assert [np.asarray(i).shape for i in images] == [(64, 64, 3)] * 2
    if version == "v2":
        assert method.faces.session is not None


def test_a_checkpoint_of_the_wrong_kind_is_named(tmp_path, bench):
    bad = tmp_path / "photomaker-v1.bin"
    torch.save({"image_proj": {}, "ip_adapter": {}}, bad)
    card = get_card("photomaker")
    method = get_method(card.adapter)(card, card.resolve_params(None, {}),
                                      MethodContext(device="cpu", weights={"photomaker_v1": bad, "stable_diffusion_xl_base": tmp_path}))
    with pytest.raises(BenchError, match="photomaker-v1.bin: not a PhotoMaker checkpoint"):
        method.load()


def test_smoke_images_seeded_and_identity_enters_only_after_the_merge_step(v1, v2, bench):
    for adapter in (v1, v2):
        base = generated_pixels(adapter, bench)
        assert base.shape == (64, 64, 3) and base.std() > 0
        assert np.array_equal(generated_pixels(adapter, bench), base)
        assert not np.array_equal(generated_pixels(adapter, bench, seed=9), base)
        # style strength 20 % of 3 steps: merge after step 0, so the reference photo changes the image ...
        assert not np.array_equal(generated_pixels(adapter, bench, identity_id="grace-hopper"), base)
        # ... with 100 % the merge step is the last one: text-only conditioning throughout, the identity has no way in
        late = {"style_strength_ratio": 100}
        assert np.array_equal(generated_pixels(adapter, bench, late, identity_id="grace-hopper"), generated_pixels(adapter, bench, late))


def test_v2_uses_the_arcface_embedding(v2, bench):
    """Same photo for the CLIP tower, another ArcFace embedding: another image (v2's ID tokens read it)."""
    base = generated_pixels(v2, bench)
    detection, embedding = v2.faces.face("nasa-astronaut#0", bench.reference_image("nasa-astronaut"))  # photo 0 of the identity
    try:
        v2.faces._faces["nasa-astronaut#0"] = (detection, -embedding)
        assert not np.array_equal(generated_pixels(v2, bench), base)
    finally:
        v2.faces._faces["nasa-astronaut#0"] = (detection, embedding)


@pytest.mark.parametrize("name", ["photomaker", "photomaker_v2"])
def test_run_end_to_end_on_the_demo_split(name, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", name, "--preset", "smoke", "--runs-dir", runs,
                       "--metrics", "face_detection")
    assert code == 0, err
    run = only_run(runs)
    images = sorted((run / "images").glob("*.png"))
    assert len(images) == 12
    from PIL import Image
    assert {Image.open(p).size for p in images} == {(64, 64)}
    results = json.loads((run / "results.json").read_text())
    assert results["images"] == {"planned": 12, "ok": 12, "failed": 0, "missing": 0}
    for name in ("run.json", "tasks.jsonl", "status.jsonl", "scores.parquet", "leaderboard.md"):
        assert (run / name).exists()


def test_full_run_without_files_names_every_file_first(monkeypatch):
    for name, files in (("photomaker", ("photomaker-v1.bin", "stable-diffusion-xl-base-1.0")),
                        ("photomaker_v2", ("photomaker-v2.bin", "w600k_r50.onnx", "buffalo_l"))):
        card = get_card(name)
        needed = get_method(card.adapter).required_weights(card, card.resolve_params(None, {}))
        assert set(needed) == set(card.weights)
        with pytest.raises(MissingWeightsError) as info:
            weights.require(needed)
        for text in files:
            assert text in str(info.value)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    card = get_card("photomaker_v2")
    with pytest.raises(BenchError, match=r"onnxruntime.*caphuman-bench\[arcface\]"):
        get_method(card.adapter).required_weights(card, card.resolve_params(None, {}))


def test_bad_version_names_the_card_field(tmp_path):
    card = get_card("photomaker")
    with pytest.raises(BenchError, match="version"):
        get_method(card.adapter).validated_params(card, None, {"version": "v3"})


def test_sdxl_cards_declare_every_parameter_with_its_type():
    for name in ("photomaker", "photomaker_v2", "instantid"):
        card = get_card(name)
        assert set(card.params) == set(get_method(card.adapter).param_types), name
        adapter = get_method(card.adapter)
        assert adapter.validated_params(card, "smoke", {}) == card.resolve_params("smoke", {})
        assert adapter.validated_params(card, None, {}) == card.resolve_params(None, {})


def test_wrong_typed_card_value_names_the_card_and_field(tmp_path, monkeypatch):
    import shutil

    from caphuman_bench.cards import CARDS_ENV, DEFAULT_CARDS_DIR

    cards = tmp_path / "cards"
    shutil.copytree(DEFAULT_CARDS_DIR, cards)
    path = cards / "photomaker_v2.yaml"
    path.write_text(path.read_text().replace("style_strength_ratio: 20", "style_strength_ratio: twenty"))
    monkeypatch.setenv(CARDS_ENV, str(cards))
    card = get_card("photomaker_v2")
    with pytest.raises(BenchError, match=r"photomaker_v2.yaml: field 'params.style_strength_ratio': expected float"):
        get_method(card.adapter).validated_params(card, None, {})
