"""One resolver for every weights file: explicit path, $CAPHUMAN_BENCH_WEIGHTS, the Hugging Face cache,
or the installed package that ships it.

Nothing here downloads unless `fetch()` is called (the `weights fetch` command); tests run with
HF_HUB_OFFLINE=1 and never reach it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from caphuman_bench.errors import BenchError, MissingWeightsError

MANIFEST_PATH = Path(__file__).with_name("weights_manifest.yaml")
WEIGHTS_ENV = "CAPHUMAN_BENCH_WEIGHTS"


@dataclass(frozen=True)
class WeightsEntry:
    id: str
    file: str
    source: str
    licence: str
    size: str
    used_by: tuple[str, ...]
    hf_repo: str | None = None
    hf_file: str | None = None
    packaged: str | None = None
    sha256: str | None = None

    def describe_missing(self) -> str:
        return (
            f"missing weights {self.id!r}: file {self.file!r} not found (looked in explicit path, "
            f"${WEIGHTS_ENV}, Hugging Face cache{', installed package' if self.packaged else ''}). "
            f"Source: {self.source}. Licence: {self.licence}. Put it at ${WEIGHTS_ENV}/{self.file}."
        )


@lru_cache(maxsize=1)
def manifest() -> dict[str, WeightsEntry]:
    raw = yaml.safe_load(MANIFEST_PATH.read_text())
    entries = {}
    for key, row in raw.items():
        try:
            entries[key] = WeightsEntry(id=key, used_by=tuple(row.pop("used_by", ())), **row)
        except TypeError as exc:
            raise BenchError(f"{MANIFEST_PATH}: entry {key!r}: {exc}") from None
    return entries


def entry(weights_id: str) -> WeightsEntry:
    try:
        return manifest()[weights_id]
    except KeyError:
        raise BenchError(f"unknown weights id {weights_id!r}; known: {', '.join(manifest())}") from None


def _packaged_path(spec: str) -> Path | None:
    package, _, rel = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / rel
    return path if path.exists() else None


def _hf_cache_path(e: WeightsEntry) -> Path | None:
    if not (e.hf_repo and e.hf_file):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    hit = try_to_load_from_cache(repo_id=e.hf_repo, filename=e.hf_file)
    return Path(hit) if isinstance(hit, str) else None


def locate(weights_id: str, path: str | os.PathLike | None = None) -> Path | None:
    """Where the file is, or None. Never downloads."""
    e = entry(weights_id)
    if path is not None:
        p = Path(path).expanduser()
        return p if p.exists() else None
    root = os.environ.get(WEIGHTS_ENV)
    if root:
        for candidate in (Path(root) / e.file, Path(root) / weights_id / e.file):
            if candidate.exists():
                return candidate
    hit = _hf_cache_path(e)
    if hit is not None:
        return hit
    if e.packaged:
        return _packaged_path(e.packaged)
    return None


def resolve(weights_id: str, path: str | os.PathLike | None = None) -> Path:
    """The local path of a weights file; raise MissingWeightsError naming file, source and licence."""
    found = locate(weights_id, path)
    if found is None:
        e = entry(weights_id)
        where = f" (explicit path {path} does not exist)" if path is not None else ""
        raise MissingWeightsError(e.describe_missing() + where)
    return found


def require(weights_ids: list[str] | tuple[str, ...], overrides: dict[str, str] | None = None) -> dict[str, Path]:
    """Resolve all ids at once and report every missing one in one error, before any work starts."""
    overrides = overrides or {}
    missing, found = [], {}
    for wid in weights_ids:
        p = locate(wid, overrides.get(wid))
        if p is None:
            missing.append(entry(wid).describe_missing())
        else:
            found[wid] = p
    if missing:
        raise MissingWeightsError("\n".join(missing))
    return found


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".tar", ".ckpt")


def verify_file(path: str | os.PathLike, what: str) -> None:
    """Open a weights file as cheaply as its format allows, before hours of work depend on it: a
    safetensors header, a zip archive's directory (torch's format, .npz, .zip), a pickle's first byte;
    a folder (a diffusers repository) is read by its loader. Nothing is unpickled. One line names the file."""
    path = Path(path)
    if path.is_dir():
        return
    if not path.is_file():
        raise BenchError(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise BenchError(f"{path}: {what} is empty")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        load_safetensors(path, what, header_only=True)
        return
    try:
        if zipfile.is_zipfile(path):
            zipfile.ZipFile(path).close()
        elif suffix in (".npz", ".zip"):
            raise ValueError("not a zip archive (truncated?)")
        elif suffix in TORCH_SUFFIXES + (".pkl",):
            with open(path, "rb") as fh:
                if fh.read(1) != b"\x80":
                    raise ValueError("neither a zip archive (torch.save) nor a pickle")
    except Exception as exc:  # zipfile and our own checks fail on junk in their own ways
        raise BenchError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_torch_file(path: str | os.PathLike, what: str):
    """`torch.load(weights_only=True)` on the CPU: nothing but tensors and containers is unpickled,
    and a missing, foreign or corrupt file is one line naming the file and what it should be."""
    import pickle

    import torch

    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BenchError(f"{path}: {what} not found") from None
    except pickle.UnpicklingError:
        raise BenchError(f"{path}: cannot read {what}: not a file of tensors only (torch.load with weights_only=True refused it)") from None
    except Exception as exc:  # torch's readers fail on junk with KeyError, EOFError, RuntimeError, …
        raise BenchError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, dict):  # every weights file read here is a mapping of names to tensors (or to such mappings)
        raise BenchError(f"{path}: not {what}: it holds a {type(loaded).__name__}, not a mapping of named tensors")
    return loaded


def tensor_state_dict(loaded: dict, path: str | os.PathLike, what: str) -> dict:
    """`loaded` (or its 'state_dict' entry) checked to be a flat mapping of names to tensors."""
    import torch

    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BenchError(f"{path}: not {what}: not a mapping of names to tensors (nor one under 'state_dict')")
    return state


def load_safetensors(path: str | os.PathLike, what: str, *, header_only: bool = False):
    """A safetensors file's tensors on the CPU, or with `header_only` just their names (the header is
    read and checked against the file's size; no tensor is loaded). A missing, truncated or foreign
    file is one line naming the file and what it should be."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return list(fh.keys()) if header_only else {key: fh.get_tensor(key) for key in fh.keys()}
    except FileNotFoundError:
        raise BenchError(f"{path}: {what} not found") from None
    except Exception as exc:  # SafetensorError on a truncated or foreign file, OSError, …
        raise BenchError(f"{path}: cannot read {what} as safetensors ({type(exc).__name__}: {exc})") from None


_LOADED: dict[tuple, object] = {}


def load_once(kind: str, path: str | os.PathLike, device, build):
    """`build()`'s model, built once per process for this file as it is now (path, size, modification
    time) and device: a `run` generates and scores in one process, and both stages want DECA, FAN, …
    A load that fails is not kept."""
    path = Path(path)
    if not path.is_file():
        return build()  # the loader names the missing file
    stat = path.stat()
    key = (kind, str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(device))
    if key not in _LOADED:
        _LOADED[key] = build()
    return _LOADED[key]


def fetch(weights_id: str) -> Path:
    """Download a Hugging Face-hosted file into the HF cache (the only code path that downloads)."""
    e = entry(weights_id)
    if not (e.hf_repo and e.hf_file):
        raise BenchError(f"{weights_id!r} is not on the Hugging Face hub; get it from {e.source} ({e.licence})")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(hf_hub_download(repo_id=e.hf_repo, filename=e.hf_file))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as exc:  # no network, or HF_HUB_OFFLINE=1
        raise BenchError(f"{weights_id}: the Hugging Face hub cannot be reached ({type(exc).__name__}); fetch "
                         f"{e.hf_repo}/{e.hf_file} where there is network, or put it at ${WEIGHTS_ENV}/{e.file}") from None
    except HfHubHTTPError as exc:  # gated or missing repository: the hub's own words
        raise BenchError(f"{weights_id}: the hub refused {e.hf_repo}/{e.hf_file}: {str(exc).splitlines()[0]}") from None


_UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKMGT]B)\b")


def total_size(rows: list[dict]) -> str:
    """The sum of the manifest's human sizes ("6.9 GB", "about 97 MB", "2.7 GB (fp32 …)"): the first size each states."""
    total = 0.0
    for row in rows:
        found = _SIZE.search(str(row.get("size", "")))
        if found:
            total += float(found.group(1)) * _UNITS[found.group(2).upper()]
    return f"{total / 1e9:.1f} GB" if total >= 1e9 else f"{total / 1e6:.0f} MB"


def status_rows() -> list[dict]:
    rows = []
    for wid, e in manifest().items():
        p = locate(wid)
        rows.append({"id": wid, "file": e.file, "present": p is not None, "path": str(p) if p else "",
                     "used_by": ", ".join(e.used_by), "licence": e.licence, "source": e.source, "size": e.size})
    return rows
