"""FAN (2DFAN-4), the 68-point face-alignment network of the `face_alignment` package, for random-weight archives.

Read from github.com/1adrianb/face-alignment `face_alignment/models.py` (`FAN`, `HourGlass`, `ConvBlock`) and
`api.py` (1.4.x: `FaceAlignment` loads `2DFAN4-cd938726ad.zip` with `torch.jit.load`, `NetworkSize.LARGE` = 4
stacks, and calls the archive as `net(inp)` on a [1, 3, 256, 256] crop in [0, 1], taking one tensor back). Their
defaults, kept here:

- stem: conv 7 × 7 stride 2 (3 → 64, with bias), batch norm, ReLU; ConvBlock 64 → 128; max-pool 2;
  ConvBlock 128 → 128; ConvBlock 128 → 256 — 256 px in, 64 × 64 features.
- `ConvBlock(in, out)`: pre-activation (BN, ReLU, 3 × 3 conv without bias) three times, to out/2, out/4 and
  out/4 channels, the three outputs concatenated, plus the input (through BN, ReLU, 1 × 1 conv when in ≠ out).
- `HourGlass(depth 4, 256 features)`, per level: upper branch ConvBlock `b1_<level>`; lower branch max-pool 2,
  ConvBlock `b2_<level>`, the next level (ConvBlock `b2_plus_1` at the bottom), ConvBlock `b3_<level>`,
  nearest ×2 upsampling; the two branches summed.
- per stack i: hourglass `m<i>`, ConvBlock `top_m_<i>`, 1 × 1 conv `conv_last<i>`, BN `bn_end<i>`, ReLU,
  1 × 1 conv `l<i>` to 68 heatmaps; between stacks the next input is previous + `bl<i>`(features) +
  `al<i>`(heatmaps) (1 × 1 convs, with bias).
- output: the last stack's heatmaps [B, 68, 64, 64] (their `FAN.forward` lists every stack's; the released
  archive returns only the last, which is what `api.py` reads).

State-dict keys are theirs (`m0.b1_4.conv1.weight`, `top_m_0.bn1.running_var`, …), so the released
`2DFAN4-11f355bf06.pth.tar` state dict would load with `strict=True`. At the release's size (`width` 256,
4 stacks, depth 4) it has 23.8 M parameters (the real archive: 91 MB of float32). `width`, `stacks` and `depth`
only shrink it for tests. The forward pass looks sub-modules up by name, as theirs does, so archives are
written with `torch.jit.trace` (`fan_archive`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

FAN_POINTS = 68
FAN_INPUT = 256


class ConvBlock(nn.Module):
    """face_alignment's pre-activation block: three 3 × 3 convs (out/2, out/4, out/4) concatenated + input."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        half, quarter = out_planes // 2, out_planes // 4
        self.bn1, self.conv1 = nn.BatchNorm2d(in_planes), nn.Conv2d(in_planes, half, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(half), nn.Conv2d(half, quarter, 3, padding=1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(quarter), nn.Conv2d(quarter, quarter, 3, padding=1, bias=False)
        self.downsample = None
        if in_planes != out_planes:
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(True),
                                            nn.Conv2d(in_planes, out_planes, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat((out1, out2, out3), 1) + residual


class HourGlass(nn.Module):
    """face_alignment's hourglass: sub-modules `b1_<l>`, `b2_<l>`, `b3_<l>` for levels depth … 1, `b2_plus_1`."""

    def __init__(self, depth: int, features: int) -> None:
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):  # their registration order
            self.add_module(f"b1_{level}", ConvBlock(features, features))
            self.add_module(f"b2_{level}", ConvBlock(features, features))
            if level == 1:
                self.add_module("b2_plus_1", ConvBlock(features, features))
        for level in range(1, depth + 1):
            self.add_module(f"b3_{level}", ConvBlock(features, features))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = self._modules[f"b1_{level}"](x)
        lower = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        lower = self._level(level - 1, lower) if level > 1 else self._modules["b2_plus_1"](lower)
        lower = self._modules[f"b3_{level}"](lower)
        return upper + F.interpolate(lower, scale_factor=2.0, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FAN(nn.Module):
    """2DFAN: [B, 3, 256, 256] in [0, 1] → the last stack's 68 heatmaps [B, 68, 64, 64] (module docstring)."""

    def __init__(self, stacks: int = 4, depth: int = 4, width: int = 256, points: int = FAN_POINTS) -> None:
        super().__init__()
        self.stacks = stacks
        self.conv1 = nn.Conv2d(3, width // 4, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(width // 4)
        self.conv2 = ConvBlock(width // 4, width // 2)
        self.conv3 = ConvBlock(width // 2, width // 2)
        self.conv4 = ConvBlock(width // 2, width)
        for i in range(stacks):
            self.add_module(f"m{i}", HourGlass(depth, width))
            self.add_module(f"top_m_{i}", ConvBlock(width, width))
            self.add_module(f"conv_last{i}", nn.Conv2d(width, width, 1))
            self.add_module(f"l{i}", nn.Conv2d(width, points, 1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(width))
            if i < stacks - 1:
                self.add_module(f"bl{i}", nn.Conv2d(width, width, 1))
                self.add_module(f"al{i}", nn.Conv2d(points, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.conv4(self.conv3(F.max_pool2d(self.conv2(x), 2)))
        previous, heatmaps = x, x
        for i in range(self.stacks):
            features = self._modules[f"top_m_{i}"](self._modules[f"m{i}"](previous))
            features = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](features)))
            heatmaps = self._modules[f"l{i}"](features)
            if i < self.stacks - 1:
                previous = previous + self._modules[f"bl{i}"](features) + self._modules[f"al{i}"](heatmaps)
        return heatmaps


def fan_archive(net: FAN, path: str | os.PathLike) -> None:
    """`net` (eval mode, on the CPU) as a TorchScript archive at `path`, the format of face_alignment's release
    that `faces.landmarks.load_fan` reads; traced on one 256² input (the batch size stays free)."""
    net = net.eval().cpu()
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.zeros(1, 3, FAN_INPUT, FAN_INPUT), check_trace=False)
    torch.jit.save(traced, str(path))
