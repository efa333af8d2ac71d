"""A score does not depend on the batch or the shard: one set of images scored with batch sizes 1, 3
and 8 and by two gloo processes (a shard each) gives the same rows (≤ 1e-6; angles in radians), on the
CPU in strict float32, and scoring.json says how they were scored. Random weights, built here: FaceNet, DECA and a
tiny FAN in their official layouts (benchmarks/make_random_weights.py), a tiny open_clip CLIP, AlexNet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from caphuman_bench.numerics import strict_float32, tf32_state

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["face_detection", "id_sim_facenet", "head_control", "clip_score", "prompt_accuracy", "face_diversity"]
TINY_CLIP = "caphuman-test-invariance-clip"
CLIP_CONFIG = {"embed_dim": 32, "quick_gelu": True,
               "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _register_tiny_clip(folder: Path) -> None:
    import open_clip

    config = folder / f"{TINY_CLIP}.json"
    if not config.exists():
        config.write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(config)


def _weights(folder: Path) -> dict:
    """Scoring options naming random weights files for every family in FAMILIES."""
    import open_clip
    import torchvision

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_random_weights as mrw

    written = mrw.write_all(folder, layout="tiny", seed=0, only=["facenet_vggface2", "deca_model", "fan_2dfan4"])
    torch.manual_seed(0)
    alexnet = folder / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in torchvision.models.alexnet(weights=None).features.state_dict().items()}, alexnet)
    _register_tiny_clip(folder)
    clip = folder / "tiny_clip.bin"
    torch.save(open_clip.create_model(TINY_CLIP, pretrained=None, force_quick_gelu=True).state_dict(), clip)
    paths = {wid: str(path) for wid, path in written.items()} | {"lpips_alexnet": str(alexnet)}
    return {"clip_model": TINY_CLIP, "clip_checkpoint": str(clip), "weights_paths": paths}


def _perturb(run_dir: Path) -> None:
    """Every image distinct (shift, zoom, noise; seeded per image): the per-pixel memos must not
    hand one image's result to another."""
    from PIL import Image

    for index, path in enumerate(sorted((run_dir / "images").glob("*.png"))):
        rng = np.random.default_rng(index)
        image = Image.open(path).convert("RGB")
        w, h = image.size
        zoom, (dx, dy) = rng.uniform(0.94, 1.06), rng.uniform(-0.03, 0.03, 2) * (w, h)
        image = image.transform((w, h), Image.AFFINE, (1 / zoom, 0, dx, 0, 1 / zoom, dy), resample=Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 3, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def _rows(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "scores.parquet").sort_values(["task_id", "metric"]).reset_index(drop=True)


def _score_pass(run_dir: Path, options: dict, batch_size: int, shard=None) -> pd.DataFrame:
    from caphuman_bench.faces.memo import forget_all
    from caphuman_bench.rundir import RunDir
    from caphuman_bench.stages.plan import Shard
    from caphuman_bench.stages.score import score

    forget_all()  # the per-image memos (detections, CLIP embeddings) of an earlier pass
    summary = score(RunDir(run_dir), metrics=FAMILIES, options=options, force=True, batch_size=batch_size,
                    shard=shard or Shard(0, 1))
    assert not summary.errors and not summary.skipped, (summary.errors, summary.skipped)
    return _rows(run_dir)


def _shard_worker(rank: int, world: int, init_file: str, run_dir: str, options: dict, folder: str) -> None:
    import torch.distributed as dist

    from caphuman_bench.stages.plan import Shard

    torch.set_num_threads(1)
    _register_tiny_clip(Path(folder))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _score_pass(Path(run_dir), options, 8, Shard(rank, world))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _largest_differences(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, float]:
    """Per value column the largest |a − b|, angles in radians: float32 DECA poses differ between
    batchings by ~6e-8 (oneDNN's kernels follow the batch size), which the degrees scale by 57."""
    assert list(a["task_id"]) == list(b["task_id"]) and list(a["metric"]) == list(b["metric"])
    assert list(a["status"]) == list(b["status"])
    values = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
    unit = {c: np.pi / 180 if c.endswith("_deg") else 1.0 for c in values}
    return {c: float(np.nanmax(np.abs(a[c].to_numpy() - b[c].to_numpy()), initial=0.0)) * unit[c] for c in values}


@pytest.mark.slow
def test_rows_do_not_depend_on_the_batch_or_the_shard(tmp_path, capsys, monkeypatch):
    import torch.multiprocessing as mp

    from tests.cli_helpers import cli, only_run

    code, _, err = cli(capsys, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir",
                       tmp_path / "runs", "--no-score", "--device", "cpu")
    assert code == 0, err
    run_dir = only_run(tmp_path / "runs")
    _perturb(run_dir)
    options = _weights(tmp_path / "w")

    by_batch = {size: _score_pass(run_dir, options, size) for size in (8, 3, 1)}
    assert len(by_batch[8]) == 12 * len(FAMILIES) and (by_batch[8]["status"] == "ok").mean() > 0.5
    for size in (3, 1):
        gaps = _largest_differences(by_batch[8], by_batch[size])
        assert max(gaps.values()) <= 1e-6, {k: v for k, v in gaps.items() if v > 1e-6}

    worker_args = (2, str(tmp_path / "gloo-init"), str(run_dir), options, str(tmp_path / "w"))
    mp.start_processes(_shard_worker, args=worker_args, nprocs=2, start_method="spawn", join=True)
    gaps = _largest_differences(by_batch[8], _rows(run_dir))
    assert max(gaps.values()) <= 1e-6, {k: v for k, v in gaps.items() if v > 1e-6}

    recorded = json.loads((run_dir / "scoring.json").read_text())["metrics"]
    for family in FAMILIES:
        numerics = recorded[family]["numerics"]
        assert numerics["device"] == "cpu" and numerics["dtype"] == "float32" and numerics["batch_size"] == 8
        assert numerics["tf32"] == {"matmul": False, "cudnn": False, "float32_matmul_precision": "highest"}


def test_strict_float32_holds_inside_the_block_and_restores_the_process_settings():
    torch.set_float32_matmul_precision("high")  # what a generation fast path may ask for
    torch.backends.cudnn.benchmark = True
    try:
        before = tf32_state()
        with pytest.raises(RuntimeError), strict_float32():
            assert tf32_state() == {"matmul": False, "cudnn": False, "float32_matmul_precision": "highest"}
            assert not torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
            assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
            raise RuntimeError("a metric fails")
        assert tf32_state() == before == {"matmul": True, "cudnn": True, "float32_matmul_precision": "high"}
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        assert not torch.backends.cudnn.deterministic
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False


def test_compare_warns_when_two_boards_were_scored_under_different_precision(tmp_path):
    from caphuman_bench.stages.report import compare

    def board(name: str, precision: str | None) -> Path:
        rows = [{"method": "m", "split": "full", "metric": metric, "mean": 0.5, "higher_is_better": True,
                 **({"precision": precision} if precision else {})} for metric in ("clip_score", "prompt_acc_top1")]
        path = tmp_path / name
        path.write_text(json.dumps({"rows": rows}))
        return path

    gpu, cpu, old = board("gpu.json", "cuda float16, TF32 off"), board("cpu.json", "cpu float32, TF32 off"), board("old.json", None)
    table, regressed, warnings = compare(gpu, cpu, 0.01)
    assert not regressed and len(table) == 2
    assert warnings == [("m (full): clip_score, prompt_acc_top1 scored under different precision: cuda float16, TF32 off in OLD, "
                         "cpu float32, TF32 off in NEW; their differences include the arithmetic's")]
    assert "unrecorded in OLD" in compare(old, cpu, 0.01)[2][0]
    assert compare(cpu, cpu, 0.01)[2] == []


def test_boxes_and_landmarks_are_found_one_image_at_a_time(monkeypatch):
    """MTCNN's thresholds and FAN's arg-max turn a batch's last-bit differences into other crops (issue 25:
    on an H100 batch 64 against 7 moved whole rows), so each image goes through them alone."""
    from PIL import Image

    from caphuman_bench.faces import detection, landmarks

    seen = []
    real = detection.mtcnn_detect
    monkeypatch.setattr(detection, "mtcnn_detect", lambda net, images: seen.append(len(images)) or real(net, images))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(3)]
    detection.detect_faces(images, "cpu", max_side=None)
    assert seen == [1, 1, 1]
    assert landmarks.FAN_BATCH == 1
