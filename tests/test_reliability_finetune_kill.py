"""Issue 22: `finetune` killed with SIGKILL resumes to the weights an uninterrupted one makes, and leaves no
temp file behind, for each recipe (tiny SD-1.5, the smoke preset's few steps, the demo split's 2 identities).

The child process kills itself at the instant the issue found worst: the second identity's weights are
written in full to their temp file and about to be renamed over the artefact (or its record is).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from caphuman_bench.cards import get_card
from caphuman_bench.finetune.artefacts import ARTEFACT_FILES, RECORD_FILE, ArtefactStore
from caphuman_bench.registry import get_method
from tests.cli_helpers import cli

REPO = Path(__file__).resolve().parents[1]
IDENTITIES = ("nasa-astronaut", "grace-hopper")
# Runs `caphuman-bench ARGS` and SIGKILLs itself at the K-th rename onto a file named NAME.
KILLED_AT_RENAME = """
import os, signal, sys
name, k, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_replace, seen = os.replace, []
def replace(src, dst, *rest, **kwargs):
    if os.path.basename(str(dst)) == name:
        seen.append(dst)
        if len(seen) == k:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *rest, **kwargs)
os.replace = replace
sys.argv = ["caphuman-bench", *args]
from caphuman_bench.cli import main
main()
"""


def finetune_args(recipe: str, runs: Path) -> list[str]:
    return ["finetune", "--method", recipe, "--preset", "smoke", "--runs-dir", str(runs), "--device", "cpu"]


def store_of(recipe: str, runs: Path) -> ArtefactStore:
    card = get_card(recipe)
    return ArtefactStore(runs, recipe, get_method(card.adapter).validated_params(card, "smoke", {}))


def leftovers(root: Path) -> list[Path]:
    """Anything under the store that is not an identity's artefact or record (temp files, temp folders);
    DreamBooth's class images (prior preservation) are a cache of the store, checked for temp files too."""
    keep = {*ARTEFACT_FILES.values(), RECORD_FILE}
    found = [p for p in root.rglob("*") if "class_images" not in p.relative_to(root).parts
             and (p.is_file() and p.name not in keep or p.is_dir() and p.parent != root)]
    return found + [p for p in root.rglob("class_images/**/*") if p.is_file() and p.suffix not in (".jpg", ".json")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Path]:
    """Per recipe, the runs folder of one `finetune` that ran to its end (made on first use, kept for the module)."""
    return {recipe: tmp_path_factory.mktemp(f"uninterrupted-{recipe}") for recipe in ARTEFACT_FILES}


@pytest.mark.parametrize("recipe, killed_at", [("textual_inversion", "artefact"), ("dreambooth", "artefact"),
                                               ("lora", "artefact"), ("lora", "record")])
def test_finetune_killed_at_a_save_resumes_to_identical_weights_and_no_temp_file(recipe, killed_at, uninterrupted,
                                                                                  tmp_path, capsys, monkeypatch):
    name = ARTEFACT_FILES[recipe] if killed_at == "artefact" else RECORD_FILE
    runs = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}  # the threads of this process: the same sums
    child = subprocess.run([sys.executable, "-c", KILLED_AT_RENAME, name, "2", *finetune_args(recipe, runs)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr  # killed, not finished
    store = store_of(recipe, runs)
    assert [p for p in store.root.rglob("*.tmp")], "the kill left no temp file: it hit the wrong instant"

    code, _, err = cli(capsys, monkeypatch, *finetune_args(recipe, runs))
    assert code == 0 and "trained 1, kept 1, failed 0" in err, err
    assert leftovers(store.root) == []

    reference = uninterrupted[recipe]
    code, _, err = cli(capsys, monkeypatch, *finetune_args(recipe, reference))
    assert code == 0 and ("trained 2" in err or "kept 2" in err), err
    for identity_id in IDENTITIES:
        assert store.file(identity_id).read_bytes() == store_of(recipe, reference).file(identity_id).read_bytes(), identity_id
        assert store.verify(identity_id, *_reference(identity_id), full=True)[0] is not None


def _reference(identity_id: str) -> tuple[str, str]:
    from caphuman_bench.benchmark import Benchmark

    bench = Benchmark.load()
    return bench.reference_sha256(identity_id), bench.identities[identity_id].subject
