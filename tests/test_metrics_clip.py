"""CLIP score and prompt accuracy on one tiny, randomly initialised CLIP shared with torchmetrics.

One transformers `CLIPModel` is built from a small config; its weights are converted (explicit key
map below) into open_clip's layout and loaded by our metric through a checkpoint file, exactly as
real weights are. torchmetrics' `CLIPScore` scores the same transformers model, so the comparison
checks our open_clip path (tokenizer, preprocessing, pooling, projection) against an independent
implementation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from caphuman_bench.metrics._clip import load_clip  # noqa: E402
from caphuman_bench.metrics.base import ScoreContext, ScoreItem  # noqa: E402
from caphuman_bench.metrics.clip_score import ClipScore  # noqa: E402
from caphuman_bench.metrics.prompt_accuracy import PromptAccuracy  # noqa: E402

TINY = "caphuman-test-tiny-clip"
WIDTH, LAYERS, HEADS, EMBED, IMAGE, PATCH = 32, 2, 2, 16, 224, 32
PROMPTS = [
    "a photo of a person wearing a red hat",
    "a photo of a person on the beach",
    "a painting of a person in the style of van gogh",
    "a photo of a person playing the guitar",
    "a photo of a person in the snow",
    "a photo of a person wearing sunglasses",
    "a photo of a person reading a book",
    "a photo of a person in a forest",
]


def openclip_state_from_transformers(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel keys → open_clip CLIP keys (q/k/v fused into in_proj, projections transposed)."""
    out = {}

    def blocks(src_prefix: str, dst_prefix: str) -> None:
        for i in range(LAYERS):
            src, dst = f"{src_prefix}.{i}", f"{dst_prefix}.{i}"
            for p in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{p}"] = torch.cat([hf[f"{src}.self_attn.{n}_proj.{p}"] for n in "qkv"])
                for d, s in {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}.items():
                    out[f"{dst}.{d}.{p}"] = hf[f"{src}.{s}.{p}"]

    v, t = "vision_model", "text_model"
    out["visual.conv1.weight"] = hf[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = hf[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf[f"{v}.embeddings.position_embedding.weight"]
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = hf[f"{v}.pre_layrnorm.{p}"]
        out[f"visual.ln_post.{p}"] = hf[f"{v}.post_layernorm.{p}"]
        out[f"ln_final.{p}"] = hf[f"{t}.final_layer_norm.{p}"]
    blocks(f"{v}.encoder.layers", "visual.transformer.resblocks")
    out["visual.proj"] = hf["visual_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = hf[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf[f"{t}.embeddings.position_embedding.weight"]
    blocks(f"{t}.encoder.layers", "transformer.resblocks")
    out["text_projection"] = hf["text_projection.weight"].T.contiguous()
    out["logit_scale"] = hf["logit_scale"]
    return out


def transformers_tokenizer():
    """A transformers CLIPTokenizer with open_clip's shipped BPE vocabulary (the OpenAI one), offline."""
    simple = open_clip.tokenizer.SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


class TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9.0's CLIPScore expects `get_*_features` to return tensors; transformers 5 returns
    output objects whose `pooler_output` holds the projected features. This wrapper returns that tensor."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values):
        pixel_values = pixel_values.to(self.model.dtype)
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


@pytest.fixture(scope="module")
def shared_clip(tmp_path_factory):
    """(transformers model, processor, open_clip checkpoint path): one set of random weights."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    config = {"embed_dim": EMBED, "quick_gelu": True,
              "vision_cfg": {"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS, "patch_size": PATCH},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": WIDTH, "heads": HEADS, "layers": LAYERS}}
    (folder / f"{TINY}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY}.json")

    torch.manual_seed(0)
    hf_config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu"),
        projection_dim=EMBED,
    )
    model = transformers.CLIPModel(hf_config).eval()
    processor = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(), tokenizer=transformers_tokenizer())
    _mostly_positive_cosines(model, processor)
    checkpoint = folder / "tiny_clip_open_clip.bin"
    torch.save(openclip_state_from_transformers(model.state_dict()), checkpoint)
    return model, processor, checkpoint


def _mostly_positive_cosines(model, processor) -> None:
    """A random tiny CLIP's image-text cosines nearly all share one sign (a common direction dominates).
    Flip the random text projection's sign if needed so that most are positive — values to compare —
    while the few negative ones still check torchmetrics' clamp."""
    features = TensorFeatures(model)
    with torch.no_grad():
        pixels = processor(images=[torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in _images()], return_tensors="pt")
        tokens = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        cos = (torch.nn.functional.normalize(features.get_image_features(pixels["pixel_values"]), dim=-1)
               @ torch.nn.functional.normalize(features.get_text_features(**tokens), dim=-1).T)
        if (cos > 0).float().mean() < 0.5:
            model.text_projection.weight.neg_()


def _images():
    """224 × 224 images: both libraries' resize is then the identity, so the networks are what is compared."""
    from skimage import data

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(data.astronaut()).resize((IMAGE, IMAGE), Image.BICUBIC),
              Image.fromarray(data.chelsea()[:, 50:350]).resize((IMAGE, IMAGE), Image.BICUBIC)]
    noise = [Image.fromarray(rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(2)]
    return photos + noise


def _item(image, prompt, task="t") -> ScoreItem:
    return ScoreItem(task_id=task, identity_id="astronaut", prompt_id="p", condition_id="c", sample=0,
                     image=image, reference=image, prompt=prompt)


def _context(checkpoint, prompts=PROMPTS) -> ScoreContext:
    return ScoreContext(options={"clip_model": TINY, "clip_checkpoint": str(checkpoint)}, prompts=list(prompts))


def test_tokenizers_agree(shared_clip):
    _, processor, _ = shared_clip
    ours = open_clip.get_tokenizer(TINY)
    for prompt in PROMPTS:
        theirs = processor.tokenizer(prompt)["input_ids"]
        assert ours([prompt])[0, : len(theirs)].tolist() == theirs


def _ours_and_torchmetrics(shared_clip, dtype):
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor, checkpoint = shared_clip
    ours_model = load_clip(TINY, checkpoint).model  # the instance ClipScore will use
    model.to(dtype), ours_model.to(dtype)
    try:
        reference = CLIPScore(model_name_or_path=lambda: (TensorFeatures(model), processor))
        metric = ClipScore(_context(checkpoint))
        pairs = [(image, prompt) for image in _images()[1:] for prompt in PROMPTS[:5]]
        metric.update([_item(image, prompt, f"t{i}") for i, (image, prompt) in enumerate(pairs)])
        ours = [row.values["clip_score"] for row in metric.last_rows]
        theirs = []
        for image, prompt in pairs:
            reference.reset()
            reference.update(torch.from_numpy(np.array(image)).permute(2, 0, 1), [prompt])
            theirs.append(float(reference.compute()))
    finally:
        model.float(), ours_model.float()
        load_clip(TINY, checkpoint)._images.clear()
    return np.array(ours), np.array(theirs)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_clip_score_equals_torchmetrics(shared_clip, dtype, tolerance):
    """Both networks agree to ~1e-15 in float64 (the key map is exact); each library keeps its own
    preprocessing, whose float32 pixels differ by ~2e-7. In float32 the networks' own rounding alone
    moves 100 · cos by ~2e-5 at cos ≈ 0.4, hence the looser float32 bound."""
    ours, theirs = _ours_and_torchmetrics(shared_clip, dtype)
    positive = ours > 0
    assert positive.sum() >= 4, "the construction should give some positive cosines to compare"
    np.testing.assert_allclose(100 * ours[positive], theirs[positive], rtol=0, atol=tolerance)
    assert (theirs[~positive] == 0).all()  # torchmetrics clamps: max(100 · cos, 0)


def test_prompt_accuracy_against_direct_ranking(shared_clip):
    """Ranks from the default protocol's (fastcomposer) CLIP input: FastComposer's tensor preprocessing."""
    from caphuman_bench.metrics._clip import fastcomposer_pixels

    _, _, checkpoint = shared_clip
    images = _images()
    clip = load_clip(TINY, checkpoint)
    with torch.no_grad():
        pixels = fastcomposer_pixels(images)
        img = torch.nn.functional.normalize(clip.model.encode_image(pixels), dim=-1).numpy()
        txt = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(PROMPTS)), dim=-1).numpy()
    similarity = img @ txt.T
    best, worst = similarity.argmax(axis=1), similarity.argmin(axis=1)
    third = np.argsort(-similarity, axis=1)[:, 2]

    metric = PromptAccuracy(_context(checkpoint))
    items = ([_item(im, PROMPTS[b], f"b{i}") for i, (im, b) in enumerate(zip(images, best))]
             + [_item(im, PROMPTS[w], f"w{i}") for i, (im, w) in enumerate(zip(images, worst))]
             + [_item(im, PROMPTS[r], f"r{i}") for i, (im, r) in enumerate(zip(images, third))])
    metric.update(items)
    rows = metric.last_rows
    n = len(images)
    assert [r.values["prompt_acc_top1"] for r in rows] == [1.0] * n + [0.0] * n + [0.0] * n
    assert [r.values["prompt_acc_top5"] for r in rows] == [1.0] * n + [0.0] * n + [1.0] * n  # 8 prompts: worst is rank 8
    assert [r.extra["rank"] for r in rows] == [1] * n + [len(PROMPTS)] * n + [3] * n
    result = metric.compute()
    assert result["prompt_acc_top1"]["mean"] == pytest.approx(1 / 3)
    assert result["prompt_acc_top5"]["mean"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("protocol", ["fastcomposer", "caphuman-bench"])
def test_prompt_accuracy_reuses_clip_scores_image_embeddings(shared_clip, protocol, monkeypatch):
    """One CLIP per protocol: after clip_score, prompt_accuracy encodes no image again."""
    _, _, checkpoint = shared_clip
    clip = load_clip(TINY, checkpoint)
    clip._images.clear()
    encoded = []
    original = clip.model.encode_image
    monkeypatch.setattr(clip.model, "encode_image", lambda pixels, **kw: encoded.append(len(pixels)) or original(pixels, **kw))
    context = ScoreContext(options={"clip_model": TINY, "clip_checkpoint": str(checkpoint), "protocol": protocol}, prompts=PROMPTS)
    items = [_item(image, PROMPTS[i], f"t{i}") for i, image in enumerate(_images())]
    ClipScore(context).update(items)
    PromptAccuracy(context).update(items)
    assert encoded == [len(items)]
    clip._images.clear()


def test_prompt_accuracy_undefined_cases(shared_clip):
    _, _, checkpoint = shared_clip
    image = _images()[0]
    few = PromptAccuracy(_context(checkpoint, prompts=PROMPTS[:3]))
    few.update([_item(image, PROMPTS[0])])
    assert math.isnan(few.last_rows[0].values["prompt_acc_top5"])  # 3 prompts: top-5 would be trivially 1
    assert few.last_rows[0].values["prompt_acc_top1"] in (0.0, 1.0)

    metric = PromptAccuracy(_context(checkpoint))
    metric.update([_item(image, "a prompt from another benchmark"), _item(None, PROMPTS[0])])
    unknown, unreadable = metric.last_rows
    assert unknown.status == "error" and "not in the benchmark's prompt set" in unknown.reason
    assert unreadable.status == "unreadable"
    assert all(math.isnan(v) for row in metric.last_rows for v in row.values.values())


def test_clip_score_unreadable_and_conventions(shared_clip):
    _, _, checkpoint = shared_clip
    metric = ClipScore(_context(checkpoint))
    metric.update([_item(None, PROMPTS[0])])
    assert metric.last_rows[0].status == "unreadable" and math.isnan(metric.last_rows[0].values["clip_score"])
    assert "raw cosine" in ClipScore.convention["value"] and "max(100" in ClipScore.convention["value"]
    assert "strictly more CLIP-similar" in PromptAccuracy.convention["value"]


def test_protocols_pick_clip_text_and_preprocessing(shared_clip):
    """fastcomposer: the prompt with the class word and FastComposer's tensor path; caphuman-bench: 'a person', PIL."""
    from caphuman_bench.metrics._clip import fastcomposer_pixels

    _, _, checkpoint = shared_clip
    photo = Image.fromarray(data_astronaut()).resize((300, 260), Image.BICUBIC)  # not square: the resize matters
    item = ScoreItem(task_id="t", identity_id="astronaut", prompt_id="p", condition_id="c", sample=0, image=photo,
                     reference=photo, prompt="a person wearing a red hat", subject_prompt="a man wearing a red hat")
    clip = load_clip(TINY, checkpoint)
    values = {}
    for protocol in ("fastcomposer", "caphuman-bench"):
        metric = ClipScore(ScoreContext(options={"clip_model": TINY, "clip_checkpoint": str(checkpoint), "protocol": protocol}))
        metric.update([item])
        values[protocol] = metric.last_rows[0].values["clip_score"]
    with torch.no_grad():
        def cos(pixels, text):
            image = torch.nn.functional.normalize(clip.model.encode_image(pixels[None]), dim=-1)
            words = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer([text])), dim=-1)
            return float((image * words).sum())
        assert values["fastcomposer"] == pytest.approx(cos(fastcomposer_pixels([photo])[0], "a man wearing a red hat"), abs=1e-6)
        assert values["caphuman-bench"] == pytest.approx(cos(clip.preprocess(photo), "a person wearing a red hat"), abs=1e-6)
    assert values["fastcomposer"] != values["caphuman-bench"]


def test_fastcomposer_pixels_are_clip_evals_tensor_transform():
    """evaluation/clip_eval.py: Normalize(-1, 2) on ToTensor()·2−1, then CLIP's Resize(224, bicubic) and
    CenterCrop on the tensor (torchvision 0.14: no antialias), then OpenAI's Normalize."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from caphuman_bench.metrics._clip import fastcomposer_pixels

    photo = Image.fromarray(data_astronaut())
    reference = T.Compose([T.Normalize([-1.0] * 3, [2.0] * 3), T.Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=False),
                           T.CenterCrop(224), T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    expected = reference(T.ToTensor()(photo) * 2.0 - 1.0)
    assert torch.equal(fastcomposer_pixels([photo])[0], expected)
    small = photo.resize((300, 260))  # a batch of two sizes: each image as on its own, in input order
    batch = fastcomposer_pixels([small, photo, small])
    assert torch.equal(batch[1], expected) and torch.equal(batch[0], batch[2])
    assert torch.equal(batch[0], reference(T.ToTensor()(small) * 2.0 - 1.0))
    plain, smooth = (T.Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=a)(T.ToTensor()(photo)) for a in (False, True))
    assert (plain - smooth).abs().max() > 0.01  # the antialias choice is visible on a 512 → 224 downscale


def data_astronaut():
    from skimage import data

    return data.astronaut()


def test_half_precision_clip_takes_half_pixels(shared_clip):
    """The fastcomposer protocol's fp16 CLIP (open_clip's `convert_weights_to_lp`, as OpenAI's `clip.load`
    on a GPU) keeps some parameters in float32; images must enter in the convolutions' dtype."""
    _, _, checkpoint = shared_clip
    clip = load_clip(TINY, checkpoint, precision="fp16")
    assert next(clip.model.parameters()).dtype == torch.float32  # what the old rule read
    assert clip.dtype == torch.float16
    for preprocessing in ("tensor", "pil"):
        vectors = clip.image_embeddings(_images()[:2], preprocessing)
        assert vectors.shape == (2, EMBED) and torch.isfinite(vectors).all()


def test_on_a_gpu_every_encoder_call_has_one_shape_and_padding_leaves_the_rows_alone(shared_clip):
    """cuBLAS picks kernels by matrix size, so on a GPU each call is padded to ENCODE_BATCH rows (repeats
    of the last); on the CPU nothing is padded. The padded rows do not change the real rows' embeddings."""
    import dataclasses

    from caphuman_bench.metrics._clip import ENCODE_BATCH

    _, _, checkpoint = shared_clip
    clip = load_clip(TINY, checkpoint)
    pixels = torch.stack([clip.preprocess(image) for image in _images()[:3]])
    assert clip._fixed_batch(pixels) is pixels
    padded = dataclasses.replace(clip, device="cuda:0")._fixed_batch(pixels)
    assert padded.shape == (ENCODE_BATCH, *pixels.shape[1:])
    assert torch.equal(padded[:3], pixels) and torch.equal(padded[3:], pixels[-1:].expand(ENCODE_BATCH - 3, *pixels.shape[1:]))
    with torch.inference_mode():
        torch.testing.assert_close(clip.model.encode_image(padded)[:3], clip.model.encode_image(pixels), rtol=0, atol=1e-6)


def test_clip_families_name_the_protocol_that_prescribes_fp16(shared_clip):
    _, _, checkpoint = shared_clip
    gpu = ClipScore(ScoreContext(device="cuda:0", options={"clip_model": TINY, "clip_checkpoint": str(checkpoint)}))
    assert gpu.numerics()["dtype"] == "float16" and "fastcomposer" in gpu.numerics()["dtype_from"]
    own = PromptAccuracy(ScoreContext(device="cuda:0", options={"protocol": "caphuman-bench"}))
    assert own.numerics() == {"device": "cuda:0", "dtype": "float32"}
    assert ClipScore(ScoreContext(device="cpu")).numerics() == {"device": "cpu", "dtype": "float32"}
