"""CurricularFace's IR-101 face recogniser (Huang et al., CVPR 2020), the checkpoint PuLID and ConsisID score with.

Architecture transcribed from the authors' `backbone/model_irse.py` (HuangYG123/CurricularFace, IR_101 =
`Backbone([112, 112], 100, 'ir')`): a 3×3 stem (conv, BN, PReLU), 49 improved-residual units in four
stages of 3 / 13 / 30 / 3 units (64, 128, 256, 512 channels, the first unit of each stage strided),
each unit BN → conv3×3 → PReLU → conv3×3(stride) → BN plus a shortcut (identity max-pool, or conv1×1 + BN
where the width changes), then BN2d → dropout → flatten → Linear(512·7·7, 512) → BN1d without affine.
Module names follow the original, so `glint360k_curricular_face_r101_backbone.bin` (ConsisID's
`face_encoder/`, a plain state dict) loads strictly. No maintained package ships this network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from caphuman_bench.errors import BenchError
from caphuman_bench.weights import load_torch_file, tensor_state_dict

IR101_STAGES = ((64, 3), (128, 13), (256, 30), (512, 3))  # (channels, units) per stage


class ImprovedResidual(nn.Module):
    """`bottleneck_IR`: res = BN, conv3×3, PReLU, conv3×3(stride), BN; out = res + shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        if in_channels == channels:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False), nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """IR-101 on 112 × 112 RGB in [-1, 1]; returns the 512-d embedding (not normalised)."""

    def __init__(self, stages=None, embedding_size: int = 512) -> None:
        super().__init__()
        stages = stages or IR101_STAGES
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units, in_channels = [], 64
        for channels, count in stages:
            units += [ImprovedResidual(in_channels, channels, 2)] + [ImprovedResidual(channels, channels, 1) for _ in range(count - 1)]
            in_channels = channels
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(in_channels), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(in_channels * 7 * 7, embedding_size),
                                          nn.BatchNorm1d(embedding_size, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def load_curricularface(path: str | Path, stages=None) -> IRBackbone:
    """The IR-101 at `path`, strictly (a missing, unexpected or mis-shaped key is named)."""
    model = IRBackbone(stages)
    what = "the CurricularFace IR-101 weights"
    state = tensor_state_dict(load_torch_file(path, what), path, what)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BenchError(f"{path}: not an IR-101 CurricularFace state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise BenchError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()
