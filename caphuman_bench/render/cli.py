"""`caphuman-bench render`: draw what CapHuman would be conditioned on, as PNGs for people to look at.

Writes `<condition>/normal.png`, `albedo.png`, `rendered.png` for each requested condition and `grid.png`:
one row per requested condition (in the order given) × three columns (normal, albedo, rendered),
each tile labelled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.errors import BenchError
from caphuman_bench.images import save_png_atomic
from caphuman_bench.render.head_condition import (
    DEFAULT_MODE,
    HeadConditionRenderer,
    HeadRender,
    check_code,
    neutral_identity_code,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def to_images(render: HeadRender) -> dict[str, Image.Image]:
    """The three renders as RGB images: normals mapped (n + 1) / 2 (black outside the head), the others clipped to [0, 1]."""
    arrays = {"normal": (render.normal + 1) / 2 * render.mask, "albedo": render.albedo, "rendered": render.rendered}
    return {name: Image.fromarray((np.clip(a, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))
            for name, a in arrays.items()}


def _grid(rows: list[tuple[str, dict[str, Image.Image]]]) -> Image.Image:
    size = next(iter(rows[0][1].values())).width
    grid = Image.new("RGB", (3 * size, len(rows) * size))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=max(12, size // 24))
    for r, (condition_id, images) in enumerate(rows):
        for c, (name, image) in enumerate(images.items()):
            grid.paste(image, (c * size, r * size))
            draw.text((c * size + 8, r * size + 6), f"{condition_id}: {name}", fill=(255, 255, 255), font=font)
    return grid


def load_identity_code(identity: str | None, bench: Benchmark, device: str, reconstructor: str = "deca",
                       weight_paths: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """`identity`: None or 'mean' (FLAME's mean head), a saved DECA code (.npz / .json with shape, tex,
    exp, pose, cam, light), or a photo — a benchmark identity id or an image path — read by `reconstructor`."""
    if identity in (None, "mean"):
        return neutral_identity_code()
    path = Path(identity)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return check_code(dict(npz), str(path))
        except (OSError, ValueError) as exc:
            raise BenchError(f"{path}: not a readable DECA code .npz ({exc})") from None
    if path.suffix == ".json":
        try:
            return check_code(json.loads(path.read_text()), str(path))
        except (OSError, ValueError) as exc:
            raise BenchError(f"{path}: not a readable DECA code .json ({exc})") from None
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from caphuman_bench.images import ImageError, load_rgb

        try:
            photo = load_rgb(path)
        except (ImageError, OSError) as exc:
            raise BenchError(f"{path}: {exc}") from None
    elif identity in bench.identities:
        photo = bench.reference_image(identity)
    else:
        raise BenchError(f"--identity {identity!r}: not 'mean', a .npz/.json DECA code, an image file or an identity of {bench.root}")
    return _encode_photo(photo, str(identity), device, reconstructor, weight_paths or {})


def _encode_photo(photo: Image.Image, name: str, device: str, reconstructor: str, weight_paths: dict[str, str]) -> dict[str, np.ndarray]:
    """The photo's FLAME code by the named reconstructor: DECA's `bbox` square of MTCNN's face where it takes
    DECA's crop, its own crop otherwise. A group it does not estimate (SMIRK: light) is FLAME's neutral one."""
    from caphuman_bench.models.deca_encoder import box_square, deca_crops, mtcnn_box_detector
    from caphuman_bench.models.reconstructors import checked_code, reconstructor_class
    from caphuman_bench.weights import resolve

    model_class = reconstructor_class(reconstructor)
    model = model_class.from_weights({w: resolve(w, weight_paths.get(w)) for w in model_class.info.weights}, device)
    if model_class.info.crop == "deca":
        box = mtcnn_box_detector(device)(photo)
        code = None if box is None else model.encode_crops(deca_crops([photo], [box_square(box)]))[0]
    else:
        (code,) = model.encode_images([photo])
    if code is None:
        raise BenchError(f"identity {name}: {reconstructor} found no face in the photo")
    return {**neutral_identity_code(), **checked_code(code, f"{reconstructor} code of {name}")}


def render_command(condition_ids: list[str], out_dir: str | os.PathLike, identity: str | None = None,
                   synthetic: bool = False, mode: str = DEFAULT_MODE, size: int = 512, device: str | None = None,
                   spec_root: str | os.PathLike | None = None, identities_dir: str | os.PathLike | None = None,
                   weight_paths: dict[str, str] | None = None, seed: int = 0, reconstructor: str = "deca") -> dict[str, Path]:
    """Render `identity` under each condition and write the PNGs; return {"<condition>/<render>" or "grid": path}.

    `synthetic` uses the synthetic FLAME-format head (no FLAME files needed); otherwise the FLAME
    files resolve through the weights manifest (`weight_paths` overrides by manifest id).
    """
    bench = Benchmark.load(spec_root, identities_dir)
    unknown = [c for c in condition_ids if c not in bench.conditions]
    if unknown or not condition_ids:
        raise BenchError(f"{bench.root / 'head_conditions.yaml'}: unknown condition(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(bench.conditions)}")
    device = device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    renderer = (HeadConditionRenderer.synthetic(device, seed) if synthetic
                else HeadConditionRenderer.from_weights(device, weight_paths))
    code = load_identity_code(identity, bench, device, reconstructor, weight_paths)

    requested = list(dict.fromkeys(condition_ids))
    renders = renderer.render_batch(code, [bench.conditions[c] for c in requested], mode, size)
    rows = [(r.condition_id, to_images(r)) for r in renders]

    out_dir = Path(out_dir)
    written = {}
    for condition_id, images in rows:
        for name, image in images.items():
            written[f"{condition_id}/{name}"] = out_dir / condition_id / f"{name}.png"
            save_png_atomic(image, written[f"{condition_id}/{name}"])
    written["grid"] = out_dir / "grid.png"
    save_png_atomic(_grid(rows), written["grid"])
    return written
