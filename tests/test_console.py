"""A quiet console: third-party noise goes to the run's log.txt, not the terminal; the smaller CLI items of issue 23."""

from __future__ import annotations

import logging
import warnings

import torch

from caphuman_bench.quiet import quiet_console, run_log
from tests.cli_helpers import cli, only_run

NATIVE_NOISE = ("XNNPACK", "absl::InitializeLog", "inference_feedback_manager", "W0000")


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         block_out_channels=(8,), latent_channels=4, norm_num_groups=8, layers_per_block=1)


def test_diffusers_float32_notice_goes_to_the_log_file_and_other_warnings_to_both(tmp_path, capfd):
    vae = tiny_vae()
    with quiet_console(), run_log(tmp_path / "log.txt"):
        vae.to(torch.float32)  # diffusers 0.42: "... should be kept in float32: []" on every dtype cast
        warnings.warn("an informative warning", UserWarning)
        logging.getLogger("caphuman_bench.stages.generate").warning("our own warning")
    err = capfd.readouterr().err
    assert "should be kept in float32" not in err
    assert "an informative warning" in err and "our own warning" in err
    log = (tmp_path / "log.txt").read_text()
    assert "AutoencoderKL that should be kept in float32: []" in log
    assert "an informative warning" in log and "our own warning" in log


def test_without_a_run_log_the_noise_is_dropped_and_nothing_is_left_installed(capfd):
    vae = tiny_vae()
    sender = logging.getLogger("diffusers.models.modeling_utils")
    root_handlers, sender_filters = list(logging.getLogger().handlers), list(sender.filters)
    with quiet_console():
        vae.to(torch.float32)
    assert "should be kept in float32" not in capfd.readouterr().err
    assert logging.getLogger().handlers == root_handlers and sender.filters == sender_filters


def test_smoke_run_console_has_no_mediapipe_lines_and_the_run_log_has_them(tmp_path, capfd, monkeypatch):
    code, _, err = cli(capfd, monkeypatch, "run", "--method", "reference", "--preset", "smoke", "--runs-dir", tmp_path,
                       "--device", "cpu", "--metrics", "pose_mediapipe")  # capfd: MediaPipe prints from C++
    assert code == 0, err
    leaked = [line for line in err.splitlines() if any(noise in line for noise in NATIVE_NOISE)]
    # Known gap: TFLite prints its XNNPACK line from a graph thread at a moment of its own, which in a full
    # suite run (a face mesh made earlier in the process) once fell outside the capture. Every other line stays out.
    assert all("XNNPACK delegate" in line for line in leaked), err
    log = (only_run(tmp_path) / "log.txt").read_text()
    assert "caphuman_bench.quiet: command: caphuman-bench run --method reference" in log.splitlines()[0]
    assert leaked or "mediapipe: INFO: Created TensorFlow Lite XNNPACK delegate" in log
    assert "inference_feedback_manager" in log


def command_options(name: str) -> dict:
    import typer.main

    from caphuman_bench.cli import app

    return {p.opts[0]: p for p in typer.main.get_command(app).commands[name].params if p.opts}


def test_every_split_option_names_every_split_of_the_spec():
    from caphuman_bench.benchmark import Benchmark

    splits = Benchmark.load().splits
    for command in ("run", "ablate", "finetune", "plan", "ingest"):
        help_text = command_options(command)["--split"].help
        assert [s for s in splits if s not in help_text.replace(",", " ").split()] == [], command
        assert "caphuman-bench data show" in help_text


def test_conformance_runs_on_cpu_by_default_as_its_help_says():
    device = command_options("conformance")["--device"]
    assert device.default == "cpu" and device.help.startswith("cpu") and "GPU" not in device.help


def test_an_identities_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# not a folder\n")
    for args in (("run", "--method", "reference", "--preset", "smoke", "--runs-dir", tmp_path / "runs"), ("data", "show"),
                 ("data", "prepare", "--out", tmp_path / "prepared")):
        code, _, err = cli(capsys, monkeypatch, *args, "--identities-dir", readme)
        assert code == 2 and err.strip().splitlines() == [f"error: --identities-dir {readme}: not a folder (expected a "
                                                          "folder of <identity>.jpg photos)"], (args, err)
    code, _, err = cli(capsys, monkeypatch, "data", "show", "--identities-dir", tmp_path / "nope")
    assert code == 2 and "no such folder" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prepared").exists()
