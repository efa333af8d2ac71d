"""Issue 11: a damaged run directory, a bad spec or weights file, a full disk: a clear answer (one
line, exit 2) or a correct recovery, never a traceback and never a wrong number.

Most tests copy one tiny finished run (conftest.py's `damaged`: reference method, 1 identity x 1 prompt
x 2 head conditions, scored with face_detection), damage it the way the issue reproduced, and run the CLI
in-process (reliability_helpers.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from caphuman_bench.atomic import remove_stale_temps
from caphuman_bench.benchmark import Benchmark
from caphuman_bench.errors import BenchError
from caphuman_bench.rundir import RunDir
from tests.reliability_helpers import METRICS, assert_one_line_error, invoke, run_args


def digests(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "images").glob("*.png"))}


def scores(run: Path) -> pd.DataFrame:
    df = pd.read_parquet(run / "scores.parquet")
    return df.sort_values(["task_id", "metric"]).reset_index(drop=True)


def same_results(run: Path, baseline: Path) -> None:
    assert digests(run) == digests(baseline)
    pd.testing.assert_frame_equal(scores(run), scores(baseline))
    got, want = (json.loads((r / "results.json").read_text()) for r in (run, baseline))
    assert (got["metrics"], got["images"]) == (want["metrics"], want["images"])


def status_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "status.jsonl").read_text().splitlines()]


# --- 1. a torn head-render cache is a miss ---------------------------------------------------------


def test_torn_head_render_cache_is_rendered_again_not_an_error(tmp_path):
    from caphuman_bench.render.head_condition import TARGET_FILE, HeadConditionRenderer, neutral_identity_code

    renderer = HeadConditionRenderer.synthetic("cpu")
    condition = Benchmark.load().conditions["frontal"]
    first = renderer.render_cached(neutral_identity_code(), condition, tmp_path, size=32)
    text = (tmp_path / TARGET_FILE).read_text()
    (tmp_path / TARGET_FILE).write_text(text[: len(text) // 2])  # killed half-way through the JSON
    again = renderer.render_cached(neutral_identity_code(), condition, tmp_path, size=32)
    np.testing.assert_array_equal(again.normal, first.normal)
    assert (tmp_path / TARGET_FILE).read_text() == text  # rewritten whole
    assert not list(tmp_path.glob("*.tmp*"))


# --- 2. a torn status line: dropped and cut, never glued to the next record -----------------------


def test_torn_status_line_is_redone_and_never_glued_to_the_next_record(damaged, baseline, spec):
    status = damaged / "status.jsonl"
    status.write_bytes(status.read_bytes()[:-15])  # the last record lost its end (kill, short write)
    run = RunDir(damaged)
    assert len(run.latest_status()) == 1 and run.dropped_status_lines == 1
    code, _, err = invoke(*run_args(spec, damaged.parent))
    assert code == 0, err
    assert "generated 1, kept 1" in err
    records = status_records(damaged)  # every line parses: the fragment was cut off
    assert [r["status"] for r in records] == ["ok", "ok"]
    same_results(damaged, baseline)


def test_a_short_write_of_a_status_line_is_an_error_not_a_torn_record(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:5]))  # full disk: 5 bytes written
    with pytest.raises(BenchError, match="status.jsonl: .*disk is full"):
        run.append_status("t1", "ok")
    monkeypatch.undo()
    run.append_status("t2", "ok")
    assert list(run.latest_status()) == ["t2"] and run.status_file.read_text().count("\n") == 1


# --- 3, 4. damaged or duplicated scores.parquet: detected, rebuilt by rescoring --------------------


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(2000))


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _wrong_schema(path: Path) -> None:
    pd.DataFrame({"a": [1, 2]}).to_parquet(path)


def _duplicated(path: Path) -> None:
    df = pd.read_parquet(path)
    pd.concat([df, df], ignore_index=True).to_parquet(path)


@pytest.mark.parametrize("damage", [_random_bytes, _truncated, _empty, _wrong_schema, _duplicated])
def test_damaged_scores_are_refused_by_report_and_rebuilt_by_score(damage, damaged, baseline, tmp_path):
    damage(damaged / "scores.parquet")
    assert_one_line_error(invoke("report", damaged, "--out", tmp_path / "board"), "scores.parquet", "rebuilds it")
    code, out, err = invoke("score", damaged, "--metrics", METRICS, "--device", "cpu")
    assert code == 0 and "Traceback" not in err, err
    same_results(damaged, baseline)  # n is 2 again, not 4; the same numbers


# --- 5. status and tasks lines that are not records ----------------------------------------------


@pytest.mark.parametrize("line, problem", [
    (b"null", "expected a JSON object, got NoneType"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'{"status": "ok"}', "'task_id'"),
    (b'{"task_id": "x", "status": "done"}', "'status'"),
    (b'{"task_id": "\xff\xfe"}', "not UTF-8"),
])
def test_bad_status_lines_are_one_line_errors_in_the_middle_and_dropped_at_the_end(line, problem, damaged, spec, tmp_path):
    status = damaged / "status.jsonl"
    good = status.read_bytes()
    first, rest = good.split(b"\n", 1)
    status.write_bytes(first + b"\n" + line + b"\n" + rest)
    for args in (run_args(spec, damaged.parent), ("score", damaged, "--metrics", METRICS, "--device", "cpu"),
                 ("report", damaged, "--out", tmp_path / "board")):
        assert_one_line_error(invoke(*args), "status.jsonl: line 2:", problem)
    status.write_bytes(good + line + b"\n")  # the same line at the end: dropped and counted
    run = RunDir(damaged)
    assert len(run.latest_status()) == 2 and run.dropped_status_lines == 1


def test_torn_or_empty_tasks_file_is_an_error_for_score_and_report_and_rewritten_by_run(damaged, baseline, spec, tmp_path):
    tasks = damaged / "tasks.jsonl"
    whole = tasks.read_bytes()
    for content, problem in ((whole[:-20], "line 2: not JSON"), (b"", "no tasks"), (b'{"task_id": 1}\n', "line 1: fields")):
        tasks.write_bytes(content)
        for args in (("score", damaged, "--metrics", METRICS, "--device", "cpu"), ("report", damaged, "--out", tmp_path / "b")):
            assert_one_line_error(invoke(*args), "tasks.jsonl", problem)
    code, _, err = invoke(*run_args(spec, damaged.parent))  # derived from run.json: rewritten
    assert code == 0, err
    assert tasks.read_bytes() == whole
    same_results(damaged, baseline)


def test_run_json_without_its_fields_is_a_one_line_error_and_rewritten_by_run(damaged, baseline, spec, tmp_path):
    (damaged / "run.json").write_text("[]")
    assert_one_line_error(invoke("report", damaged, "--out", tmp_path / "b"), "run.json", "JSON object")
    (damaged / "run.json").write_text('{"label": "x", "method": {}, "benchmark": {}, "config_hash": "y"}')
    assert_one_line_error(invoke("score", damaged), "run.json", "benchmark.name")
    (damaged / "run.json").write_text('{"label": ')
    code, _, err = invoke(*run_args(spec, damaged.parent))  # the folder name is the configuration's hash
    assert code == 0 and "generated 0, kept 2" in err, err
    assert json.loads((damaged / "run.json").read_text())["config_hash"] == json.loads((baseline / "run.json").read_text())["config_hash"]
    same_results(damaged, baseline)


# --- 6, 7. spec fields of the wrong type, non-finite angles, package photos ----------------------


def _edit_spec(spec: Path, tmp_path: Path, name: str, edit) -> Path:
    root = tmp_path / "spec"
    shutil.copytree(spec, root)
    (root / name).write_text(edit((root / name).read_text()))
    return root


@pytest.mark.parametrize("value", ["42", "null", "[a, b]"])
def test_prompt_text_that_is_not_a_string_is_one_line(value, spec, tmp_path):
    root = _edit_spec(spec, tmp_path, "prompts.yaml", lambda t: t.replace(
        'text: "a photo of {subject} wearing a red hat"', f"text: {value}", 1))
    assert root.joinpath("prompts.yaml").read_text() != spec.joinpath("prompts.yaml").read_text()
    assert_one_line_error(invoke("data", "show", "--spec", root), "prompts.yaml", "field 'text' must be a string")


@pytest.mark.parametrize("file", ["skimage:load", "skimage:download_all", "skimage:data_dir", "matplotlib:nothing.png"])
def test_package_photo_that_is_not_a_shipped_image_is_one_line(file, spec, tmp_path):
    root = _edit_spec(spec, tmp_path, "identities.csv", lambda t: t.replace("skimage:astronaut", file))
    result = invoke(*run_args(root, tmp_path / "runs"))
    assert_one_line_error(result, "nasa-astronaut", "field 'file'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("field, value", [("yaw", ".nan"), ("pitch", ".inf"), ("roll", "-.inf"), ("yaw", "abc"), ("pitch", "true")])
def test_non_finite_head_angles_are_refused(field, value, spec, tmp_path):
    def edit(text):
        data = yaml.safe_load(text)
        data["conditions"][0][field] = yaml.safe_load(value)
        return yaml.safe_dump(data)

    root = _edit_spec(spec, tmp_path, "head_conditions.yaml", edit)
    assert_one_line_error(invoke("data", "show", "--spec", root), "head_conditions.yaml", f"field '{field}' must be a finite number")


# --- 8. a metric that cannot run stops the pass; per-image errors are retried ------------------


def test_bad_metric_weights_file_stops_scoring_before_any_row(damaged, tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"not a dlib model")
    (damaged / "scores.parquet").unlink()
    result = invoke("score", damaged, "--metrics", "id_sim_dlib", "--device", "cpu", "--weights", f"dlib_face_recognition={junk}")
    assert_one_line_error(result, "metric id_sim_dlib cannot run")
    assert not (damaged / "scores.parquet").exists()


@pytest.mark.parametrize("args, needle", [
    (("--device", "bogus"), "--device 'bogus'"),
    (("--device", "cuda:7"), "--device 'cuda:7'"),
    (("--clip-model", "NoSuch"), "--clip-model 'NoSuch'"),
    (("--weights", "nosuchid=/x"), "unknown weights id 'nosuchid'"),
])
def test_bad_scoring_options_are_one_line_before_any_work(args, needle, damaged):
    before = (damaged / "scores.parquet").read_bytes()
    assert_one_line_error(invoke("score", damaged, "--metrics", METRICS, *args), needle)
    assert (damaged / "scores.parquet").read_bytes() == before


def test_an_image_that_fails_gets_an_error_row_alone_retried_next_pass(damaged, baseline, monkeypatch):
    from caphuman_bench.metrics.face_detection import FaceDetectionRate

    real = FaceDetectionRate.measure
    victim = sorted(p.stem for p in (damaged / "images").glob("*.png"))[0]

    def flaky(self, items):
        if any(item.task_id == victim for item in items):
            raise RuntimeError("out of memory on this image")
        return real(self, items)

    monkeypatch.setattr(FaceDetectionRate, "measure", flaky)
    code, _, err = invoke("score", damaged, "--metrics", METRICS, "--device", "cpu", "--force")
    assert code == 1 and "1 image(s) could not be scored" in err and "Traceback" not in err
    rows = scores(damaged)
    assert rows.set_index("task_id")["status"].to_dict() == {victim: "error", **{t: "ok" for t in rows["task_id"] if t != victim}}
    monkeypatch.undo()
    code, _, err = invoke("score", damaged, "--metrics", METRICS, "--device", "cpu")  # no --force: the error row is retried
    assert code == 0, err
    same_results(damaged, baseline)


def test_a_metric_failing_on_every_image_stops_the_pass(damaged, monkeypatch):
    from caphuman_bench.metrics.face_detection import FaceDetectionRate

    def broken(self, items):
        raise RuntimeError("Expected one of cpu, cuda device type")

    monkeypatch.setattr(FaceDetectionRate, "measure", broken)
    before = (damaged / "scores.parquet").read_bytes()
    assert_one_line_error(invoke("score", damaged, "--metrics", METRICS, "--device", "cpu", "--force"),
                          "metric face_detection cannot run", "Expected one of cpu")
    assert (damaged / "scores.parquet").read_bytes() == before


# --- 9. read-only folder, full disk ----------------------------------------------------------------


def test_full_disk_is_one_line_and_the_rerun_after_freeing_space_matches(damaged, baseline, spec, monkeypatch):
    for png in (damaged / "images").glob("*.png"):
        png.unlink()
    real_mkstemp = __import__("tempfile").mkstemp

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tempfile.mkstemp", full)
    line = assert_one_line_error(invoke(*run_args(spec, damaged.parent)), "No space left on device", "disk is full")
    assert ".png" in line  # names the file it could not write
    monkeypatch.setattr("tempfile.mkstemp", real_mkstemp)
    code, _, err = invoke(*run_args(spec, damaged.parent))
    assert code == 0, err
    same_results(damaged, baseline)


def test_read_only_runs_folder_is_one_line(spec, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert_one_line_error(invoke(*run_args(spec, tmp_path / "ro")), "Read-only file system", "--runs-dir")


def test_permission_denied_anywhere_else_is_still_one_line(damaged, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(damaged / "images"))

    monkeypatch.setattr("caphuman_bench.stages.score.sha256_of", denied)
    assert_one_line_error(invoke("score", damaged, "--metrics", METRICS, "--device", "cpu"), "images: Permission denied")


# --- 10. compare ----------------------------------------------------------------------------------


def _board(tmp_path: Path, name: str, rows) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"rows": rows}) if not isinstance(rows, str) else rows)
    return path


ROW = {"method": "m", "split": "s", "metric": "x", "mean": 0.5, "higher_is_better": True}


@pytest.mark.parametrize("new, needle", [
    ({**ROW, "mean": float("inf")}, "field 'mean' inf must be a finite number"),
    ({**ROW, "mean": "0.7"}, "field 'mean' '0.7'"),
    ({**ROW, "method": 3}, "field 'method' must be a string"),
    ({**ROW, "higher_is_better": "yes"}, "'higher_is_better'"),
    ("not a row", "rows[0]: expected an object"),
])
def test_compare_refuses_wrong_types_and_non_finite_numbers(new, needle, tmp_path):
    old = _board(tmp_path, "old.json", [ROW])
    assert_one_line_error(invoke("compare", old, _board(tmp_path, "new.json", [new])), "new.json", needle)


@pytest.mark.parametrize("text, needle", [
    ('{"rows": 5}', "field 'rows' must be a list"),
    ('{"metrics": 5, "method": "m"}', "not a results.json"),
    ('{"rows": [], ', "unreadable"),
])
def test_compare_refuses_a_wrong_structure(text, needle, tmp_path):
    old = _board(tmp_path, "old.json", [ROW])
    assert_one_line_error(invoke("compare", old, _board(tmp_path, "new.json", text)), needle)


# --- 11, 12. usage errors and option ranges ---------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (("run", "--bogus"), "No such option: --bogus"),
    (("nosuchcommand",), "No such command"),
    (("run", "--method", "reference", "--seed", "abc"), "'--seed'"),
    (("score", "x", "--batch-size", "0"), "--batch-size"),
    (("run", "--method", "reference", "--score-batch-size", "0"), "--score-batch-size"),
    (("run", "--method", "reference", "--score-batch-size", "-3"), "--score-batch-size"),
    (("compare", "a", "b", "--tolerance", "-1"), "--tolerance"),
    (("compare", "a", "b", "--tolerance", "nan"), "--tolerance"),
    (("compare", "a", "b", "--metric-tolerance", "x=abc"), "--metric-tolerance x='abc'"),
    (("run", "--method", "reference", "--weights", "nosuchid=/x"), "unknown weights id 'nosuchid'"),
])
def test_usage_errors_exit_2_with_one_line(args, needle, tmp_path):
    assert_one_line_error(invoke(*args), needle)


# --- extras ------------------------------------------------------------------------------------------


def test_report_only_reads_run_directories(damaged, tmp_path):
    (damaged / "results.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in damaged.rglob("*")}
    code, out, err = invoke("report", damaged, "--out", tmp_path / "board")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in damaged.rglob("*")} == before
    assert (tmp_path / "board" / "leaderboard.json").exists()


def test_written_files_are_readable_by_the_group_and_others(baseline):
    for path in baseline.rglob("*"):
        if path.is_file() and not path.name.endswith(".lock"):
            assert path.stat().st_mode & 0o044 == 0o044, path


def test_each_write_of_a_cache_entry_has_its_own_temp_file(tmp_path, monkeypatch):
    """Two processes writing one reference-feature entry must not share a temp file (one would
    rename the other's half-written file, the other would find its temp gone)."""
    from PIL import Image

    from caphuman_bench.metrics.base import ScoreContext
    from caphuman_bench.metrics.face_detection import FaceDetectionRate

    renamed, real_replace = [], os.replace

    def recording(src, dst, *args, **kwargs):
        renamed.append(Path(src).name)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", recording)
    image = Image.new("RGB", (8, 8))
    for _ in range(2):  # two writers of the same entry (each with an empty cache)
        metric = FaceDetectionRate(ScoreContext(cache_dir=tmp_path))
        metric.reference_features("someone", image, lambda im: np.ones(3), reference_sha256="x")
        (entry,) = list(tmp_path.rglob("*.npy"))
        np.testing.assert_array_equal(np.load(entry), np.ones(3))
        entry.unlink()
    assert len(renamed) == 2 and renamed[0] != renamed[1]


def test_temp_files_of_dead_processes_are_removed_at_start(damaged, spec):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace(".", "_")
    stale = damaged / "images" / f".x.png.{host}-{dead.stdout.strip()}.abc123.tmp"
    live = damaged / "images" / f".y.png.{host}-{os.getpid()}.def456.tmp"
    foreign = damaged / "images" / f".z.png.otherhost-{dead.stdout.strip()}.ghi789.tmp"
    for path in (stale, live, foreign):
        path.write_bytes(b"half")
    code, _, err = invoke(*run_args(spec, damaged.parent))
    assert code == 0, err
    assert not stale.exists() and live.exists() and foreign.exists()
    assert remove_stale_temps(damaged) == 0


# --- kill at every write point, then resume ------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: no handler in the code under test catches it."""


def kill_at_write(monkeypatch, root: Path, k: int) -> dict:
    """Count the writes under `root` (renames of atomic writes, appends of log lines) and raise
    Killed at the k-th: a rename never happens, an append stops half-way through its line."""
    state = {"writes": 0}
    real_replace, real_write = os.replace, os.write

    def ours(path) -> bool:
        return str(path).startswith(str(root))

    def replace(src, dst, *args, **kwargs):
        if ours(dst):
            state["writes"] += 1
            if state["writes"] == k:
                raise Killed(f"rename to {dst}")
        return real_replace(src, dst, *args, **kwargs)

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if ours(target):
            state["writes"] += 1
            if state["writes"] == k:
                real_write(fd, bytes(data)[: len(data) // 2])
                raise Killed(f"append to {target}")
        return real_write(fd, data)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "write", write)
    return state


def test_a_kill_at_every_write_point_resumes_to_the_same_bytes(baseline, spec, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        counted = kill_at_write(patch, tmp_path / "count", 0)
        assert invoke(*run_args(spec, tmp_path / "count"))[0] == 0
    writes = counted["writes"]
    assert writes >= 12  # run.json, tasks, 2 images + 2 status lines, scores, scoring, results, 3 leaderboards
    for k in range(1, writes + 1):
        runs = tmp_path / f"kill{k}"
        with monkeypatch.context() as patch:
            kill_at_write(patch, runs, k)
            with pytest.raises(Killed):
                invoke(*run_args(spec, runs))
        code, _, err = invoke(*run_args(spec, runs))
        assert code == 0, (k, err)
        (run,) = list(runs.iterdir())
        same_results(run, baseline)
        assert all(r["status"] == "ok" for r in status_records(run)), k


# --- two processes on one run directory ------------------------------------------------------------


def test_a_task_claimed_by_another_process_is_left_to_it(spec, tmp_path):
    runs = tmp_path / "runs"
    code, _, err = invoke(*run_args(spec, runs, "--no-score"))
    (run,) = list(runs.iterdir())
    first = sorted(status_records(run), key=lambda r: r["task_id"])[0]["task_id"]
    index = [t.task_id for t in RunDir(run).tasks()].index(first)
    (run / "images" / f"{first}.png").unlink()
    other = sorted(r["task_id"] for r in status_records(run))[1]
    (run / "images" / f"{other}.png").unlink()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom caphuman_bench.rundir import RunDir\n"
         f"with RunDir({str(run)!r}).claims() as c:\n    assert c.claim({index})\n    print('held', flush=True)\n"
         "    sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = invoke(*run_args(spec, runs, "--no-score"))
        assert code == 0 and "generated 1, kept 0 finished, failed 0 of 2 tasks" in err and "1 left to another process" in err, err
        assert not (run / "images" / f"{first}.png").exists()
    finally:
        holder.communicate("\n", timeout=60)
    code, _, err = invoke(*run_args(spec, runs, "--no-score"))
    assert code == 0 and "generated 1, kept 1" in err, err
    assert sorted(r["task_id"] for r in status_records(run)) == sorted([first, other, first, other])


@pytest.mark.slow
def test_the_same_command_twice_at_once_generates_each_task_once(tmp_path):
    args = [sys.executable, "-m", "caphuman_bench.cli", "run", "--method", "reference", "--preset", "smoke",
            "--runs-dir", str(tmp_path), "--no-score", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    (run,) = list(tmp_path.iterdir())
    records = status_records(run)
    assert len(records) == 12 and len({r["task_id"] for r in records}) == 12


def test_a_damaged_head_target_is_an_error_for_score_and_rebuilt_by_generate(tmp_path):
    from caphuman_bench.stages.generate import _stored_target

    run = RunDir(tmp_path)
    run.write_target("someone", "frontal", {"pose": np.zeros(6)})
    run.target_path("someone", "frontal").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(BenchError, match="someone__frontal.npz: damaged head-control target"):
        run.read_target("someone", "frontal")
    assert _stored_target(run, "someone", "frontal") is None  # generate: a miss, made again


@pytest.mark.parametrize("world, rank, message", [
    ("two", "0", "environment WORLD_SIZE 'two': expected a whole number written with the digits 0-9"),
    ("2", "5", r"process rank 5 is outside 0\.\.1 \(RANK/WORLD_SIZE"),
    ("2", "-1", "environment RANK '-1': expected a whole number written with the digits 0-9"),
])
def test_a_bad_torchrun_environment_is_one_line(world, rank, message, monkeypatch):
    from caphuman_bench.stages.plan import parse_shard

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(BenchError, match=message):
        parse_shard(None)
