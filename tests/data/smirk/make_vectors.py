"""Known-answer vectors of SMIRK's encoder and test-time crop, made by the authors' own code.

    PYTHONPATH=. python tests/data/smirk/make_vectors.py --authors-repo /path/to/smirk

What is the authors' (github.com/georgeretsi/smirk, the commit in cases.json):
- `src/smirk_encoder.py`, imported from the checkout by its path: `SmirkEncoder()` (timm MobileNetV3
  trunks). Its `create_backbone` defaults to `pretrained=True` (an ImageNet download the checkpoint then
  overwrites); the default is set to False here, nothing else of the module is touched.
- `demo.py`'s `crop_face`, compiled from the checkout's source by name (demo.py itself cannot be imported:
  it imports pytorch3d's renderer and builds MediaPipe's FaceLandmarker from assets/face_landmarker.task).
- demo.py's `__main__` lines, transcribed in `authors_encoder` and `authors_photo_case` with their line
  numbers: the checkpoint's `smirk_encoder.` keys loaded (strict `load_state_dict`), the photo read as BGR
  (cv2.imread's order), `crop_face(image, kpt_mediapipe[..., :2], scale=1.4, image_size=224)`, skimage
  `warp(image, tform.inverse, output_shape=(224, 224), preserve_range=True).astype(np.uint8)`, BGR → RGB,
  `cv2.resize(…, (224, 224))`, `/ 255.0`, `smirk_encoder(cropped_image)`.

What is ours: the weights (`random_smirk_checkpoint(seed)` of caphuman_bench.models.smirk, so the test can
rebuild them: 3.7 M floats are too large to commit; their digest is stored) and the landmarks (our
MediaPipe face mesh, `faces/face_mesh.py`: the authors' landmarker model is a separate download) — both
inputs, the crop and the encoder outputs are the authors' code's.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
SEED = 4  # one whose eyelids and jaw have outputs on both sides of their clamps
CROP_CASES = ("noise", "astronaut_resized")
# Photos: skimage's astronaut (NASA, public domain) and a 200 × 240 region of it whose face sits at the
# top-left corner, so the crop square leaves the photo (zeros there).
PHOTO_CASES = {"astronaut": [0, 512, 0, 512], "astronaut_corner": [60, 260, 160, 400]}
OUTPUTS = ("pose_params", "cam", "shape_params", "expression_params", "eyelid_params", "jaw_params")


def authors_module(repo: Path, relative: str, name: str):
    spec = importlib.util.spec_from_file_location(name, repo / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def authors_crop_face(repo: Path):
    """demo.py's `crop_face`, compiled alone from the file's source with the names it uses."""
    from skimage.transform import estimate_transform

    tree = ast.parse((repo / "demo.py").read_text())
    (function,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "crop_face"]
    namespace = {"np": np, "estimate_transform": estimate_transform}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(repo / "demo.py"), "exec"), namespace)
    return namespace["crop_face"]


def authors_encoder(repo: Path, checkpoint_path: Path):
    encoder_module = authors_module(repo, "src/smirk_encoder.py", "smirk_encoder_authors")
    encoder_module.create_backbone.__defaults__ = (False,)  # no ImageNet download (overwritten by the checkpoint)
    smirk_encoder = encoder_module.SmirkEncoder()  # demo.py l. 54
    checkpoint = torch.load(checkpoint_path)  # l. 55
    checkpoint_encoder = {k.replace('smirk_encoder.', ''): v for k, v in checkpoint.items() if 'smirk_encoder' in k}  # l. 56
    smirk_encoder.load_state_dict(checkpoint_encoder)  # l. 58
    smirk_encoder.eval()  # l. 59
    return smirk_encoder


def run_encoder(smirk_encoder, rgb_crop: np.ndarray) -> dict[str, np.ndarray]:
    cropped_image = torch.tensor(rgb_crop).permute(2, 0, 1).unsqueeze(0).float() / 255.0  # l. 104
    with torch.no_grad():
        outputs = smirk_encoder(cropped_image)  # l. 107
    return {name: outputs[name][0].numpy().astype(np.float32) for name in OUTPUTS}


def authors_photo_case(crop_face, rgb_photo: np.ndarray, landmarks: np.ndarray):
    import cv2
    from skimage.transform import warp

    image = np.ascontiguousarray(rgb_photo[..., ::-1])  # cv2.imread's BGR (l. 78)
    kpt_mediapipe = landmarks[..., :2]  # l. 89
    tform = crop_face(image, kpt_mediapipe, scale=1.4, image_size=224)  # l. 91
    cropped_image = warp(image, tform.inverse, output_shape=(224, 224), preserve_range=True).astype(np.uint8)  # l. 93
    cropped_image = cv2.cvtColor(cropped_image, cv2.COLOR_BGR2RGB)  # l. 102
    cropped_image = cv2.resize(cropped_image, (224, 224))  # l. 103
    return tform.params, cropped_image


def crop_inputs() -> dict[str, np.ndarray]:
    """Two ready 224² RGB crops: uniform noise (seed 0) and the astronaut photo resized (PIL bicubic)."""
    from PIL import Image
    from skimage import data

    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(data.astronaut()).resize((224, 224), Image.BICUBIC))
    return {"noise": noise, "astronaut_resized": resized}


def photo(region: list[int]) -> np.ndarray:
    from skimage import data

    y0, y1, x0, x1 = region
    return np.ascontiguousarray(data.astronaut()[y0:y1, x0:x1])


def versions() -> dict[str, str]:
    import cv2
    import PIL
    import skimage
    import timm

    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "scikit-image": skimage.__version__, "opencv": cv2.__version__,
            "pillow": PIL.__version__, "threads": str(torch.get_num_threads())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", type=Path, required=True, help="a checkout of georgeretsi/smirk")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    from PIL import Image

    from caphuman_bench.faces.face_mesh import FaceMeshReader
    from caphuman_bench.models.smirk import random_smirk_checkpoint, state_digest

    torch.set_num_threads(2)
    commit = subprocess.run(["git", "-C", str(args.authors_repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    checkpoint = random_smirk_checkpoint(SEED)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint_path = Path(scratch) / "SMIRK_em1.pt"
        torch.save(checkpoint, checkpoint_path)
        smirk_encoder = authors_encoder(args.authors_repo, checkpoint_path)
    crop_face = authors_crop_face(args.authors_repo)

    tensors, cases = {}, []
    for name, crop in crop_inputs().items():
        tensors[f"{name}.crop"] = crop
        tensors.update({f"{name}.{k}": v for k, v in run_encoder(smirk_encoder, crop).items()})
        cases.append({"name": name, "kind": "crop"})
    reader = FaceMeshReader()
    for name, region in PHOTO_CASES.items():
        pixels = photo(region)
        landmarks = reader.pixel_landmarks(Image.fromarray(pixels))[:, :2]
        tform, crop = authors_photo_case(crop_face, pixels, landmarks)
        tensors.update({f"{name}.landmarks": landmarks, f"{name}.tform": tform, f"{name}.crop": crop})
        tensors.update({f"{name}.{k}": v for k, v in run_encoder(smirk_encoder, crop).items()})
        cases.append({"name": name, "kind": "photo", "photo": "skimage.data.astronaut()[y0:y1, x0:x1]",
                      "region": region, "photo_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                      "photo_shape": list(pixels.shape)})
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(args.out / "cases.safetensors"))
    meta = {"authors_repo": "github.com/georgeretsi/smirk", "commit": commit, "weights_seed": SEED,
            "weights_digest": state_digest(checkpoint), "outputs": list(OUTPUTS), "environment": versions(),
            "cases": cases}
    (args.out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(cases)} cases -> {args.out}")


if __name__ == "__main__":
    main()
