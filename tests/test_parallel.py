"""The host pool (caphuman_bench/parallel.py): `thread_map(fn, items)` is `[fn(x) for x in items]`."""

from __future__ import annotations

import threading

import pytest

from caphuman_bench.errors import BenchError
from caphuman_bench.parallel import THREADS_ENV, host_threads, thread_map


def test_results_in_input_order_on_pool_threads():
    names = thread_map(lambda x: (x * x, threading.current_thread().name), range(50))
    assert [value for value, _ in names] == [x * x for x in range(50)]
    if host_threads() > 1:
        assert all(name.startswith("host") for _, name in names)


def test_first_exception_is_raised():
    def fail_on_seven(x):
        if x == 7:
            raise ValueError("seven")
        return x

    with pytest.raises(ValueError, match="seven"):
        thread_map(fail_on_seven, range(20))


def test_nested_calls_run_inline_instead_of_waiting_on_the_pool(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    outer = thread_map(lambda x: thread_map(lambda y: (x, y, threading.current_thread().name), range(3)), range(4))
    for x, inner in enumerate(outer):
        assert [(a, b) for a, b, _ in inner] == [(x, y) for y in range(3)]
        assert len({name for _, _, name in inner}) == 1  # all on the outer call's thread


def test_one_thread_runs_on_the_caller(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "1")
    assert {name for name in thread_map(lambda _: threading.current_thread().name, range(5))} == {threading.current_thread().name}


def test_bad_thread_count_names_the_variable(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(BenchError, match=THREADS_ENV):
        host_threads()


@pytest.mark.parametrize("processes, cores, expected", [(None, 16, 16), ("1", 16, 16), ("2", 16, 16), ("4", 16, 8), ("8", 16, 4),
                                                        ("16", 16, 2), ("4", 64, 32), ("abc", 16, 16)])
def test_processes_started_together_share_the_cores(monkeypatch, processes, cores, expected):
    """torchrun's LOCAL_WORLD_SIZE processes on one machine: twice each one's share of the cores, at least 2, at most 32."""
    import os

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert host_threads() == expected
