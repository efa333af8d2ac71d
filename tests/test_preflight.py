"""Mistakes surface before any image: a misspelled metric, a named metric without its weights, and a
weights file that is missing or does not open stop `run` before the run folder is created (exit 2)."""

from __future__ import annotations

from tests.cli_helpers import cli

SMOKE = ("run", "--method", "reference", "--preset", "smoke")


def stopped_before_any_image(capsys, monkeypatch, tmp_path, *extra) -> str:
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, monkeypatch, *SMOKE, "--runs-dir", runs, *extra)
    assert code == 2, err
    assert not runs.exists() or not any(runs.iterdir())  # no run folder, no image
    assert "Traceback" not in err and err.count("error:") == 1
    return err


def test_misspelled_metric_stops_the_run_first(tmp_path, monkeypatch, capsys):
    err = stopped_before_any_image(capsys, monkeypatch, tmp_path, "--metrics", "face_detection,id_sim_facnet")
    assert "unknown metric 'id_sim_facnet'" in err


def test_named_metric_without_weights_is_not_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPHUMAN_BENCH_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    err = stopped_before_any_image(capsys, monkeypatch, tmp_path, "--metrics", "id_sim_facenet")
    assert "--metrics: id_sim_facenet: missing weights" in err


def test_wrong_weights_path_stops_the_run_first(tmp_path, monkeypatch, capsys):
    err = stopped_before_any_image(capsys, monkeypatch, tmp_path, "--weights", f"facenet_vggface2={tmp_path / 'nonexistent.pt'}")
    assert "nonexistent.pt: --weights facenet_vggface2 not found" in err


def test_corrupt_weights_file_stops_the_run_first(tmp_path, monkeypatch, capsys):
    junk = tmp_path / "facenet.pt"
    junk.write_bytes(b"<html>404 Not Found</html>")
    err = stopped_before_any_image(capsys, monkeypatch, tmp_path, "--weights", f"facenet_vggface2={junk}")
    assert "facenet.pt: cannot read --weights facenet_vggface2" in err


def test_truncated_safetensors_is_found_before_generation(tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "clip.safetensors"
    save_file({"w": torch.zeros(256, 256)}, str(path))
    path.write_bytes(path.read_bytes()[:4000])
    from caphuman_bench import weights

    try:
        weights.verify_file(path, "a weights file")
    except Exception as exc:  # BenchError, one line naming the file
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("a truncated safetensors file passed")
