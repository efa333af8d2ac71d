"""Benchmark axes beyond the paper (issue 13): extreme poses, FastComposer's protocol as a spec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from caphuman_bench.benchmark import Benchmark, axis_angle_to_euler
from caphuman_bench.stages.plan import plan_tasks
from tests.cli_helpers import cli, only_run

FASTCOMPOSER_SPEC = Path(__file__).resolve().parents[1] / "caphuman_bench" / "benchmark_data" / "fastcomposer"
PAPER_CONDITIONS = {"frontal", "yaw-l45", "yaw-l20", "yaw-r20", "yaw-r45", "pitch-up20", "pitch-down20", "roll-15",
                    "jaw-open", "side-light"}


def test_the_paper_protocol_keeps_its_ten_head_conditions():
    bench = Benchmark.load()
    assert set(bench.split("full").conditions) == PAPER_CONDITIONS
    assert set(bench.split("pose").conditions) == PAPER_CONDITIONS


def test_pose_extreme_reaches_ninety_degrees_of_yaw_and_plans_every_condition():
    bench = Benchmark.load()
    split = bench.split("pose-extreme")
    yaws = sorted({round(bench.conditions[c].yaw) for c in split.conditions})
    assert yaws == [-90, -75, -60, -45, -20, 0, 20, 45, 60, 75, 90]
    assert max(abs(bench.conditions[c].pitch) for c in split.conditions) == 35
    combined = [c for c in split.conditions if bench.conditions[c].yaw and bench.conditions[c].pitch]
    assert len(combined) == 4
    for cid in split.conditions:  # the stored axis-angle is the rotation its angles name
        condition = bench.conditions[cid]
        yaw, pitch, roll = axis_angle_to_euler(condition.pose[:3])
        assert abs(yaw - condition.yaw) < 1e-3 and abs(pitch - condition.pitch) < 1e-3
    tasks = plan_tasks(bench, "pose-extreme")
    assert len(tasks) == len(split.identities) * len(split.conditions) == 2 * 19
    assert {t.condition_id for t in tasks} == set(split.conditions)


def test_pose_extreme_runs_on_the_smoke_preset(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--split", "pose-extreme",
                       "--runs-dir", runs, "--metrics", "face_detection")
    assert code == 0, err
    results = json.loads((only_run(runs) / "results.json").read_text())
    assert results["images"] == {"planned": 38, "ok": 38, "failed": 0, "missing": 0}


def test_fastcomposer_spec_is_its_evaluation_protocol():
    bench = Benchmark.load(FASTCOMPOSER_SPEC)
    full = bench.split("full")
    assert (len(full.identities), len(full.prompts), full.samples) == (15, 40, 4)
    assert len(plan_tasks(bench, "full")) == 15 * 40 * 4
    categories = [bench.prompts[p].category for p in full.prompts]
    assert [categories.count(c) for c in ("accessory", "style", "action", "context")] == [10, 10, 10, 10]
    # FastComposer's template 'a {unique} {class} ...' with the class word as the subject phrase
    assert bench.prompts["acc-00"].text.replace("{subject}", "a man") == "a man wearing a red hat"
    assert bench.prompts["sty-08"].text.replace("{subject}", "a woman") == "a Japanese woodblock print of a woman"
    assert {bench.identities[i].subject for i in full.identities} == {"a man", "a woman"}
    assert sum(bench.identities[i].subject == "a man" for i in full.identities) == 6  # IMAGE_TO_GENDER_EVAL: 6 men, 9 women


def test_fastcomposer_spec_runs_on_the_smoke_preset(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--spec", FASTCOMPOSER_SPEC,
                       "--runs-dir", runs, "--metrics", "face_detection")
    assert code == 0, err
    results = json.loads((only_run(runs) / "results.json").read_text())
    assert results["images"]["ok"] == 4 and results["benchmark_version"] == "fastcomposer-eval-1.0"


def _tiny_backbone_folder(path: Path) -> Path:
    """A tiny SD-1.5-layout model in diffusers' folder format: the tiny CapHuman's UNet, VAE and text
    encoder with other random weights (seed 1), saved with save_pretrained."""
    from caphuman_bench.pipelines.tiny import build_tiny_caphuman_pipeline

    other = build_tiny_caphuman_pipeline(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        getattr(other, name).save_pretrained(path / name)
    return path


def test_a_diffusers_backbone_folder_replaces_unet_vae_and_text_encoder(tmp_path):
    import torch

    from caphuman_bench.loaders.convert_caphuman import overlay_any_backbone
    from caphuman_bench.pipelines.tiny import build_tiny_caphuman_pipeline

    folder = _tiny_backbone_folder(tmp_path / "backbone")
    pipe, other = build_tiny_caphuman_pipeline(seed=0), build_tiny_caphuman_pipeline(seed=1)
    capface_before = {k: v.clone() for k, v in pipe.capface.state_dict().items()}
    assert overlay_any_backbone({n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder")}, None, folder) == [
        "unet", "vae", "text_encoder"]
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(torch.equal(v, capface_before[k]) for k, v in pipe.capface.state_dict().items())  # CapFace stays


def test_ablate_sweeps_the_backbone_and_records_its_hash(tmp_path, capsys, monkeypatch):
    folder = _tiny_backbone_folder(tmp_path / "backbone")
    runs = tmp_path / "runs"
    code, out, err = cli(capsys, monkeypatch, "ablate", "--method", "caphuman", "--preset", "smoke", "--backbone", "caphuman",
                         "--backbone", folder, "--runs-dir", runs, "--out", tmp_path / "ablation", "--metrics", "face_detection",
                         "--param", "num_inference_steps=2")
    assert code == 0, err
    runs_by_backbone = {json.loads((r / "run.json").read_text())["params"]["backbone"]: r for r in runs.iterdir() if r.is_dir()}
    assert set(runs_by_backbone) == {"caphuman", str(folder)}
    info = json.loads((runs_by_backbone[str(folder)] / "run.json").read_text())
    assert info["artefacts"]["backbone"]["path"] == str(folder.resolve()) and len(info["artefacts"]["backbone"]["sha256"]) == 64
    first = sorted(p.name for p in (runs_by_backbone["caphuman"] / "images").glob("*.png"))[0]
    assert (runs_by_backbone["caphuman"] / "images" / first).read_bytes() != (runs_by_backbone[str(folder)] / "images" / first).read_bytes()
    bad = cli(capsys, monkeypatch, "run", "--method", "caphuman", "--preset", "smoke", "--param", "backbone=/no/such/model",
              "--runs-dir", runs)
    assert bad[0] == 2 and "parameter 'backbone'" in bad[2] and "/no/such/model" in bad[2]


def test_the_references_split_runs_each_identity_with_one_three_and_five_photos():
    bench = Benchmark.load()
    split = bench.split("references")
    assert split.references == (1, 3, 5)
    assert set(split.identities) == {f"{i}@{k}" for i in ("nasa-astronaut", "grace-hopper") for k in (1, 3, 5)}
    assert [len(bench.reference_images(f"nasa-astronaut@{k}")) for k in (1, 3, 5)] == [1, 3, 5]
    assert len(bench.reference_images("nasa-astronaut")) == 1  # other splits: the first photo only (the paper's protocol)
    assert bench.reference_sha256("nasa-astronaut@1") == bench.reference_sha256("nasa-astronaut")
    assert len({bench.reference_sha256(f"nasa-astronaut@{k}") for k in (1, 3, 5)}) == 3
    assert bench.identities["nasa-astronaut@3"].subject == "a woman"
    assert len(plan_tasks(bench, "references")) == 6 * 2


def test_a_references_split_leaves_out_identities_with_too_few_photos(tmp_path):
    import shutil

    spec = tmp_path / "spec"
    shutil.copytree(Benchmark.load().root, spec)
    rows = (spec / "identities.csv").read_text().replace(";matplotlib:grace_hopper.jpg~dim", "")  # 4 photos
    (spec / "identities.csv").write_text(rows)
    bench = Benchmark.load(spec)
    assert bench.split("references").identities == ("nasa-astronaut@1", "nasa-astronaut@3", "nasa-astronaut@5")
    assert bench.split("demo").identities == ("nasa-astronaut", "grace-hopper")


def test_identity_metrics_score_against_the_first_photo_and_the_mean_of_all(tmp_path, capsys, monkeypatch):
    """dlib (offline) on the reference method (the first photo, resized): against the first photo the value
    is the same for @1, @3 and @5; against the mean of the photos (with mirrored, cropped, dimmed variants)
    it is another value for @3 and @5, and not scored for @1."""
    import pandas as pd

    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--split", "references",
                       "--runs-dir", runs, "--metrics", "id_sim_dlib")
    assert code == 0, err
    rows = pd.read_parquet(only_run(runs) / "scores.parquet").set_index("identity_id")
    assert len(rows) == 12 and set(rows["status"]) == {"ok"}
    for identity in ("nasa-astronaut", "grace-hopper"):
        first = rows.loc[[f"{identity}@{k}" for k in (1, 3, 5)], "id_sim_dlib"]
        assert np.allclose(first, first.iloc[0]) and first.iloc[0] > 0.99
        assert np.isnan(rows.loc[f"{identity}@1", "id_sim_dlib_mean_ref"]).all()
        for k in (3, 5):
            mean_ref = rows.loc[f"{identity}@{k}", "id_sim_dlib_mean_ref"]
            assert (abs(mean_ref - first.iloc[0]) > 1e-4).all() and (mean_ref > 0.9).all()


def test_photomaker_gets_every_photo_of_a_references_identity(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, "run", "--method", "photomaker", "--preset", "smoke", "--split", "references",
                       "--runs-dir", runs, "--metrics", "face_detection", "--param", "num_inference_steps=2")
    assert code == 0, err
    images = {p.name: p.read_bytes() for p in (only_run(runs) / "images").glob("*.png")}
    assert len(images) == 12
    one = [b for n, b in images.items() if "nasa-astronaut@1" in n]
    five = [b for n, b in images.items() if "nasa-astronaut@5" in n]
    assert one and five and one[0] != five[0]  # five ID images condition the generation differently from one
