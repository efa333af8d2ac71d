"""The tiny CapHuman pipeline end to end on CPU: switches, tau semantics, per-image generators."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caphuman_bench.models.capface import CapFaceModel
from caphuman_bench.pipelines.acceleration import GuidancePrefix
from caphuman_bench.pipelines.tiny import build_tiny_caphuman_pipeline

SIZE = 64
STEPS = 4  # DDIM timesteps 751, 501, 251, 1


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_caphuman_pipeline(seed=0)


def _inputs(seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    hint = torch.cat(
        [torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.rand(batch, 6, SIZE, SIZE, generator=g)], 1
    )
    image_tokens = torch.randn(batch, 17, 64, generator=g)
    id_embedding = F.normalize(torch.randn(batch, 1, 512, generator=g), dim=-1)
    return hint, image_tokens, id_embedding


def _generate(pipe, seeds=(11,), inputs=None, **kwargs) -> torch.Tensor:
    """Final latents (the VAE decode is a fixed map; skipping it keeps the tests fast)."""
    hint, tokens, ids = inputs if inputs is not None else _inputs(0, len(seeds))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe("a photo of a person", hint, tokens, ids, num_inference_steps=STEPS, generator=generators,
               output_type="latent", **kwargs)
    return out.images


def test_generates_pil_images_and_latent_masks(pipe):
    hint, tokens, ids = _inputs(0, 2)
    out = pipe(["a photo of a woman", "a photo of a man"], hint, tokens, ids, num_inference_steps=2,
               generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert [im.size for im in out.images] == [(SIZE, SIZE)] * 2
    assert out.masks.shape == (2, 1, SIZE // 8, SIZE // 8)
    assert ((out.masks > 0) & (out.masks < 1)).all()


def test_identity_switches_and_tau_change_the_image(pipe):
    base = _generate(pipe)
    for kwargs in ({"tau": 500}, {"use_global": False}, {"use_local": False}):
        assert (_generate(pipe, **kwargs) - base).abs().max() > 1e-4, kwargs


def test_tau_zero_means_no_drop_like_tau_at_least_999(pipe):
    """tau=0 disables the rule; tau >= 999 keeps every DDPM step (t <= 999 <= tau): same image."""
    base = _generate(pipe, tau=0)
    assert torch.equal(_generate(pipe, tau=1000), base)
    assert torch.equal(_generate(pipe, tau=999), base)


def test_identity_context_rule():
    capface = CapFaceModel(
        down_block_types=("CrossAttnDownBlock2D",), block_out_channels=(32,), layers_per_block=1,
        cross_attention_dim=8, attention_head_dim=2, id_embedding_dim=4, image_token_dim=6,
    )
    tokens, ids = torch.randn(3, 5, 6), torch.randn(3, 1, 4)
    context = capface.identity_context(tokens, ids, torch.tensor([100, 500, 900]), tau=500)
    assert context.shape == (3, 6, 8)
    assert torch.allclose(context[0, :5], capface.img_linear(tokens[0]))  # image tokens first
    assert torch.allclose(context[0, 5], capface.id_linear(ids[0, 0]))  # ID token last
    assert context[1].abs().sum() > 0 and torch.equal(context[2], torch.zeros(6, 8))  # t = tau kept, t > tau zeroed
    no_global = capface.identity_context(tokens, ids, 900, tau=0, use_global=False)
    assert torch.equal(no_global[:, 5], torch.zeros(3, 8)) and no_global[:, :5].abs().sum() > 0
    no_local = capface.identity_context(tokens, ids, 900, tau=0, use_local=False)
    assert torch.equal(no_local[:, :5], torch.zeros(3, 5, 8)) and no_local.shape == (3, 6, 8)


def test_image_depends_on_its_generator_not_on_the_batch(pipe):
    alone = _generate(pipe, seeds=(5,), inputs=_inputs(3, 1))
    other_hint, other_tokens, other_ids = _inputs(4, 1)
    hint, tokens, ids = _inputs(3, 1)
    batch = (torch.cat([other_hint, hint]), torch.cat([other_tokens, tokens]), torch.cat([other_ids, ids]))
    together = _generate(pipe, seeds=(7, 5), inputs=batch)
    # equal up to float32 batching noise (latents reach |x| ~ 16 with these random weights)
    torch.testing.assert_close(together[1], alone[0], rtol=1e-5, atol=1e-4)
    assert (together[0] - alone[0]).abs().max() > 1e-3


def test_capface_round_trips_through_save_pretrained(pipe, tmp_path):
    pipe.capface.save_pretrained(tmp_path)
    loaded = CapFaceModel.from_pretrained(tmp_path)
    assert loaded.config.image_token_dim == 64 and loaded.config.mask_threshold == 0.5
    for (name, a), (_, b) in zip(pipe.capface.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_hint_is_encoded_once_per_call_and_its_features_act_as_the_hint(pipe):
    hint, tokens, ids = _inputs(3)
    capface = pipe.capface
    features = capface.encode_hint(hint)
    assert features.shape[1] == capface.config.block_out_channels[0] and features.shape[-1] == SIZE // 8
    latents, t = torch.randn(1, 4, SIZE // 8, SIZE // 8), torch.tensor([501])
    context = capface.identity_context(tokens, ids, t)
    from_hint = capface(latents, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    from_features = capface(latents, t, encoder_hidden_states=context, controlnet_cond=features, return_dict=False)
    for a, b in zip([*from_hint[0], from_hint[1]], [*from_features[0], from_features[1]]):
        assert torch.equal(a, b)
    assert torch.equal(capface.predict_mask(hint), capface.predict_mask(features))

    runs = []
    handle = capface.controlnet_cond_embedding.conv_in.register_forward_hook(lambda *_: runs.append(1))
    try:
        _generate(pipe, inputs=(hint, tokens, ids))
    finally:
        handle.remove()
    assert len(runs) == 1  # once, not once per step (STEPS = 4)


def test_capface_refuses_a_hint_as_wide_as_its_features():
    with pytest.raises(ValueError, match="conditioning_channels"):
        CapFaceModel(conditioning_channels=32, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     norm_num_groups=8, cross_attention_dim=32, conditioning_embedding_out_channels=(8, 16))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gating_into_copies_equals_gating_then_concatenating(pipe, layout):
    capface = pipe.capface
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(3, 1, SIZE // 8, SIZE // 8, generator=g)
    down = [torch.randn(3, c, s, s, generator=g).to(memory_format=layout) for c, s in ((32, 8), (32, 4), (64, 4))]
    mid = torch.randn(3, 64, 2, 2, generator=g).to(memory_format=layout)
    gated_down, gated_mid = capface.gate_residuals(down, mid, mask)
    copied_down, copied_mid = capface.gate_residuals(down, mid, mask, copies=2)
    for gated, copied in zip([*gated_down, gated_mid], [*copied_down, copied_mid]):
        assert torch.equal(copied, torch.cat([gated, gated]))
        assert copied.is_contiguous(memory_format=layout)


def test_scheduler_gets_host_timesteps_so_no_step_waits_for_the_device(pipe, monkeypatch):
    seen = []
    step = pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step", lambda out, t, *a, **k: seen.append(t) or step(out, t, *a, **k))
    _generate(pipe)
    assert seen == [751, 501, 251, 1] and not any(isinstance(t, torch.Tensor) for t in seen)


def test_each_distinct_prompt_is_encoded_once(pipe):
    rows = []
    handle = pipe.text_encoder.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    try:
        embeds = pipe.encode_prompt(["a photo of a person", "", "a photo of a person", "a person smiling"], torch.device("cpu"))
        one = pipe.encode_prompt(["a person smiling"], torch.device("cpu"))
    finally:
        handle.remove()
    assert rows == [3, 1]
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0], embeds[1])
    torch.testing.assert_close(embeds[3], one[0], rtol=1e-5, atol=1e-5)


def test_hard_masks_are_made_once_per_size_per_call(pipe, monkeypatch):
    sizes = []
    hard_mask = pipe.capface.hard_mask
    monkeypatch.setattr(pipe.capface, "hard_mask", lambda mask, size: sizes.append(tuple(size)) or hard_mask(mask, size))
    _generate(pipe)  # STEPS = 4
    assert sizes and len(sizes) == len(set(sizes))


def _rows_seen(modules: dict[str, torch.nn.Module]):
    """Pre-hooks recording the batch rows each module receives (after any earlier pre-hook's slicing)."""
    seen = {name: [] for name in modules}
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].shape[0]))
               for name, m in modules.items()]
    return seen, handles


def test_guidance_prefix_runs_the_text_free_modules_once_for_both_halves(pipe):
    sharing = copy.deepcopy(pipe)
    sharing.guidance_prefix = GuidancePrefix(sharing.unet)
    first = sharing.unet.down_blocks[0]
    seen, handles = _rows_seen({"resnet": first.resnets[0], "self_attention": first.attentions[0].transformer_blocks[0].attn1,
                                "cross_attention": first.attentions[0].transformer_blocks[0].attn2})
    try:
        shared = _generate(sharing, seeds=(11, 12), guidance_scale=7.0)
        hint, tokens, ids = _inputs(0, 2)
        x, t = torch.randn(2, 4, SIZE // 8, SIZE // 8), torch.tensor([500, 20])
        text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
        unguided = sharing.apply_model(x, t, text, hint, tokens, ids).eps  # outside sharing(): every row runs
    finally:
        for handle in handles:
            handle.remove()
    # 2 images: 4 guided rows, of which the text-free modules see 2, at each of the STEPS steps
    assert seen == {"resnet": [2] * STEPS + [2], "self_attention": [2] * STEPS + [2], "cross_attention": [4] * STEPS + [2]}
    assert not sharing.guidance_prefix.active
    # equal up to float32 batching noise (half the rows pick other CPU kernel blockings; |latents| ~ 16)
    torch.testing.assert_close(shared, _generate(pipe, seeds=(11, 12), guidance_scale=7.0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(unguided, pipe.apply_model(x, t, text, hint, tokens, ids).eps, rtol=0, atol=0)


def test_guidance_prefix_hooks_are_traced_by_torch_compile_and_follow_the_switch(pipe):
    """Compiled, the switch is guarded: a graph traced while sharing is not reused outside it."""
    torch._dynamo.reset()
    sharing = copy.deepcopy(pipe)
    sharing.guidance_prefix = GuidancePrefix(sharing.unet)
    sharing.unet.compile(backend="eager", dynamic=False)
    try:
        rows = torch.randn(1, 4, SIZE // 8, SIZE // 8).repeat(2, 1, 1, 1)
        text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
        with sharing.guidance_prefix.sharing():
            both = sharing.unet(rows, 500, encoder_hidden_states=text).sample
        different = torch.randn(2, 4, SIZE // 8, SIZE // 8)
        alone = sharing.unet(different, 500, encoder_hidden_states=text).sample
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(both, pipe.unet(rows, 500, encoder_hidden_states=text).sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, pipe.unet(different, 500, encoder_hidden_states=text).sample, rtol=1e-5, atol=1e-5)


def test_guidance_prefix_refuses_a_unet_whose_prefix_sees_more_than_the_latents(pipe):
    unet = copy.deepcopy(pipe.unet)
    unet.down_blocks[0].attentions[0].transformer_blocks[0].only_cross_attention = True
    with pytest.raises(ValueError, match="not text-free"):
        GuidancePrefix(unet)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pil_output_rounds_as_diffusers(dtype):
    from diffusers.image_processor import VaeImageProcessor

    from caphuman_bench.pipelines.pipeline_caphuman import pil_images

    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g)
    images[0, 0, 0, :8] = (torch.arange(8) + 0.5) / 255  # at the rounding boundaries
    images = images.to(dtype)
    ours = pil_images(images)
    theirs = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    assert [im.mode for im in ours] == ["RGB"] * 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs))
