"""Make the EMOCA v2 known-answer vectors by running the authors' code on seeded random weights.

    PYTHONPATH=<caphuman-bench checkout> python make_vectors.py --authors-repo /path/to/radekd91/emoca [--out DIR]

Runs where the authors' `gdl` package imports (see README.md: torch, torchvision, omegaconf, scikit-image,
scipy, opencv); it is imported from `--authors-repo`. The weights are not stored: caphuman-bench's
`emoca.random_state_dict(seed, head)` draws them from a hash of seed, tensor name and position (no
library's random stream), so the conformance check rebuilds them bit for bit; their sha256 is stored.

What runs of the authors' code: `ImageTestDataset.TestData` (crop from a landmark file, as it reads one
next to each image), `IO.locate_checkpoint(mode='best')` on a release folder written by caphuman-bench's
`emoca.write_release`, the real `DecaModule(cfg.model, ...)` of that folder's cfg.yaml with its `ExpDECA`,
`ResnetEncoder`s and ResNet-50, `load_state_dict(checkpoint['state_dict'], strict=False)` as
`load_from_checkpoint(strict=False)` does (no unexpected key allowed, no encoder key missing), and
`DecaModule.encode(batch, training=False)`. Stubbed, because encoding never reaches them: Lightning,
adabound, the loss networks, the FLAME and texture layers, the detail decoder, the renderer (its
`_setup_renderer` reads mask images: replaced by a no-op), face_alignment (FAN is never called when a
landmark file exists) and torchvision's ImageNet download (every trunk weight is overwritten).
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

from caphuman_bench.conformance.emoca import weights_sha256
from caphuman_bench.models.emoca import (
    STAGE,
    V2_HEAD,
    ExpressionHead,
    random_state_dict,
    release_checkpoint,
    write_release,
)

SEED = 20220424
HEADS = [ExpressionHead(False, False), ExpressionHead(False, True), ExpressionHead(True, False), ExpressionHead(True, True)]
# name, photo size (W, H), landmark box (left, top, right, bottom): a face inside the photo whose square is
# smaller than 224 (upsampled), and one past the photo's top-left corner whose square is larger (zeros outside)
CASES = (("inside", (200, 240), (52.3, 71.8, 151.6, 178.2)), ("corner", (320, 256), (-31.5, -12.25, 170.4, 160.9)))
OUTPUTS = {"shapecode": "shape", "texcode": "tex", "expcode": "exp", "posecode": "pose", "cam": "cam", "lightcode": "light"}
# keys the authors' constructors read that a release's cfg.yaml carries and encoding never uses
CONSTRUCTION = {"n_detail": 128, "uv_size": 256, "use_texture": False, "train_coarse": False}


def stub_module(name: str, **attributes) -> types.ModuleType:
    """A module whose every other attribute is `Stub`: constructible with anything, an nn.Module."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    module.__getattr__ = lambda attribute: Stub
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:  # `import a.b.c as x` looks c up on a.b
        setattr(importlib.import_module(parent), child, module)
    return module


class Stub(torch.nn.Module):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__()


def import_authors(repo: Path):
    sys.path.insert(0, str(repo))
    for name in ("adabound", "pytorch_lightning", "pytorch_lightning.loggers", "pytorch_lightning.plugins",
                 "pytorch_lightning.plugins.environments", "pytorch_lightning.plugins.environments.lightning_environment",
                 "gdl.layers.losses.EmoNetLoss", "gdl.layers.losses.DecaLosses", "gdl.layers.losses.MediaPipeLandmarkLosses",
                 "gdl.layers.losses.VGGLoss", "gdl.models.Renderer", "gdl.models.DecaDecoder", "gdl.models.DecaFLAME",
                 "gdl.models.EmotionMLP", "gdl.utils.DecaUtils", "gdl.utils.lightning_logging",
                 "gdl.datasets.AffWild2Dataset", "gdl.datasets.AffectNetDataModule"):
        stub_module(name)
    stub_module("face_alignment", LandmarksType=types.SimpleNamespace(_2D="2D"))
    stub_module("face_alignment.utils")
    original_resnet50 = torchvision.models.resnet50
    torchvision.models.resnet50 = lambda pretrained=False, **kwargs: original_resnet50(weights=None)
    import gdl.datasets.ImageTestDataset as image_test_dataset
    import gdl.models.DECA as deca
    import gdl.models.IO as io
    from omegaconf import OmegaConf

    deca.DECA._setup_renderer = lambda self: None
    return types.SimpleNamespace(deca=deca, io=io, TestData=image_test_dataset.TestData, OmegaConf=OmegaConf)


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


def authors_module(authors, folder: Path):
    """DecaModule as load_deca builds it from the folder's cfg.yaml (detail stage), weights as
    `load_from_checkpoint(strict=False)` loads them, after the authors' `locate_checkpoint` picks the file."""
    OmegaConf = authors.OmegaConf
    cfg = OmegaConf.load(folder / "cfg.yaml")[STAGE]
    cfg = OmegaConf.merge(cfg, {"model": CONSTRUCTION, "learning": {},
                                "inout": {"checkpoint_dir": str(folder / STAGE / "checkpoints")}})
    checkpoint = Path(authors.io.locate_checkpoint(cfg, mode="best"))
    if checkpoint != release_checkpoint(folder):
        raise SystemExit(f"the authors' locate_checkpoint picked {checkpoint}, caphuman-bench {release_checkpoint(folder)}")
    module = authors.deca.DecaModule(cfg.model, cfg.learning, cfg.inout, "testing")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or any(key.startswith(("deca.E_flame.", "deca.E_expression.")) for key in missing):
        raise SystemExit(f"the release layout does not fit DecaModule: unexpected {unexpected[:5]}, missing {missing[:5]}")
    module.eval()
    return module, checkpoint


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

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        photos, meta_cases = [], []
        for index, (name, size, box) in enumerate(CASES):
            points = landmarks(box, SEED + index)
            synthetic_photo(size, SEED + index).save(args.out / f"{name}.png")
            Image.open(args.out / f"{name}.png").save(scratch / f"{name}.png")
            np.savetxt(scratch / f"{name}.txt", points, fmt="%.17g")  # TestData reads <image>.txt as the landmarks
            photos.append(scratch / f"{name}.png")
            meta_cases.append({"name": name, "image": f"{name}.png", "landmarks": points.tolist(),
                               "tensors": f"case_{name}.safetensors"})
        dataset = authors.TestData([str(p) for p in photos], face_detector="fan")
        crops = {Path(path).stem: dataset[i]["image"] for i, path in enumerate(dataset.imagepath_list)}
        tensors = {case["name"]: {"crop": crops[case["name"]].contiguous()} for case in meta_cases}

        heads, checkpoint_name = {}, None
        for head in HEADS:
            state = random_state_dict(SEED, head)
            folder = scratch / f"EMOCA_{head}"
            write_release(folder, state, head)
            module, checkpoint = authors_module(authors, folder)
            checkpoint_name = str(checkpoint.relative_to(folder))
            heads[str(head)] = {"global_pose": head.global_pose, "jaw_pose": head.jaw_pose, "weights_sha256": weights_sha256(state)}
            with torch.no_grad():
                for case in meta_cases:  # one photo a call, as the demos run TestData's items
                    codes = module.encode({"image": tensors[case["name"]]["crop"][None]}, training=False)
                    for key in OUTPUTS:
                        tensors[case["name"]][f"{head}/{key}"] = codes[key].float().contiguous()
            print(f"{head}: done", flush=True)

    for case in meta_cases:
        save_file(tensors[case["name"]], str(args.out / case["tensors"]))
    versions = {name: importlib.metadata.version(name) for name in ("torch", "torchvision", "numpy", "scikit-image", "omegaconf")}
    meta = {
        "variant": "EMOCA v2 encoders (ExpDECA), seeded random weights",
        "authors": {"repo": "github.com/radekd91/emoca", "branch": "release/EMOCA_v2",
                    "commit": commit_of(args.authors_repo, args.authors_commit)},
        "environment": {"python": platform.python_version(), **versions},
        "seed": SEED, "release_head": str(V2_HEAD), "checkpoint": checkpoint_name,
        "heads": heads, "outputs": OUTPUTS, "cases": meta_cases,
    }
    (args.out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
