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
    assert not [line for line in err.splitlines() if any(noise in line for noise in NATIVE_NOISE)], err
    log = (only_run(tmp_path) / "log.txt").read_text()
    assert "mediapipe: INFO: Created TensorFlow Lite XNNPACK delegate" in log
    assert "inference_feedback_manager" in log
