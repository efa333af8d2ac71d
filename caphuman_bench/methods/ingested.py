"""`ingested`: images made elsewhere, one per task, read from a folder (`caphuman-bench ingest`).

Most leaderboard entries are generated in their authors' own code base. `caphuman-bench plan --export`
gives them the task list (ids, prompts, seeds, reference photos, head conditions); their images, named
`<task_id>.png` (or .jpg/.jpeg/.webp), come back through this adapter into an ordinary run directory, so
`score`, `report` and `compare` treat them like any other run. The folder is checked whole before the
run folder is made (`check_image_folder`: missing, extra, duplicate, unreadable, wrong size), and the
hash of its content joins the run's configuration: changed images are a new run, never mixed in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.images import ImageError, load_rgb
from caphuman_bench.methods.base import GenerationRequest, MethodAdapter
from caphuman_bench.registry import register_method
from caphuman_bench.tasks import Task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _shown(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def image_files(folder: Path) -> dict[str, Path]:
    """task id → its image; two images of one task id (a.png and a.jpg) are an error."""
    if not folder.is_dir():
        raise BenchError(f"{folder}: not a folder of images")
    found: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                duplicates.append(f"{found[path.stem].name} and {path.name}")
            found[path.stem] = path
    if duplicates:
        raise BenchError(f"{folder}: two images for one task: {_shown(duplicates)}")
    return found


def check_image_folder(folder: Path, tasks: list[Task], size: tuple[int, int] | None) -> tuple[int, int]:
    """Every planned task has exactly one readable image of one size (`size` = (width, height), or the
    first image's); nothing else is there. Returns the size. One error names what is wrong and where."""
    found = image_files(folder)
    planned = [t.task_id for t in tasks]
    missing = [t for t in planned if t not in found]
    if missing:
        raise BenchError(f"{folder}: {len(missing)} of {len(planned)} planned tasks have no image, e.g. {_shown(missing)} "
                         f"(`caphuman-bench plan --export` lists the task ids; name each image <task_id>.png)")
    extra = sorted(set(found) - set(planned))
    if extra:
        raise BenchError(f"{folder}: {len(extra)} image(s) match no task of this split: {_shown(extra)}")
    wrong = []
    for task_id in planned:
        try:
            with Image.open(found[task_id]) as image:
                image.verify()
            with Image.open(found[task_id]) as image:
                size = size or image.size
                if image.size != size:
                    wrong.append(f"{found[task_id].name} is {image.size[0]}x{image.size[1]}")
        except Exception as exc:  # PIL raises many types on junk
            raise BenchError(f"{found[task_id]}: not a readable image ({type(exc).__name__}: {exc})") from None
    if wrong:
        raise BenchError(f"{folder}: every image must be {size[0]}x{size[1]}: {_shown(wrong)}")
    return size


def folder_digest(folder: Path) -> str:
    """sha256 over the image files' names and contents: what the run's images are made of."""
    digest = hashlib.sha256()
    for task_id, path in sorted(image_files(folder).items()):
        digest.update(f"{path.name}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@register_method("ingested")
class IngestedImages(MethodAdapter):
    param_types = {**MethodAdapter.param_types, "images_dir": str}

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        if not params.get("images_dir"):
            raise BenchError(f"{where}: parameter 'images_dir' names the folder of images")

    @classmethod
    def artefacts(cls, card, params, bench, identity_ids, runs_dir) -> dict[str, dict]:
        folder = Path(params["images_dir"]).resolve()
        return {"images": {"path": str(folder), "sha256": folder_digest(folder)}}

    def load(self) -> None:
        self.files = image_files(Path(self.params["images_dir"]))

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        images = []
        for request in requests:
            try:
                images.append(load_rgb(self.files[request.task_id]))
            except (KeyError, ImageError, OSError) as exc:
                raise BenchError(f"{self.params['images_dir']}: image of task {request.task_id}: {exc}") from None
        return images
