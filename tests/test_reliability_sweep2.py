"""Issue 22, the second fault sweep: each of its 17 faults, reproduced as the issue found it.

Numbers in the section titles are the issue's. Shared with test_reliability.py: the tiny finished run
(conftest.py's `spec`, `baseline`, `damaged`: reference method, 1 identity x 1 prompt x 2 head conditions,
face_detection) and the CLI helpers (reliability_helpers.py).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
import yaml

from caphuman_bench.errors import BenchError
from tests.reliability_helpers import METRICS, assert_one_line_error, invoke, run_args

REPO = Path(__file__).resolve().parents[1]


def edited_spec(spec: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of the spec with `edit(data)` applied to the YAML file `name`."""
    root = tmp_path / "spec"
    shutil.copytree(spec, root)
    data = yaml.safe_load((root / name).read_text())
    edit(data)
    (root / name).write_text(yaml.safe_dump(data))
    return root


def tiny_split(**fields):
    def edit(data):
        data["splits"]["tiny"].update(fields)
    return edit


# --- 1. report reads the spec the run was planned with, or refuses ------------------------------


def test_report_refuses_a_spec_edited_or_broken_after_the_run(damaged, spec, tmp_path):
    own = tmp_path / "own-spec"
    shutil.copytree(spec, own)
    info = json.loads((damaged / "run.json").read_text())
    info["benchmark"]["spec_root"] = str(own)  # this run's spec, byte for byte: ours to edit
    (damaged / "run.json").write_text(json.dumps(info))
    code, _, err = invoke("report", damaged, "--out", tmp_path / "b0")
    assert code == 0, err

    prompts = yaml.safe_load((own / "prompts.yaml").read_text())
    prompts["prompts"][0]["category"] = "another-category"  # would move the same scores to another group
    (own / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    assert_one_line_error(invoke("report", damaged, "--out", tmp_path / "b1"), "spec changed since", "run.json")
    assert_one_line_error(invoke("compare", "--paired", damaged, damaged), "spec changed since")

    (own / "prompts.yaml").write_text("prompts: [")  # no longer loads: not every group "unknown"
    assert_one_line_error(invoke("report", damaged, "--out", tmp_path / "b2"), "does not load any more", "prompts.yaml")


# --- 2. finetune.json's identity_phrase is checked -------------------------------------------------


def _store_with_artefact(tmp_path, recipe="dreambooth"):
    from caphuman_bench.cards import get_card
    from caphuman_bench.finetune.artefacts import ArtefactStore
    from caphuman_bench.registry import get_method

    card = get_card(recipe)
    store = ArtefactStore(tmp_path, recipe, get_method(card.adapter).validated_params(card, "smoke", {}))
    store.file("ada").parent.mkdir(parents=True)
    safetensors.torch.save_file({"w": torch.ones(3)}, store.file("ada"))
    store.write_record("ada", "photo-sha", "a woman", "a sks woman", {})
    assert store.verify("ada", "photo-sha", "a woman", full=True)[0] is not None
    return store


def test_an_edited_identity_phrase_makes_the_artefact_unusable(tmp_path):
    store = _store_with_artefact(tmp_path)
    record_path = store.folder("ada") / "finetune.json"
    record = json.loads(record_path.read_text())
    record["identity_phrase"] = "a photo of Ada Lovelace"  # `run` would put this into every prompt
    record_path.write_text(json.dumps(record))
    for full in (False, True):
        artefact, reason = store.verify("ada", "photo-sha", "a woman", full=full)
        assert artefact is None and "identity_phrase" in reason and "'a sks woman'" in reason


# --- 3. head angles within the range that names each rotation once -------------------------------


@pytest.mark.parametrize("field, value", [("yaw", 720), ("yaw", 1e308), ("yaw", -180.5), ("pitch", 91), ("roll", 360)])
def test_head_angles_out_of_range_are_refused(field, value, spec, tmp_path):
    root = edited_spec(spec, tmp_path, "head_conditions.yaml", lambda d: d["conditions"][0].update({field: value}))
    assert_one_line_error(invoke("data", "show", "--spec", root), "head_conditions.yaml", f"field '{field}'", "outside")


# --- 4. fine-tuned weights are opened, not only hashed ---------------------------------------------


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(4000), pickle.dumps({"unet": [1, 2, 3]})])
def test_weights_that_are_not_safetensors_with_a_matching_record_are_retrained(content, tmp_path):
    store = _store_with_artefact(tmp_path)
    store.file("ada").write_bytes(content)
    record = json.loads((store.folder("ada") / "finetune.json").read_text())
    store.write_record("ada", "photo-sha", "a woman", record["identity_phrase"], {})  # sha256 and size updated
    for full in (False, True):  # planning a run, and finetune (which then trains it again)
        artefact, reason = store.verify("ada", "photo-sha", "a woman", full=full)
        assert artefact is None and "unet.safetensors" in reason and "safetensors" in reason


# --- 5. a truncated backbone .safetensors is one line ------------------------------------------------


def test_a_truncated_safetensors_checkpoint_is_one_line(tmp_path):
    from caphuman_bench.loaders.convert_caphuman import load_checkpoint_file

    path = tmp_path / "backbone.safetensors"
    safetensors.torch.save_file({"model.w": torch.zeros(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BenchError, match=r"backbone\.safetensors: cannot read checkpoint as safetensors"):
        load_checkpoint_file(path)


# --- 6, 7, 17. launcher environment and --shard: ASCII whole numbers in range ------------------------


def test_a_bad_local_rank_is_one_line_before_any_import_reads_it(spec, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOCAL_RANK": "x", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "caphuman_bench.cli", *map(str, run_args(spec, tmp_path / "runs"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert_one_line_error((done.returncode, done.stdout, done.stderr), "LOCAL_RANK 'x'", "digits 0-9")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("variable, value, needle", [
    ("WORLD_SIZE", "²", "WORLD_SIZE '²'"),
    ("WORLD_SIZE", "0", "WORLD_SIZE '0': expected a whole number of at least 1"),
    ("RANK", "١", "RANK '١'"),
    ("CAPHUMAN_BENCH_HOST_THREADS", "abc", "CAPHUMAN_BENCH_HOST_THREADS 'abc'"),
    ("CAPHUMAN_BENCH_HOST_THREADS", "0", "CAPHUMAN_BENCH_HOST_THREADS '0'"),
])
def test_a_bad_environment_number_is_one_line_before_any_work(variable, value, needle, spec, tmp_path, monkeypatch):
    monkeypatch.setenv(variable, value)
    assert_one_line_error(invoke(*run_args(spec, tmp_path / "runs")), needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("shard", ["٠/٢", "0/²", "1/1"])
def test_a_shard_in_other_digits_is_refused(shard, spec, tmp_path):
    assert_one_line_error(invoke(*run_args(spec, tmp_path / "runs", "--shard", shard)), f"--shard {shard!r}")
    assert not (tmp_path / "runs").exists()


def test_prepared_count_in_other_digits_is_refused(spec, tmp_path):
    root = edited_spec(spec, tmp_path, "splits.yaml", tiny_split(identities="prepared:٣"))
    assert_one_line_error(invoke("data", "show", "--spec", root), "prepared:N")


# --- 8. a torch file that is not a mapping ---------------------------------------------------------


@pytest.mark.parametrize("content", [[1, 2, 3], {"state_dict": [torch.zeros(2)]}, {"w": 3}])
def test_curricularface_weights_that_are_not_a_state_dict_are_one_line(content, tmp_path):
    from caphuman_bench.models.curricularface import load_curricularface

    path = tmp_path / "ir101.pth"
    torch.save(content, path)
    with pytest.raises(BenchError, match=r"ir101\.pth: not the CurricularFace IR-101 weights"):
        load_curricularface(path)


# --- 9. finetune into a folder that cannot be written stops before training ----------------------------


@pytest.mark.parametrize("fault, hint", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full")])
def test_finetune_into_an_unwritable_folder_stops_before_training(fault, hint, tmp_path, monkeypatch):
    import tempfile

    from caphuman_bench.finetune.training import Trainer

    real_mkstemp = tempfile.mkstemp

    def unwritable(*args, dir=None, **kwargs):
        if dir is not None and "finetune" in str(dir):
            raise OSError(fault, os.strerror(fault))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def train(*args, **kwargs):
        raise AssertionError("trained although nothing could be saved")

    monkeypatch.setattr(tempfile, "mkstemp", unwritable)
    monkeypatch.setattr(Trainer, "train", train)
    result = invoke("finetune", "--method", "textual_inversion", "--preset", "smoke", "--runs-dir", tmp_path / "runs",
                    "--device", "cpu")
    assert_one_line_error(result, str(tmp_path / "runs" / "finetune"), hint)


def test_a_full_disk_at_a_save_stops_finetune_at_once(tmp_path, monkeypatch):
    from caphuman_bench.atomic import environment_fault
    from caphuman_bench.finetune.training import TrainedArtefact

    saves = []

    def full_disk(self, path):
        saves.append(path)
        raise environment_fault(OSError(errno.ENOSPC, "No space left on device"), path)

    monkeypatch.setattr(TrainedArtefact, "save", full_disk)
    result = invoke("finetune", "--method", "textual_inversion", "--preset", "smoke", "--runs-dir", tmp_path / "runs",
                    "--device", "cpu", "--param", "train_steps=1")
    assert_one_line_error(result, "learned_embeds.safetensors", "disk is full")
    assert len(saves) == 1  # not every identity trained, then failed one by one


# --- 11, 12. splits: each id once; a photo count no identity has is named -----------------------------


@pytest.mark.parametrize("field, value, needle", [
    ("prompts", ["acc-red-hat", "acc-red-hat"], "field 'prompts' lists acc-red-hat more than once"),
    ("identities", ["nasa-astronaut", "nasa-astronaut"], "field 'identities' lists nasa-astronaut more than once"),
    ("conditions", ["frontal", "yaw-r20", "frontal"], "field 'conditions' lists frontal more than once"),
    ("references", [1, 1, 3], "field 'references' lists 1 more than once"),
])
def test_duplicate_ids_in_a_split_are_refused_before_a_run_folder(field, value, needle, spec, tmp_path):
    root = edited_spec(spec, tmp_path, "splits.yaml", tiny_split(**{field: value}))
    assert_one_line_error(invoke(*run_args(root, tmp_path / "runs")), "splits.yaml", "'tiny'", needle)
    assert not (tmp_path / "runs").exists()


def test_a_photo_count_no_identity_has_names_the_identities(spec, tmp_path):
    root = edited_spec(spec, tmp_path, "splits.yaml", tiny_split(references=[1, 3, 99]))
    line = assert_one_line_error(invoke(*run_args(root, tmp_path / "runs")), "'tiny'", "99 photos", "nasa-astronaut (")
    assert "data prepare" not in line


# --- 13. compare --paired with a run that has no scores -----------------------------------------------


def test_paired_comparison_with_nothing_scored_in_common_is_one_line(damaged, tmp_path):
    empty = tmp_path / "empty" / damaged.name
    shutil.copytree(damaged, empty)
    (empty / "scores.parquet").unlink()
    assert_one_line_error(invoke("compare", "--paired", damaged, empty), "no value is scored in both runs")


# --- 14. a reference photo without a face is found before generation -----------------------------------


def test_a_reference_photo_without_a_face_stops_the_run_before_generation(spec, tmp_path):
    root = tmp_path / "spec"
    shutil.copytree(spec, root)
    identities = root / "identities.csv"
    identities.write_text(identities.read_text().replace("skimage:astronaut", "skimage:coins", 1))
    dummy = tmp_path / "facenet.pt"
    torch.save({}, dummy)  # opens (pre-flight reads every named weights file) but is never loaded: the check needs the detector only
    result = invoke("run", "--method", "reference", "--preset", "smoke", "--split", "tiny", "--spec", root, "--runs-dir",
                    tmp_path / "runs", "--metrics", "face_detection,id_sim_facenet", "--device", "cpu",
                    "--weights", f"facenet_vggface2={dummy}")
    assert_one_line_error(result, "no face found", "nasa-astronaut (skimage:coins)", "id_sim_facenet")
    assert not (tmp_path / "runs").exists()


# --- 15. an infinity in scores.parquet ------------------------------------------------------------------


def test_an_infinite_score_is_refused_by_report_and_compare_and_rebuilt_by_score(damaged, baseline, tmp_path):
    scores = pd.read_parquet(damaged / "scores.parquet")
    scores.loc[0, "face_detection"] = np.inf
    scores.to_parquet(damaged / "scores.parquet")
    assert_one_line_error(invoke("report", damaged, "--out", tmp_path / "b"), "scores.parquet", "infinite", "rebuilds it")
    assert_one_line_error(invoke("compare", "--paired", damaged, baseline), "scores.parquet", "infinite")
    code, _, err = invoke("score", damaged, "--metrics", METRICS, "--device", "cpu")
    assert code == 0, err
    assert np.isfinite(pd.read_parquet(damaged / "scores.parquet")["face_detection"]).all()


# --- 16. a full disk while figures are written names the figure ----------------------------------------


def test_a_full_disk_while_saving_a_figure_names_the_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from caphuman_bench.atomic import EnvironmentFault
    from caphuman_bench.report import figures

    def full(self, fh, **kwargs):
        fh.write(b"half a figure")
        raise OSError(errno.ENOSPC, "No space left on device")

    fig = figures._plt().figure()
    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(EnvironmentFault, match=r"ablation_tau\.png: No space left on device; the disk is full"):
        figures.save_files(fig, tmp_path / "ablation_tau")
    assert list(tmp_path.iterdir()) == []  # no half-written figure, no temp file
