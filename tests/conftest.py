"""Test-wide guards: no network (HF offline, and a test fails if an internet socket connects); the fault
sweeps' tiny finished run (test_reliability.py, test_reliability_sweep2.py)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CAPHUMAN_BENCH_WEIGHTS", str(Path(__file__).parent / "data" / "no-weights-here"))

DATA = Path(__file__).parent / "data"


class NetworkAccessError(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real_connect = socket.socket.connect

    def guarded(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkAccessError(f"test tried to open a network connection to {address!r}")
        return real_connect(self, address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded)
    yield


@pytest.fixture
def data_dir() -> Path:
    return DATA


# --- the fault sweeps' tiny finished run (reference method, 1 identity x 1 prompt x 2 head conditions) ---
# The package is imported inside the fixtures: the offline environment above is set before it loads.


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    """The shipped spec with one more split, 'tiny': 2 tasks (fast enough to kill at every write)."""
    from caphuman_bench.benchmark import DEFAULT_SPEC_DIR

    root = tmp_path_factory.mktemp("spec") / "humaniphc"
    shutil.copytree(DEFAULT_SPEC_DIR, root)
    splits = yaml.safe_load((root / "splits.yaml").read_text())
    splits["splits"]["tiny"] = {"identities": ["nasa-astronaut"], "prompts": ["acc-red-hat"],
                                "conditions": ["frontal", "yaw-r20"], "samples": 1}
    (root / "splits.yaml").write_text(yaml.safe_dump(splits))
    return root


@pytest.fixture(scope="module")
def baseline(spec, tmp_path_factory) -> Path:
    from tests.reliability_helpers import invoke, run_args

    runs = tmp_path_factory.mktemp("baseline")
    code, _, err = invoke(*run_args(spec, runs))
    assert code == 0, err
    (run,) = list(runs.iterdir())
    return run


@pytest.fixture
def damaged(baseline, tmp_path) -> Path:
    """A private copy of the finished baseline run, to damage."""
    run = tmp_path / "runs" / baseline.name
    shutil.copytree(baseline, run)
    return run
