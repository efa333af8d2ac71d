"""`pip install .` gives the same tool as the editable install: the wheel carries every card, both specs
and the paper file, and its `caphuman-bench` lists every card when run away from the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from caphuman_bench.cards import DEFAULT_CARDS_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the checkout gets no build/ folder)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "caphuman_bench", source / "caphuman_bench", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
                   check=True, capture_output=True)
    (found,) = out.glob("caphuman_bench-*.whl")
    return found


@pytest.mark.slow
def test_wheel_carries_cards_specs_and_paper_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    cards = {f"caphuman_bench/method_cards/{p.name}" for p in DEFAULT_CARDS_DIR.glob("*.yaml")}
    assert len(cards) >= 22 and cards <= names
    for spec in ("humaniphc", "fastcomposer"):
        for part in ("VERSION", "identities.csv", "prompts.yaml", "splits.yaml", "head_conditions.yaml"):
            assert f"caphuman_bench/benchmark_data/{spec}/{part}" in names
    assert "caphuman_bench/benchmark_data/paper_results.yaml" in names
    assert "caphuman_bench/weights_manifest.yaml" in names


@pytest.mark.slow
def test_installed_wheel_lists_every_card(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import caphuman_bench, json; from caphuman_bench.cards import all_cards; "
            "print(caphuman_bench.__file__); print(json.dumps(sorted(all_cards())))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    where, names = done.stdout.splitlines()
    assert where.startswith(str(site))  # the installed copy, not the checkout
    assert len(json.loads(names)) == len(list(DEFAULT_CARDS_DIR.glob("*.yaml")))
