"""The PhotoMaker port (v1, v2) against the authors' pipeline's reference vectors (tests/data/photomaker), and
every shipped prompt through PhotoMaker's trigger-word handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.conformance import conformance_command, run_conformance
from caphuman_bench.conformance.photomaker import build_reference_pipeline
from caphuman_bench.methods.base import GenerationRequest, with_trigger_word
from caphuman_bench.pipelines import pipeline_photomaker
from caphuman_bench.pipelines.pipeline_photomaker import PhotoMakerStableDiffusionXLPipeline

REFERENCE = Path(__file__).parent / "data" / "photomaker"
SPECS = Path(__file__).parents[1] / "caphuman_bench" / "benchmark_data"
CASE = "man_img_2ids"  # start_merge_step 1 of 3 steps: text-only at steps 0 and 1, fused at step 2


@pytest.mark.parametrize("card", ["photomaker", "photomaker_v2"])
def test_every_case_and_output_is_within_tolerance(card):
    report = run_conformance(card)
    assert report.passed, [(r.case, r.output, r.max_rel) for r in report.failures()]
    checked = {(r.case, r.output) for r in report.rows}
    for case in (CASE, "man_img_comma_1id"):
        for output in ("tokenizer_class_expanded_ids", "tokenizer_2_class_expanded_ids", "tokenizer_text_only_ids",
                       "class_tokens_mask", "id_pixel_values", "id_tokens", "prompt_embeds_fused",
                       "unet_encoder_hidden_states", "unet_text_embeds", "unet_noise_pred", "final_latents"):
            assert (case, output) in checked
    assert all(r.max_abs == 0 for r in report.rows if r.output.endswith(("_ids", "class_tokens_mask")))


def test_command_prints_a_table_and_exits_zero(capsys):
    assert conformance_command("photomaker_v2", REFERENCE) == 0
    out = capsys.readouterr().out
    assert "man_img_comma_1id" in out and "0 failed" in out


def _failed(card: str) -> set[str]:
    return {r.output for r in run_conformance(card, only=[CASE]).failures()}


def test_unapplied_lora_fails(monkeypatch):
    """The checkpoint's LoRA changes every UNet call; the prompt side does not see it."""
    monkeypatch.setattr(PhotoMakerStableDiffusionXLPipeline, "load_photomaker_lora", lambda self, lora: None)
    failed = _failed("photomaker")
    assert "unet_noise_pred" in failed and "final_latents" in failed
    assert "prompt_embeds_fused" not in failed and "unet_encoder_hidden_states" not in failed


def test_merging_the_identity_one_step_early_fails(monkeypatch):
    """The authors use the text-only prompt while step <= start_merge_step (pipeline.py `if i <= start_merge_step`)."""
    original = PhotoMakerStableDiffusionXLPipeline.__call__

    def early(self, *args, start_merge_step=10, **kwargs):
        return original(self, *args, start_merge_step=start_merge_step - 1, **kwargs)

    monkeypatch.setattr(PhotoMakerStableDiffusionXLPipeline, "__call__", early)
    failed = _failed("photomaker_v2")
    assert "unet_encoder_hidden_states" in failed and "unet_text_embeds" in failed
    assert "prompt_embeds_fused" not in failed


def test_transformers5_default_image_processor_fails(monkeypatch):
    """transformers 5's torchvision-backed CLIPImageProcessor is not the authors' (transformers 4, PIL) one."""
    from transformers import CLIPImageProcessor

    monkeypatch.setattr(pipeline_photomaker, "id_image_processor", lambda side=224: CLIPImageProcessor(size=side, crop_size=side))
    failed = _failed("photomaker")
    assert {"id_pixel_values", "id_tokens", "prompt_embeds_fused"} <= failed


@pytest.fixture(scope="module")
def v2_pipe():
    return build_reference_pipeline(REFERENCE, "v2")


def _authors_text_only(tokenizer, prompt: str, trigger: str) -> str:
    """pipeline.py __call__ step 4: encode without special tokens, drop the trigger's id, decode."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids.remove(tokenizer.convert_tokens_to_ids(trigger))
    return tokenizer.decode(ids)


@pytest.mark.parametrize("spec", ["humaniphc", "fastcomposer"])
def test_every_shipped_prompt_builds_a_photomaker_prompt(spec, v2_pipe):
    """Each prompt with each subject phrase of the spec (and the neutral 'a person'): the trigger lands right after
    the class word, the class token is repeated 2 per ID image, and the text-only prompt tokenizes as the authors'."""
    bench = Benchmark.load(SPECS / spec)
    subjects = sorted({identity.subject for identity in bench.identities.values()} | {"a person"})
    trigger = v2_pipe.config.trigger_word
    for prompt in bench.prompts.values():
        for subject in subjects:
            request = GenerationRequest(task_id="t", identity_id="i", prompt=prompt.fill(subject), reference=None,
                                        condition=None, generator=torch.Generator(), height=64, width=64, subject=subject)
            text = with_trigger_word(request, trigger)
            class_id = v2_pipe.tokenizer.convert_tokens_to_ids(subject.split()[-1] + "</w>")
            for tokenizer in (v2_pipe.tokenizer, v2_pipe.tokenizer_2):
                for num_images in (1, 4):
                    ids, mask = v2_pipe.class_token_ids(tokenizer, text, num_images)
                    assert sum(mask) == 2 * num_images, text
                    assert {ids[i] for i, marked in enumerate(mask) if marked} == {class_id}, text
                port = tokenizer(v2_pipe.without_trigger(text)).input_ids
                assert port == tokenizer(_authors_text_only(tokenizer, text, trigger)).input_ids, text
                assert port == tokenizer(prompt.fill(subject)).input_ids, text
