"""Every method that writes the identity into the prompt builds its prompt for every prompt of every shipped spec.

FastComposer and PhotoMaker put their trigger word after the identity's subject phrase ("a woman img, neon
lights" for sty-cyberpunk); the fine-tuning baselines put their identity phrase in its place. Prompt building
depends only on (prompt, subject phrase), so every prompt of a spec with every subject phrase an identity
can have covers every task of every split; the models are not needed, only the prompt-building functions.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.finetune.training import identity_phrase
from caphuman_bench.loaders.convert_caphuman import clip_tokenizer
from caphuman_bench.methods.base import with_trigger_word
from caphuman_bench.pipelines.pipeline_fastcomposer import TRIGGER_WORD, subject_token_ids, trigger_tokenizer
from caphuman_bench.pipelines.pipeline_photomaker import PhotoMakerStableDiffusionXLPipeline
from caphuman_bench.stages.plan import plan_tasks

SPECS = Path(__file__).resolve().parents[1] / "caphuman_bench" / "benchmark_data"
# data_prepare.py: CelebA's Male attribute gives "a man" / "a woman", a folder of faces "a person"
PREPARED_SUBJECTS = ("a man", "a woman", "a person")


def spec_prompts(spec: str) -> list[tuple[str, str, str]]:
    """(prompt id, subject phrase, filled prompt) for every prompt and every subject phrase of the spec."""
    bench = Benchmark.load(SPECS / spec)
    subjects = sorted({*PREPARED_SUBJECTS, *(identity.subject for identity in bench.identities.values())})
    return [(pid, subject, prompt.fill(subject)) for pid, prompt in bench.prompts.items() for subject in subjects]


CASES = [(spec, *case) for spec in ("humaniphc", "fastcomposer") for case in spec_prompts(spec)]


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer(77)


@pytest.fixture(scope="module")
def special(tokenizer):
    return trigger_tokenizer(tokenizer)


def _request(prompt: str, subject: str):
    return SimpleNamespace(prompt=prompt, subject=subject)


def test_the_cases_cover_every_full_split_and_the_prompt_that_failed():
    """HumanIPHC's full split (100 prepared identities x 35 prompts x 10 conditions x 3) takes every prompt with
    the prepared identities' phrases, so CASES holds every prompt its 105,000 tasks build."""
    for spec in ("humaniphc", "fastcomposer"):
        bench = Benchmark.load(SPECS / spec)
        assert set(bench.split("full").prompts) == set(bench.prompts)
    assert ("humaniphc", "sty-cyberpunk", "a woman", "a cyberpunk portrait of a woman, neon lights") in CASES
    assert len(CASES) == (35 + 40) * 3


@pytest.mark.parametrize("spec,prompt_id,subject,prompt", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_every_method_builds_every_prompt(spec, prompt_id, subject, prompt, tokenizer, special):
    with_trigger = with_trigger_word(_request(prompt, subject), TRIGGER_WORD)
    last_word = subject.split()[-1]

    # fastcomposer: the official special-token split; the subject token is the phrase's last word
    ids, index = subject_token_ids(special, tokenizer.pad_token_id, with_trigger)
    assert tokenizer.decode([ids[index]]).strip() == last_word
    assert ids == tokenizer(with_trigger.replace(TRIGGER_WORD, ""), padding="max_length", max_length=77).input_ids

    # photomaker (v1: one class token per image; v2: two): the class tokens are the phrase's last word
    for version in ("v1", "v2"):
        pipe = SimpleNamespace(config=SimpleNamespace(trigger_word=TRIGGER_WORD), id_encoder=SimpleNamespace(version=version))
        expanded, mask = PhotoMakerStableDiffusionXLPipeline.class_token_ids(pipe, special, with_trigger, 1)
        assert {tokenizer.decode([t]).strip() for t, m in zip(expanded, mask) if m} == {last_word}
        assert PhotoMakerStableDiffusionXLPipeline.without_trigger(pipe, with_trigger) == prompt

    # textual_inversion / dreambooth / lora: the identity phrase in place of the subject phrase
    for recipe in ("textual_inversion", "dreambooth"):
        phrase = identity_phrase(recipe, subject, {"train_placeholder_token": "<identity>", "train_identifier": "sks"})
        assert subject in prompt and phrase in prompt.replace(subject, phrase, 1)


def test_a_full_split_plan_of_fastcomposer_builds_every_prompt(special, tokenizer):
    """The fastcomposer spec's full split as planned (its identities ship as rows), each task's prompt as the
    generate stage fills it. (HumanIPHC's full split takes prepared identities: covered above by subject phrase.)"""
    bench = Benchmark.load(SPECS / "fastcomposer")
    tasks = plan_tasks(bench, "full")
    requests = {(bench.prompts[t.prompt_id].fill(bench.identities[t.identity_id].subject),
                 bench.identities[t.identity_id].subject) for t in tasks}  # what each task's prompt depends on
    for prompt, subject in requests:
        subject_token_ids(special, tokenizer.pad_token_id, with_trigger_word(_request(prompt, subject), TRIGGER_WORD))
    assert len(tasks) == 2400 and len(requests) == 2 * 40
