"""Make the DECA known-answer vectors by running the authors' code on seeded random weights.

    PYTHONPATH=<caphuman-bench checkout> python make_vectors.py --authors-repo /path/to/yfeng95/DECA [--out DIR]

Runs where the authors' `decalib` imports (see README.md: torch, torchvision, yacs, scikit-image, scipy,
opencv); it is imported from `--authors-repo`. The weights are not stored: caphuman-bench's
`conformance.deca.deca_state_dict(seed)` draws them from a hash of seed, tensor name and position (no
library's random stream), so the conformance check rebuilds them bit for bit; their sha256 is stored.

What runs of the authors' code: `datasets.TestData` (the crop: from a landmark file next to the photo for
'kpt68', from the face detector's box for 'bbox'), the real `DECA(cfg, device='cpu')` with its
`ResnetEncoder`s and ResNet-50, loading a `deca_model.tar` written by caphuman-bench's `write_deca_model`
through its own `torch.load` + `copy_state_dict`, and `DECA.encode(images, use_detail=False)` (E_flame, then
`decompose_code`). Stubbed, because encoding never reaches them: the renderer (pytorch3d; `_setup_renderer`
reads FLAME's data files: replaced by a no-op), the FLAME and texture layers (need generic_model.pkl),
`tensor_cropper` (kornia), torchvision's ImageNet download (every trunk weight is overwritten), and the face
detector: `detectors.FAN` is replaced by one returning the case's box with MTCNN's type 'bbox' (FAN reports
'kpt68'; TestData's 'mtcnn' option is commented out upstream), so TestData's own bbox path runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from caphuman_bench.conformance.deca import deca_state_dict, write_deca_model
from caphuman_bench.conformance.emoca import weights_sha256

SEED = 20210801
# photo name, size (W, H)
PHOTOS = (("inside", (200, 240)), ("corner", (320, 256)))
# case name, photo, kind, box (left, top, right, bottom): per photo a landmark box and a detector box; on
# `inside` the squares are smaller than 224 (upsampled), on `corner` larger and past the photo's top-left
# corner (downsampled, zeros outside)
CASES = (
    ("inside_kpt68", "inside", "kpt68", (52.3, 71.8, 151.6, 178.2)),
    ("inside_bbox", "inside", "bbox", (47.9, 60.4, 156.2, 171.7)),
    ("corner_kpt68", "corner", "kpt68", (-31.5, -12.25, 170.4, 160.9)),
    ("corner_bbox", "corner", "bbox", (-20.6, -30.1, 180.3, 150.45)),
)
OUTPUTS = {"shape": "shape", "tex": "tex", "exp": "exp", "pose": "pose", "cam": "cam", "light": "light"}


def stub_module(name: str, **attributes) -> types.ModuleType:
    """A module whose every other attribute is `Stub`: constructible with anything, an nn.Module."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    module.__getattr__ = lambda attribute: Stub
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)
    return module


class Stub(torch.nn.Module):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__()


def import_authors(repo: Path):
    sys.path.insert(0, str(repo))
    stub_module("decalib.utils.renderer", set_rasterizer=lambda *args, **kwargs: None)
    stub_module("decalib.models.FLAME")
    stub_module("decalib.utils.tensor_cropper", transform_points=None)
    original_resnet50 = torchvision.models.resnet50
    torchvision.models.resnet50 = lambda pretrained=False, **kwargs: original_resnet50(weights=None)
    from decalib import deca
    from decalib.datasets import datasets
    from decalib.utils.config import cfg

    deca.DECA._setup_renderer = lambda self, model_cfg: None
    return types.SimpleNamespace(datasets=datasets, DECA=deca.DECA, cfg=cfg)


def synthetic_photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour blobs plus a little noise: a photo whose crop has structure everywhere."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(coarse).astype(np.int16) + rng.integers(-4, 5, (size[1], size[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def landmarks(box: tuple[float, float, float, float], seed: int) -> np.ndarray:
    """68 points spanning exactly `box` (only their extremes set DECA's square)."""
    left, top, right, bottom = box
    rng = np.random.default_rng(seed)
    points = np.column_stack([rng.uniform(left, right, 68), rng.uniform(top, bottom, 68)])
    points[:4] = [[left, (top + bottom) / 2], [right, top + 3.0], [left + 7.0, bottom], [(left + right) / 2, top]]
    return points


def authors_crop(authors, photo: Path, kind: str, box, points: np.ndarray | None, folder: Path) -> torch.Tensor:
    """TestData's item for one photo: its landmark file (kpt68) or the detector's box (bbox)."""
    folder.mkdir()
    image = folder / photo.name
    image.write_bytes(photo.read_bytes())
    if kind == "kpt68":
        np.savetxt(folder / f"{photo.stem}.txt", points, fmt="%.17g")  # TestData reads <image>.txt as the landmarks

    class BoxDetector:  # stands in for detectors.FAN; MTCNN.run's return value
        def run(self, pixels):
            return [box[0], box[1], box[2], box[3]], "bbox"

    authors.datasets.detectors.FAN = BoxDetector
    dataset = authors.datasets.TestData([str(image)], iscrop=True, crop_size=224, scale=1.25, face_detector="fan")
    return dataset[0]["image"].contiguous()


def authors_deca(authors, model_path: Path, state: dict[str, torch.Tensor]):
    """DECA as demos/demo_reconstruct.py builds it (default cfg, its pretrained_modelpath), on the CPU."""
    cfg = authors.cfg.clone()
    cfg.pretrained_modelpath = str(model_path)
    model = authors.DECA(config=cfg, device="cpu")
    loaded = model.E_flame.state_dict()
    if list(loaded) != list(state):
        raise SystemExit("DECA's E_flame has other keys than caphuman-bench's DecaEncoder")
    if not all(torch.equal(loaded[key], state[key]) for key in state):
        raise SystemExit("DECA's copy_state_dict did not load every E_flame tensor")
    return model


def commit_of(repo: Path, given: str | None) -> str:
    if given:
        return given
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", type=Path, required=True)
    parser.add_argument("--authors-commit", help="the commit, when the checkout is not a git work tree")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    torch.set_num_threads(2)
    authors = import_authors(args.authors_repo.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    for index, (name, size) in enumerate(PHOTOS):
        synthetic_photo(size, SEED + index).save(args.out / f"{name}.png")

    state = deca_state_dict(SEED)
    tensors, meta_cases = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for index, (name, photo, kind, box) in enumerate(CASES):
            case = {"name": name, "image": f"{photo}.png", "kind": kind, "tensors": f"case_{name}.safetensors"}
            points = None
            if kind == "kpt68":
                points = landmarks(box, SEED + index)
                case["landmarks"] = points.tolist()
            else:
                case["box"] = list(box)
            tensors[name] = {"crop": authors_crop(authors, args.out / f"{photo}.png", kind, box, points, scratch / name)}
            meta_cases.append(case)

        model = authors_deca(authors, write_deca_model(scratch / "deca_model.tar", state), state)
        with torch.no_grad():
            for case in meta_cases:  # one crop a call, as the demos run TestData's items
                codes = model.encode(tensors[case["name"]]["crop"][None], use_detail=False)
                for key in OUTPUTS:
                    tensors[case["name"]][key] = codes[key].float().contiguous()

    for case in meta_cases:
        save_file(tensors[case["name"]], str(args.out / case["tensors"]))
    versions = {name: importlib.metadata.version(name) for name in ("torch", "torchvision", "numpy", "scikit-image", "yacs")}
    meta = {
        "variant": "DECA E_flame (coarse encoder), seeded random weights",
        "authors": {"repo": "github.com/yfeng95/DECA", "commit": commit_of(args.authors_repo, args.authors_commit)},
        "environment": {"python": platform.python_version(), **versions},
        "seed": SEED, "weights_sha256": weights_sha256(state), "outputs": OUTPUTS, "cases": meta_cases,
    }
    (args.out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
