"""Face diversity: mean LPIPS between the faces of the samples of one (identity, prompt).

PhotoMaker (Li et al., CVPR 2024, §4.1 "Face Diversity") reports the LPIPS distance between the
detected face regions of the images generated for one prompt; its evaluation code is not released,
so the settings here are ours and written into the convention: faces are the shared MTCNN crops
the identity metrics score (160 × 160, the most confident face), LPIPS is torchmetrics'
implementation (`_LPIPS`, AlexNet backbone and the LPIPS v0.1 linear layers that ship in the
torchmetrics wheel) with the AlexNet backbone weights loaded from the weights resolver
(torchvision's `alexnet-owt-7be5be79.pth`), because torchvision's own download is not reachable.

An image's row holds the mean LPIPS between its face and the faces of the other finished samples of
its group, so the mean over images is the mean pairwise distance when every image has a face.
Groups (scoring option `diversity_groups`): by default one identity × prompt × head condition — the
images that differ only by their seed, as PhotoMaker measures diversity (one identity and prompt,
different seeds); a split with one sample per condition leaves every image alone (NaN). With
`identity-prompt` the group spans the head conditions too, so a method that follows the head
conditions scores as diverse for that alone. Higher is more diverse; a method that pastes the
reference face scores near 0. An image without a face gets `no_face` (NaN); one alone in its group is NaN.
A row is rescored when its own image changes; regenerating a sibling alone does not rescore it
(`score --force --metrics face_diversity` does).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch

from caphuman_bench.errors import BenchError
from caphuman_bench.faces.detection import DETECTOR_CONVENTION, aligned_crops_160, detect_faces, mtcnn_weights_dir
from caphuman_bench.images import ImageError, load_rgb
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreContext, ScoreItem
from caphuman_bench.registry import register_metric
from caphuman_bench.weights import load_torch_file

_LPIPS_NETS: dict[tuple[str, str], torch.nn.Module] = {}
# scoring option `diversity_groups`: which other samples an image is compared with
DIVERSITY_GROUPS = {
    "identity-prompt-condition": "the other samples (seeds) of the same identity, prompt and head condition",
    "identity-prompt": "the other samples of the same identity and prompt, across all head conditions",
}
DEFAULT_DIVERSITY_GROUPS = "identity-prompt-condition"


def lpips_alex(alexnet_path: str | Path, device: str) -> torch.nn.Module:
    """torchmetrics' LPIPS (AlexNet, v0.1 linear layers) with the backbone from a torchvision AlexNet file.

    The file is a state dict of `torchvision.models.alexnet` (the classifier's keys may be absent);
    every `features.*` tensor must be there with its shape, or the error names the key.
    """
    from torchmetrics.functional.image.lpips import _LPIPS

    key = (str(Path(alexnet_path).resolve()), str(device))
    if key not in _LPIPS_NETS:
        net = _LPIPS(pretrained=True, net="alex", pnet_rand=True)  # linear layers: torchmetrics' packaged file
        state = load_torch_file(alexnet_path, "the AlexNet backbone of LPIPS")
        slices = {name.removeprefix("features."): tensor for name, tensor in state.items() if name.startswith("features.")}
        targets = {}
        for slice_name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
            for param_name, param in getattr(net.net, slice_name).named_parameters():
                targets[param_name] = param
        for name, param in targets.items():
            if name not in slices:
                raise BenchError(f"{alexnet_path}: AlexNet key 'features.{name}' missing")
            if tuple(slices[name].shape) != tuple(param.shape):
                raise BenchError(f"{alexnet_path}: AlexNet key 'features.{name}' has shape {tuple(slices[name].shape)}, "
                                 f"expected {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(slices[name])
        _LPIPS_NETS[key] = net.eval().to(device)
    return _LPIPS_NETS[key]


@register_metric("face_diversity", higher_is_better=True, weights=("mtcnn", "lpips_alexnet"))
class FaceDiversity(BenchMetric):
    """Mean LPIPS (AlexNet) between an image's face and the faces of the other samples of its group
    (identity × prompt × head condition by default; option `diversity_groups`)."""

    convention: ClassVar[dict] = {
        "value": "LPIPS (torchmetrics _LPIPS, AlexNet, LPIPS v0.1 linear layers), mean over the other finished samples "
        "of the image's group; mean over images = mean pairwise distance (PhotoMaker's face diversity)",
        "faces": "MTCNN 160 x 160 crops of the most confident face, (pixel - 127.5) / 128 as LPIPS's [-1, 1] input",
        "groups": f"scoring option diversity_groups (default {DEFAULT_DIVERSITY_GROUPS}): "
                  + "; ".join(f"{name}: {text}" for name, text in DIVERSITY_GROUPS.items())
                  + "; PhotoMaker compares images of one identity and prompt made from different seeds",
        "no_face": "an image without a face is not scored (no_face, NaN); siblings without a face are left out",
        **DETECTOR_CONVENTION,
    }

    def __init__(self, context: ScoreContext | None = None) -> None:
        super().__init__(context)
        self.groups = self.option("diversity_groups", DEFAULT_DIVERSITY_GROUPS)
        if self.groups not in DIVERSITY_GROUPS:
            raise BenchError(f"scoring option 'diversity_groups': {self.groups!r} is not one of {', '.join(DIVERSITY_GROUPS)}")

    def _faces(self, images) -> list[torch.Tensor | None]:
        return aligned_crops_160(images, detect_faces(images, self.device_name, mtcnn_weights_dir(self.context.weights)))

    def _sibling_faces(self, item: ScoreItem) -> list[torch.Tensor]:
        images = []
        for _, condition, path in item.siblings:
            if self.groups == "identity-prompt-condition" and condition != item.condition_id:
                continue
            try:
                images.append(load_rgb(path))
            except ImageError:
                continue  # an unreadable sibling has its own row saying so
        return [face for face in self._faces(images) if face is not None]

    @torch.inference_mode()
    def measure(self, items: list[ScoreItem]) -> list[ItemScore]:
        net = lpips_alex(self.context.weights["lpips_alexnet"], self.device_name)
        rows = []
        for item, face in zip(items, self._faces([item.image for item in items])):
            if face is None:
                rows.append(ItemScore({self.metric_name: math.nan}, "no_face", "no face detected"))
                continue
            others = self._sibling_faces(item)
            if not others:
                rows.append(ItemScore({self.metric_name: math.nan}, "ok", f"no other sample of its group ({self.groups}) has a face",
                                      {"pairs": 0}))
                continue
            batch = torch.stack(others).to(self.device_name)
            distances = net(face[None].to(self.device_name).expand_as(batch), batch).flatten()
            rows.append(ItemScore({self.metric_name: float(distances.mean())}, "ok", "", {"pairs": len(others)}))
        return rows
