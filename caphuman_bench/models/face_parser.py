"""BiSeNet face parser (zllrunning/face-parsing.PyTorch) and CapHuman's face whitening.

The network is a port of `model.py` + `resnet.py` of github.com/zllrunning/face-parsing.PyTorch: a
ResNet-18 context path with two attention-refinement modules, the 1/8 ResNet feature standing in for
the spatial path (the original deleted `self.sp`), a feature-fusion module and three output heads,
19 CelebAMask-HQ classes. Module names follow the original exactly, so the released
`79999_iter.pth` loads with `load_state_dict` unchanged. The ResNet-18 trunk is the repo's own small
implementation; it is built here without the ImageNet weights the original downloads at
construction, because the released checkpoint overwrites all of them anyway.

`FaceParser.whiten` is CapHuman's `libs/face_parsing/face_parser.py::FaceParser.parse`: ImageNet
normalisation at the image's own resolution (the official code does not resize; its inputs are
512 x 512 aligned faces), argmax of the main head, and every pixel of the classes in
`WHITENED_CLASSES` set to white (255, 255, 255), leaving skin, brows, eyes, glasses, nose, mouth
and lips.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.weights import load_torch_file

# Label order of CelebAMask-HQ as trained in face-parsing.PyTorch (index = class id).
CELEBAMASK_CLASSES = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)
# CapHuman whitens these (face_parser.py and image_datasets.py: ids 0, 7, 8, 9, 14, 15, 16, 17, 18).
WHITENED_CLASSES = ("background", "l_ear", "r_ear", "ear_r", "neck", "neck_l", "cloth", "hair", "hat")
WHITENED_IDS = tuple(CELEBAMASK_CLASSES.index(name) for name in WHITENED_CLASSES)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_chan)
            )

    def forward(self, x):
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _basic_layer(in_chan: int, out_chan: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_chan, out_chan, stride), BasicBlock(out_chan, out_chan, 1))


class Resnet18(nn.Module):
    """The repo's ResNet-18 trunk: returns the 1/8, 1/16 and 1/32 features (no fc)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _basic_layer(64, 64, 1)
        self.layer2 = _basic_layer(64, 128, 2)
        self.layer3 = _basic_layer(128, 256, 2)
        self.layer4 = _basic_layer(256, 512, 2)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        avg_up = F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_up = F.interpolate(self.arm32(feat32) + avg_up, feat16.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(feat32_up)
        feat16_up = F.interpolate(self.arm16(feat16) + feat32_up, feat8.shape[2:], mode="nearest")
        feat16_up = self.conv_head16(feat16_up)
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet as in face-parsing.PyTorch; `forward` returns the main head's logits at input size.

    `conv_out16` / `conv_out32` are the training-time auxiliary heads: they are kept so that the
    released checkpoint loads strictly, and are not evaluated (the parser uses output [0] only).
    """

    def __init__(self, n_classes: int = len(CELEBAMASK_CLASSES)):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x):
        feat_res8, feat_cp8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat_res8, feat_cp8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


def load_bisenet_state_dict(model: BiSeNet, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly; a missing, unexpected or mis-shaped key is a BenchError naming it.

    `num_batches_tracked` counters are optional (they carry no weights and older saves lack them).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected key(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise BenchError(f"{source}: not a face-parsing.PyTorch BiSeNet state dict: {'; '.join(parts)}")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise BenchError(f"{source}: key {key!r} has shape {list(value.shape)}, expected {list(expected[key].shape)}")
    model.load_state_dict({**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state_dict})


class FaceParser(nn.Module):
    """BiSeNet + CapHuman's preprocessing: label maps and face-only ("whitened") references."""

    def __init__(self, net: BiSeNet | None = None):
        super().__init__()
        self.net = (net or BiSeNet()).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "FaceParser":
        """Load `79999_iter.pth` (a plain state dict, read with weights_only=True)."""
        path = Path(path)
        state_dict = load_torch_file(path, "face parser weights")
        net = BiSeNet()
        load_bisenet_state_dict(net, state_dict, str(path))
        return cls(net).to(device)

    @torch.no_grad()
    def parse(self, image: Image.Image) -> np.ndarray:
        """Class-id map [H, W] (uint8) of an RGB image, at the image's own resolution."""
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(self.mean.device)
        x = ((x - self.mean) / self.std).to(next(self.net.parameters()).dtype)
        return self.net(x)[0].argmax(0).to(torch.uint8).cpu().numpy()

    def whiten(self, image: Image.Image) -> Image.Image:
        """The reference with background, ears, earrings, neck, necklace, cloth, hair and hat made white."""
        labels = self.parse(image)
        out = np.asarray(image.convert("RGB")).copy()
        out[np.isin(labels, WHITENED_IDS)] = 255
        return Image.fromarray(out)
