"""Reading images defensively: every odd file becomes RGB uint8 or an `ImageError` with a reason.

Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted; truncated or
non-image files, images under 32 px and images over 8192 px a side get a reason instead of a crash.
Writing is atomic (temp file + rename), so an interrupted run never leaves a half-written PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from caphuman_bench.atomic import atomic_write

MIN_SIDE = 32
MAX_SIDE = 8192


class ImageError(ValueError):
    """An image that cannot be scored; the message is the per-item reason."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → RGB. 16-bit and float images are rescaled from their full range."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-12)
        return Image.fromarray((arr * 255 + 0.5).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def check_size(img: Image.Image) -> None:
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"image too small ({w}x{h}, need at least {MIN_SIDE} px a side)")
    if max(w, h) > MAX_SIDE:
        raise ImageError(f"image too large ({w}x{h}, at most {MAX_SIDE} px a side)")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert to RGB; raise ImageError with the reason otherwise."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"file not found: {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if max(w, h) > MAX_SIDE:  # refuse before decoding a huge bitmap
                raise ImageError(f"image too large ({w}x{h}, at most {MAX_SIDE} px a side)")
            img.load()
            rgb = to_rgb(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"unreadable image ({type(exc).__name__}: {exc})") from None
    check_size(rgb)
    return rgb


def save_png_atomic(img: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG through a temp file in the same folder and rename it into place."""
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))
