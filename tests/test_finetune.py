"""The fine-tuning baselines: `caphuman-bench finetune` trains per identity (tiny SD-1.5, a few steps),
resumes and retrains what does not verify; `run` uses the artefacts it planned with, and only those."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.cards import get_card
from caphuman_bench.errors import BenchError
from caphuman_bench.finetune.artefacts import ArtefactStore, training_params
from caphuman_bench.finetune.components import load_sd15
from caphuman_bench.finetune.training import ADAMW, ClassImages, Trainer, identity_phrase, prior_preservation
from caphuman_bench.registry import get_method
from tests.cli_helpers import cli

RECIPES = ("textual_inversion", "dreambooth", "lora")
CARDS = [name for recipe in RECIPES for name in (recipe, f"{recipe}_controlnet_head")]


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return Benchmark.load()


def smoke_params(name: str, **overrides) -> dict:
    card = get_card(name)
    return get_method(card.adapter).validated_params(card, "smoke", overrides)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float() for p in module.parameters()])


# -- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_few_steps_change_the_weights_and_write_a_loadable_artefact(recipe, bench, tmp_path):
    base = load_sd15(None, tiny=True)
    before = {"unet": flat(base.unet), "text_encoder": flat(base.text_encoder)}
    params = smoke_params(recipe)
    class_images = []
    if prior_preservation(recipe, params):
        class_images = ClassImages(base, torch.device("cpu"), torch.float32).ensure(tmp_path / "class", "a photo of woman", 2, 0)
    artefact = Trainer(recipe, base, params, "cpu").train(bench.reference_image("nasa-astronaut"), "a woman", seed=1,
                                                          class_images=class_images)
    path = tmp_path / "artefact.safetensors"
    artefact.save(path)
    tensors = safetensors.torch.load_file(path)
    assert len(artefact.losses) == params["train_steps"] and all(np.isfinite(artefact.losses))
    # the base model is left as loaded: every identity starts from it
    assert torch.equal(flat(base.unet), before["unet"]) and torch.equal(flat(base.text_encoder), before["text_encoder"])
    fresh = load_sd15(None, tiny=True)
    if recipe == "textual_inversion":
        (embedding,) = tensors.values()
        noun = fresh.tokenizer.encode("woman", add_special_tokens=False)[0]
        assert list(tensors) == ["<identity>"] and embedding.shape == (1, 32)
        assert not torch.allclose(embedding[0], fresh.text_encoder.get_input_embeddings().weight[noun])
    elif recipe == "dreambooth":
        missing, unexpected = fresh.unet.load_state_dict(tensors, strict=True)
        assert not missing and not unexpected
        assert not torch.allclose(flat(fresh.unet), before["unet"], atol=1e-5)
    else:
        assert tensors and all(k.startswith("unet.") and ".lora" in k for k in tensors)
        ups = [v for k, v in tensors.items() if "lora.up" in k or "lora_B" in k]
        assert ups and all(v.abs().max() > 0 for v in ups)  # B starts at zero: the steps moved it


def test_textual_inversion_scales_the_rate_and_moves_only_its_token(bench):
    """AdamW's first step moves every coordinate with a gradient by the rate (m̂/√v̂ = ±1) after the
    decoupled decay; with --scale_lr the rate is learning_rate × accumulation × batch (textual_inversion.py)."""
    base = load_sd15(None, tiny=True)
    params = smoke_params("textual_inversion", train_steps=1, train_gradient_accumulation_steps=3, train_learning_rate=1e-3)
    artefact = Trainer("textual_inversion", base, params, "cpu").train(bench.reference_image("grace-hopper"), "a woman", seed=0)
    noun = base.tokenizer.encode("woman", add_special_tokens=False)[0]
    start = base.text_encoder.get_input_embeddings().weight[noun].detach()
    rate = 1e-3 * 3 * 1
    step = artefact.tensors["<identity>"][0] - start + rate * ADAMW["weight_decay"] * start
    np.testing.assert_allclose(step.abs().numpy(), rate, rtol=1e-3)


def test_dreamboths_default_recipe_is_the_papers_prior_preservation():
    """Defect 6: DreamBooth trained without prior preservation. The card's default is now the README's
    prior-preservation command (the DreamBooth paper's recipe): 200 class images, weight 1.0, 800 steps."""
    for name in ("dreambooth", "dreambooth_controlnet_head"):
        params = get_card(name).resolve_params(None, {})
        assert params["train_with_prior_preservation"] is True and params["train_prior_loss_weight"] == 1.0
        assert params["train_num_class_images"] == 200 and params["train_steps"] == 800
        assert params["train_class_prompt"].format("woman") == "a photo of woman"
    assert smoke_params("dreambooth")["train_with_prior_preservation"] is True  # the smoke runs exercise it too


def test_prior_preservation_adds_the_class_term_to_the_loss(bench, tmp_path):
    """Same draws, class examples in the batch's second half: loss = instance MSE + weight x class MSE, and a
    weight of 0 gives the instance loss of a batch with the class examples in it."""
    base = load_sd15(None, tiny=True)
    class_images = ClassImages(base, torch.device("cpu"), torch.float32).ensure(tmp_path, "a photo of woman", 2, 0)
    reference = bench.reference_image("nasa-astronaut")

    def first_loss(**overrides):
        params = smoke_params("dreambooth", train_steps=1, **overrides)
        return Trainer("dreambooth", base, params, "cpu").train(reference, "a woman", seed=3, class_images=class_images).losses[0]

    without = first_loss(train_prior_loss_weight=0.0)
    once, twice = first_loss(train_prior_loss_weight=1.0), first_loss(train_prior_loss_weight=2.0)
    assert once > without and np.isclose(twice - without, 2 * (once - without), rtol=1e-4)
    assert first_loss(train_with_prior_preservation=False) != without  # a batch of one: other draws, no class term
    with pytest.raises(BenchError, match="needs its class images"):
        Trainer("dreambooth", base, smoke_params("dreambooth"), "cpu").train(reference, "a woman", seed=3)


def test_class_images_are_seeded_per_index_and_completed_not_remade(tmp_path):
    base = load_sd15(None, tiny=True)
    maker = ClassImages(base, torch.device("cpu"), torch.float32)
    paths = maker.ensure(tmp_path, "a photo of woman", 3, 0)
    record = json.loads((tmp_path / "class_images.json").read_text())
    assert [p.name for p in paths] == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert record["seeds"] == [ClassImages.seed(0, "a photo of woman", i) for i in range(3)] and record["count"] == 3
    assert Image.open(paths[0]).size == (64, 64)  # the tiny UNet's native size, as DiffusionPipeline's default
    kept, lost = paths[0].stat().st_mtime_ns, paths[1].read_bytes()
    paths[1].unlink()
    assert maker.ensure(tmp_path, "a photo of woman", 3, 0) == paths
    assert paths[0].stat().st_mtime_ns == kept and paths[1].read_bytes() == lost  # remade from its own seed
    assert not np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[2])))


def test_identity_phrase_takes_the_subjects_place():
    assert identity_phrase("textual_inversion", "a woman", {"train_placeholder_token": "<identity>"}) == "a <identity>"
    assert identity_phrase("dreambooth", "a man", {"train_identifier": "sks"}) == "a sks man"
    assert identity_phrase("lora", "person", {"train_identifier": "sks"}) == "sks person"


# -- cards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CARDS)
def test_card_defaults_pass_check_params_and_variants_share_the_training(name):
    card = get_card(name)
    adapter = get_method(card.adapter)
    assert adapter.recipe == card.adapter
    assert set(card.params) <= set(adapter.param_types)
    assert smoke_params(name) == card.resolve_params("smoke", {})
    adapter.check_params(dict(card.params), card.path)
    assert set(card.weights) == set(adapter.required_weights(card, card.resolve_params(None, {})))
    plain = get_card(card.adapter)
    assert training_params(card.params) == training_params(plain.params)
    assert training_params(card.resolve_params("smoke", {})) == training_params(plain.resolve_params("smoke", {}))
    assert ("head" in card.inputs) == name.endswith("_controlnet_head") == (card.head_input == "normals")


def test_bad_training_values_name_their_source():
    with pytest.raises(BenchError, match=r"dreambooth.yaml: field 'params.train_steps': expected int"):
        card = get_card("dreambooth")
        get_method("dreambooth").validated_params(card.model_copy(update={"params": {**card.params, "train_steps": "many"}}), None, {})
    with pytest.raises(BenchError, match=r"command line.*'train_dtype' must be one of bfloat16, float32"):
        smoke_params("lora", train_dtype="float16")
    with pytest.raises(BenchError, match=r"'scheduler' must be one of"):
        smoke_params("textual_inversion", scheduler="euler")


# -- the commands -----------------------------------------------------------------------------


def finetune(capsys, monkeypatch, runs, method, *extra):
    return cli(capsys, monkeypatch, "finetune", "--method", method, "--preset", "smoke", "--runs-dir", runs,
               "--device", "cpu", *extra)


def run(capsys, monkeypatch, runs, method, *extra):
    return cli(capsys, monkeypatch, "run", "--method", method, "--preset", "smoke", "--runs-dir", runs, "--device", "cpu",
               "--metrics", "face_detection", *extra)


def run_dirs(runs, method):
    return sorted(p for p in runs.iterdir() if p.name.startswith(f"{method}-demo-"))


def test_run_without_artefacts_names_the_finetune_command(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, tmp_path / "runs", "lora")
    assert code == 2 and "caphuman-bench finetune --method lora" in err and "no usable fine-tuned weights" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not run_dirs(tmp_path / "runs", "lora")  # nothing planned
    code, _, err = cli(capsys, monkeypatch, "finetune", "--method", "reference", "--runs-dir", tmp_path / "runs")
    assert code == 2 and "not fine-tuned per identity" in err


@pytest.mark.parametrize("recipe", RECIPES)
def test_finetune_then_run_end_to_end(recipe, bench, tmp_path, capsys, monkeypatch):
    """Both cards of a recipe on the demo split: one training, two complete runs with the artefacts' hashes."""
    runs = tmp_path / "runs"
    code, _, err = finetune(capsys, monkeypatch, runs, recipe)
    assert code == 0 and "trained 2, kept 0, failed 0" in err
    code, _, err = finetune(capsys, monkeypatch, runs, f"{recipe}_controlnet_head")  # same training: nothing to do
    assert code == 0 and "trained 0, kept 2, failed 0" in err
    store = ArtefactStore(runs, recipe, smoke_params(recipe))
    class_folder = store.class_images_folder("a photo of woman")
    if recipe == "dreambooth":  # the default recipe's class images, cached in the fine-tune folder
        assert len(list(class_folder.glob("*.jpg"))) == 2 and (class_folder / "class_images.json").exists()
    else:
        assert not (store.root / "class_images").exists()
    for name in (recipe, f"{recipe}_controlnet_head"):
        code, out, err = run(capsys, monkeypatch, runs, name)
        assert code == 0, err
        (run_dir,) = run_dirs(runs, name)
        info = json.loads((run_dir / "run.json").read_text())
        for identity_id in ("nasa-astronaut", "grace-hopper"):
            record = json.loads((store.folder(identity_id) / "finetune.json").read_text())
            assert info["artefacts"][identity_id]["sha256"] == record["sha256"]
            assert info["artefacts"][identity_id]["path"] == str(store.file(identity_id).relative_to(runs))
        images = sorted((run_dir / "images").glob("*.png"))
        assert len(images) == 12 and {np.asarray(Image.open(p)).shape for p in images} == {(64, 64, 3)}
        for part in ("tasks.jsonl", "status.jsonl", "scores.parquet", "results.json", "leaderboard.md"):
            assert (run_dir / part).exists(), part
        targets = list((run_dir / "targets").glob("*.npz")) if (run_dir / "targets").exists() else []
        assert len(targets) == (4 if name.endswith("_controlnet_head") else 0)
        head_input = "normals" if name.endswith("_controlnet_head") else "none"
        assert f"| {name} (smoke) | demo | {head_input} |" in out


def test_resume_skips_and_a_corrupt_artefact_is_retrained_never_used(bench, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    assert finetune(capsys, monkeypatch, runs, "textual_inversion")[0] == 0
    store = ArtefactStore(runs, "textual_inversion", smoke_params("textual_inversion"))
    path = store.file("nasa-astronaut")
    good, mtime = path.read_bytes(), path.stat().st_mtime_ns
    code, _, err = finetune(capsys, monkeypatch, runs, "textual_inversion")
    assert code == 0 and "trained 0, kept 2" in err and path.stat().st_mtime_ns == mtime

    # a run planned with these artefacts refuses the file once it changed under it
    assert run(capsys, monkeypatch, runs, "textual_inversion", "--no-score")[0] == 0
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF
    path.write_bytes(bytes(corrupt))  # same size: only the hash tells
    code, _, err = run(capsys, monkeypatch, runs, "textual_inversion", "--no-score", "--force")
    assert code == 1
    status = [json.loads(line) for line in (run_dirs(runs, "textual_inversion")[0] / "status.jsonl").read_text().splitlines()]
    failed = [s for s in status if s["status"] == "failed"]
    assert len(failed) == 6 and all("nasa-astronaut" in s["task_id"] and "sha256" in s["reason"] for s in failed)

    # finetune retrains it (same seed: the same bytes again), keeps the other identity
    code, _, err = finetune(capsys, monkeypatch, runs, "textual_inversion")
    assert code == 0 and "trained 1, kept 1" in err and "retrained nasa-astronaut" in err and "sha256 differs" in err
    assert path.read_bytes() == good

    # an artefact made anew with other content is another configuration: a new run, never the old images
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file({k: v + 1 for k, v in tensors.items()}, path)
    record = json.loads((store.folder("nasa-astronaut") / "finetune.json").read_text())
    store.write_record("nasa-astronaut", bench.reference_sha256("nasa-astronaut"), record["subject"], record["identity_phrase"], {})
    assert run(capsys, monkeypatch, runs, "textual_inversion", "--no-score")[0] == 0
    assert len(run_dirs(runs, "textual_inversion")) == 2

    # run.json names the artefacts relative to the runs folder: a moved folder generates as before
    moved = tmp_path / "moved"
    runs.rename(moved)
    assert run(capsys, monkeypatch, moved, "textual_inversion", "--no-score", "--force")[0] == 0
    assert len(run_dirs(moved, "textual_inversion")) == 2


def test_the_full_model_path_trains_and_generates_from_a_diffusers_folder(tmp_path, capsys, monkeypatch):
    """Without `tiny`, the base model is the `stable_diffusion_v1_5` folder (here tiny weights saved in its layout)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    base = load_sd15(None, tiny=True)
    folder = tmp_path / "stable-diffusion-v1-5"
    StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                            scheduler=PNDMScheduler.from_config(base.scheduler_config), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    base.tokenizer.backend_tokenizer.model.save(str(folder / "tokenizer"))  # vocab.json + merges.txt, as SD-1.5's folder
    runs = tmp_path / "runs"
    small = ["--param", "train_steps=1", "--param", "train_resolution=64", "--param", "height=64", "--param", "width=64",
             "--param", "num_inference_steps=2", "--weights", f"stable_diffusion_v1_5={folder}", "--split", "demo",
             "--runs-dir", runs, "--device", "cpu"]
    code, _, err = cli(capsys, monkeypatch, "finetune", "--method", "dreambooth", *small)
    assert code == 0 and "trained 2" in err and "dreambooth-" in err, err
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "dreambooth", "--no-score", *small)
    assert code == 0, err
    (run_dir,) = run_dirs(runs, "dreambooth")
    assert len(list((run_dir / "images").glob("*.png"))) == 12
    assert json.loads((run_dir / "run.json").read_text())["params"]["tiny"] is False


def test_finetune_on_a_split_without_identities_says_how_to_prepare_it(tmp_path, capsys, monkeypatch):
    code, _, err = cli(capsys, monkeypatch, "finetune", "--method", "lora", "--preset", "smoke", "--split", "full",
                       "--runs-dir", tmp_path / "runs")
    assert code == 2 and "data prepare" in err and not (tmp_path / "runs").exists()


def test_an_artefact_counts_only_for_its_photo_subject_and_bytes(tmp_path):
    store = ArtefactStore(tmp_path, "lora", smoke_params("lora"))
    assert store.root.parent == tmp_path / "finetune" and store.root.name.startswith("lora-")
    assert store.verify("ada", "photo-sha", "a woman", full=True) == (None, f"no artefact ({store.folder('ada')}/finetune.json missing)")
    store.file("ada").parent.mkdir(parents=True)
    weights = safetensors.torch.save({"w": torch.ones(2)})
    store.file("ada").write_bytes(weights)
    store.write_record("ada", "photo-sha", "a woman", "a sks woman", {})
    artefact, _ = store.verify("ada", "photo-sha", "a woman", full=True)
    assert artefact.sha256 == hashlib.sha256(weights).hexdigest() == artefact.record["sha256"]
    assert store.verify("ada", "other-photo", "a woman", full=True)[0] is None
    assert "subject phrase" in store.verify("ada", "photo-sha", "a man", full=True)[1]
    store.file("ada").write_bytes(weights[:-1] + bytes([weights[-1] ^ 0xFF]))  # same size: planning's cheap check passes, the full one does not
    assert store.verify("ada", "photo-sha", "a woman", full=False)[0] is not None
    assert "sha256 differs" in store.verify("ada", "photo-sha", "a woman", full=True)[1]
    # another training setting is another folder; the _controlnet_head card shares this one
    assert ArtefactStore(tmp_path, "lora", smoke_params("lora", train_steps=3)).root != store.root
    assert ArtefactStore(tmp_path, "lora", smoke_params("lora_controlnet_head")).root == store.root
