"""Methods, metrics and cards from outside this package: entry points and `--include` folders.

As Python packaging and lm-evaluation-harness's `--include_path` do it. A package declares

    [project.entry-points."caphuman_bench.methods"]
    my_method = "my_package.my_method"      # a module; importing it runs @register_method

(and `caphuman_bench.metrics` for @register_metric); the YAML cards in the directory of a method
module are found beside it. A folder given with `caphuman-bench --include PATH` (or
$CAPHUMAN_BENCH_INCLUDE, folders separated by os.pathsep) is read the same way: each of its `*.py`
files is imported, each `*.yaml` is a method card. Its code runs because the user named the folder.
$CAPHUMAN_BENCH_CARDS adds folders of cards alone. Every outside module is recorded with its sha256
in `run.json` (`plugins`), so a number names the code that made it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from caphuman_bench.errors import BenchError

ENTRY_POINT_GROUPS = ("caphuman_bench.methods", "caphuman_bench.metrics")
INCLUDE_ENV = "CAPHUMAN_BENCH_INCLUDE"
CARDS_ENV = "CAPHUMAN_BENCH_CARDS"


@dataclass(frozen=True)
class OutsideModule:
    module: str
    source: str  # "entry point <group>: <name> (<distribution> <version>)" or "--include <folder>"
    file: str
    sha256: str
    is_method: bool  # its folder may hold cards


def _folders(env: str) -> list[Path]:
    folders = []
    for raw in os.environ.get(env, "").split(os.pathsep):
        if raw.strip():
            folder = Path(raw.strip()).expanduser()
            if not folder.is_dir():
                raise BenchError(f"{folder}: not a folder (from ${env} or --include)")
            folders.append(folder.resolve())
    return folders


def add_include(folders: list[Path]) -> None:
    """`--include`: folders read for methods, metrics and cards, also by the processes this one starts."""
    for folder in folders:
        if not Path(folder).is_dir():
            raise BenchError(f"--include {folder}: not a folder")
    known = [p for p in os.environ.get(INCLUDE_ENV, "").split(os.pathsep) if p]
    os.environ[INCLUDE_ENV] = os.pathsep.join(known + [str(Path(f).resolve()) for f in folders])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_error(what: str, exc: BaseException) -> BenchError:
    return BenchError(f"{what}: could not be imported: {type(exc).__name__}: {exc}")


def _entry_point_modules() -> list[OutsideModule]:
    found = []
    for group in ENTRY_POINT_GROUPS:
        for entry in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
            dist = f"{entry.dist.name} {entry.dist.version}" if entry.dist else "unknown distribution"
            source = f"entry point {group}: {entry.name} ({dist})"
            try:
                module = importlib.import_module(entry.module)
            except Exception as exc:  # a broken plugin is the user's to fix: name it in one line
                raise _import_error(source, exc) from None
            file = Path(module.__file__ or "")
            found.append(OutsideModule(module.__name__, source, str(file), _sha256(file) if file.is_file() else "",
                                       group.endswith("methods")))
    return found


def _include_modules() -> list[OutsideModule]:
    found = []
    for folder in _folders(INCLUDE_ENV):
        for path in sorted(folder.glob("*.py")):
            digest = _sha256(path)
            name = f"caphuman_bench_include.{path.stem}_{digest[:12]}"
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception as exc:
                    del sys.modules[name]
                    raise _import_error(str(path), exc) from None
            found.append(OutsideModule(name, f"--include {folder}", str(path), digest, True))
    return found


_loaded: dict[str, list[OutsideModule]] = {}


def outside_modules() -> list[OutsideModule]:
    """Import (once per set of include folders) every entry-point and `--include` module."""
    key = os.environ.get(INCLUDE_ENV, "")
    if key not in _loaded:
        _loaded[key] = _entry_point_modules() + _include_modules()
    return _loaded[key]


def outside_card_folders() -> list[Path]:
    """Folders of cards beyond the package's own: beside method modules, --include, $CAPHUMAN_BENCH_CARDS."""
    folders = [Path(m.file).parent for m in outside_modules() if m.is_method and m.file]
    folders += _folders(CARDS_ENV)
    return list(dict.fromkeys(f.resolve() for f in folders))


def provenance() -> list[dict]:
    return [asdict(m) for m in outside_modules()]


def outside_code_sha256(module_name: str) -> str | None:
    """sha256 of an outside module's file (None for this package's own code, which git_state covers)."""
    return next((m.sha256 for m in outside_modules() if m.module == module_name), None)
