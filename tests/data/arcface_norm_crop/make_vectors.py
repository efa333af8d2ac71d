"""Known-answer crops of insightface's `norm_crop` (ArcFace alignment), made by insightface's own code.

    python tests/data/arcface_norm_crop/make_vectors.py --authors-repo /path/to/insightface

Imports `python-package/insightface/utils/face_align.py` from the checkout by its path (not the
`insightface` package, whose __init__ needs its compiled extension), calls `norm_crop(image, landmarks,
image_size)` on a few images and landmark sets, and writes inputs and crops to `vectors.safetensors`
with the cases in `cases.json`. insightface passes BGR images; the warp treats channels alike, so the
RGB images here give the RGB crops our port returns.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent


def face_align(repo: Path):
    path = repo / "python-package" / "insightface" / "utils" / "face_align.py"
    spec = importlib.util.spec_from_file_location("insightface_face_align", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images() -> dict[str, np.ndarray]:
    """A photo (skimage's astronaut, 192²) and uniform noise (128 × 160): every pixel counts in a warp of noise."""
    from PIL import Image
    from skimage import data

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((192, 192), Image.BICUBIC))
    noise = np.random.default_rng(0).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    return {"photo": photo, "noise": noise}


def cases(template: np.ndarray) -> list[dict]:
    """(image, landmarks, dtype, sizes): frontal, rotated and scaled, off-centre, partly outside the image;
    float32 landmarks as insightface's SCRFD gives them, float64 as this project's MTCNN does."""
    rng = np.random.default_rng(1)
    out = []

    def placed(scale, degrees, offset):
        angle = np.deg2rad(degrees)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return (template.astype(np.float64) - 56.0) @ rotation.T * scale + np.array(offset)

    # the astronaut's face sits near (95, 62) in the 192² photo
    out.append(("photo", placed(0.62, 0.0, (95.0, 64.0)) + rng.normal(0, 0.7, (5, 2)), "float32", [112, 224, 128]))
    out.append(("photo", placed(0.55, 17.0, (92.0, 60.0)) + rng.normal(0, 0.7, (5, 2)), "float64", [112]))
    out.append(("photo", placed(1.3, -9.0, (150.0, 40.0)), "float32", [112]))  # partly outside: black border
    out.append(("noise", placed(0.9, 33.0, (80.0, 66.0)) + rng.normal(0, 0.5, (5, 2)), "float32", [112]))
    out.append(("noise", placed(0.41, -4.0, (70.0, 60.0)) + rng.normal(0, 0.5, (5, 2)), "float64", [112, 224]))
    return [{"image": image, "landmarks": points.astype(dtype), "sizes": sizes} for image, points, dtype, sizes in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", type=Path, required=True, help="a checkout of deepinsight/insightface")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    align = face_align(args.authors_repo)
    pictures = images()
    tensors = {f"image.{name}": pixels for name, pixels in pictures.items()}
    listed = []
    for index, case in enumerate(cases(np.asarray(align.arcface_dst))):
        tensors[f"case{index}.landmarks"] = case["landmarks"]
        for size in case["sizes"]:
            crop = align.norm_crop(pictures[case["image"]], case["landmarks"], image_size=size)
            tensors[f"case{index}.crop{size}"] = np.ascontiguousarray(crop)
        listed.append({"case": index, "image": case["image"], "landmarks_dtype": str(case["landmarks"].dtype),
                       "sizes": case["sizes"]})
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "vectors.safetensors"))
    (args.out / "cases.json").write_text(json.dumps(listed, indent=1) + "\n")
    print(f"{len(listed)} cases, {sum(len(c['sizes']) for c in listed)} crops -> {args.out}")


if __name__ == "__main__":
    main()
