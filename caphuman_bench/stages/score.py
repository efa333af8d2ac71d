"""Stage 3 — score: one row per finished image per metric family into `scores.parquet`.

Reads only the run directory (run.json, tasks, status, images, targets) and the benchmark spec it
names. Metrics whose weights are missing are skipped and named; an image that cannot be read gets a
per-item status. A metric that cannot run at all (a bad weights file, device or model name) stops
the pass before any row is written, naming the cause; a batch that fails is retried image by image,
and only the images that still fail get `error` rows, which the next pass retries.
Images are read (and their pixels hashed for the metrics' memos) by a thread pool one batch ahead,
while the metrics run on the current batch. Re-scoring is incremental: (task, metric) pairs already in the file are kept unless `force`.
scores.parquet is derived: a damaged one (unreadable, wrong schema, duplicate rows) is rebuilt by
rescoring, with a warning.
The pass computes in strict float32 (`numerics.strict_float32`: no TF32, no reduced-precision
reductions; a protocol's prescribed fp16 is kept and named), so a score does not depend on the GPU, the
batch or the shard; scoring.json records per family the device, dtype, TF32 state and batch size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd

from caphuman_bench import weights
from caphuman_bench.atomic import atomic_write, write_json_atomic
from caphuman_bench.benchmark import NEUTRAL_SUBJECT, Benchmark
from caphuman_bench.errors import BenchError
from caphuman_bench.faces.memo import image_digest
from caphuman_bench.images import ImageError, load_rgb
from caphuman_bench.methods.head_renders import target_sources
from caphuman_bench.metrics.base import BenchMetric, ItemScore, ScoreContext, ScoreItem
from caphuman_bench.metrics.protocol import scoring_protocol
from caphuman_bench.numerics import device_kind, device_label, strict_float32, tf32_state
from caphuman_bench.provenance import config_hash
from caphuman_bench.registry import all_metrics, get_metric
from caphuman_bench.rundir import RunDir
from caphuman_bench.stages.plan import Shard, Task
from caphuman_bench.weights import sha256_of

KEY_COLUMNS = ["task_id", "image_sha256", "scored_with", "identity_id", "prompt_id", "condition_id", "sample", "metric",
               "status", "reason", "extra"]
FLUSH_EVERY = 64  # items at least between two merges into scores.parquet
FLUSH_SHARE = 0.1  # ... and merges take at most this share of the pass: each rewrites the whole file
READ_THREADS = min(8, os.cpu_count() or 1)  # PNG decoding and hashing release the GIL
SWITCH_INTERVAL_S = 0.001  # the interpreter's GIL hand-over interval during a pass (Python's default: 0.005)
ROW_STATUSES = ("ok", "no_face", "unreadable", "error")
log = logging.getLogger(__name__)


class DamagedScores(BenchError):
    """scores.parquet cannot be trusted; `score` rebuilds it."""


@dataclass
class ScoreSummary:
    scored: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> reason (missing weights)
    errors: dict[str, int] = field(default_factory=dict)  # metric -> rows with status error this pass


def open_benchmark(run: RunDir) -> Benchmark:
    """The benchmark spec a run was planned with; refuses a spec that changed since."""
    spec = run.info()["benchmark"]
    bench = Benchmark.load_planned(spec, run.run_json)
    references = spec.get("reference_sha256") or {}
    if not isinstance(references, dict):
        raise BenchError(f"{run.run_json}: field 'benchmark.reference_sha256' must be a JSON object")
    for identity_id, digest in references.items():
        if bench.reference_sha256(identity_id) != digest:
            raise BenchError(f"identity {identity_id!r}: the reference photo changed since {run.run_json} was written "
                             f"(field 'benchmark.reference_sha256'); plan a new run")
    return bench


def select_metrics(names: list[str] | None, options: dict) -> tuple[dict[str, tuple[type, dict, dict]], dict[str, str]]:
    """Metric families whose weights resolve under these options — family → (class, weights found, the
    family's own options; `BenchMetric.families`) — and the reasons the others are skipped. A family the
    options name (`BenchMetric.named_families`, e.g. head_control by --head-reconstructor) joins `names`."""
    chosen = {name: get_metric(name) for name in names} if names else all_metrics()
    chosen |= {name: cls for name, cls in all_metrics().items() if cls.named_families(options)}
    overrides = options.get("weights_paths") or {}
    ready, skipped = {}, {}
    for cls in chosen.values():
        for family, family_options in cls.families(options).items():
            missing, found = [], {}
            for wid in cls.required_weights(family_options):
                path = weights.locate(wid, overrides.get(wid))
                if path is None:
                    missing.append(f"{weights.entry(wid).file} ({wid}: {weights.entry(wid).source})")
                else:
                    found[wid] = path
            if missing:
                skipped[family] = "missing weights: " + "; ".join(missing)
            else:
                ready[family] = (cls, found, family_options)
    return ready, skipped


def metrics_to_run(names: list[str] | None, options: dict) -> dict[str, tuple[type, dict, dict]]:
    """`select_metrics`, except that a family the user named (--metrics, --head-reconstructor) is never
    skipped: one error names each missing file."""
    ready, skipped = select_metrics(names, options)
    named = {family for cls in all_metrics().values() for family in cls.named_families(options)}
    by_option = {family: reason for family, reason in skipped.items() if family in named}
    if by_option:
        raise BenchError("--head-reconstructor: " + "; ".join(f"{family}: {reason}" for family, reason in by_option.items()))
    if names and skipped:
        raise BenchError("--metrics: " + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()))
    return ready


def score(run: RunDir, *, metrics: list[str] | None = None, device: str = "cpu", options: dict | None = None,
          shard: Shard = Shard(0, 1), force: bool = False, batch_size: int = 8, progress=None) -> ScoreSummary:
    with prompt_gil_handover(), strict_float32():
        return _score(run, metrics, device, options, shard, force, batch_size, progress)


@contextlib.contextmanager
def prompt_gil_handover():
    """The GIL switch interval at most SWITCH_INTERVAL_S inside the block, restored after it.

    The main thread launches GPU work between the reading and host-pool threads' Python steps; at
    Python's default 5 ms it waits up to 5 ms for the GIL at each hand-over. On an H200, passes of
    all families after the first: 66–67 images/s at 5 ms (2 or 4 reading threads), 67–73 at 1 ms
    (reports/perf/h200_2026-11-29_s2, _s3): a few per cent, not the 48 → 73 first reported."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _score(run: RunDir, metrics: list[str] | None, device: str, options: dict | None, shard: Shard, force: bool,
           batch_size: int, progress) -> ScoreSummary:
    run.require()
    run.remove_stale_temps()
    options = dict(options or {})
    scoring_protocol(options)  # an unknown protocol stops here, before any image is read
    bench = open_benchmark(run)
    ready, skipped = select_metrics(metrics, options)
    summary = ScoreSummary(skipped=skipped)
    finished = run.finished_ids()
    planned = run.tasks()
    all_finished = [t for t in planned if t.task_id in finished]
    tasks = [t for t in shard.select(planned) if t.task_id in finished]  # shards cut the plan, never what is done so far
    groups: dict[tuple[str, str], list[Task]] = {}
    for t in all_finished:  # (identity, prompt) groups across shards: what group metrics compare within
        groups.setdefault((t.identity_id, t.prompt_id), []).append(t)
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="score-read") as pool:
        digests = dict(zip((t.task_id for t in tasks), pool.map(sha256_of, [run.image_path(t.task_id) for t in tasks])))
        prompts = [p.fill(NEUTRAL_SUBJECT) for p in bench.prompts.values()]
        instances: dict[str, BenchMetric] = {}
        for name, (cls, found, family_options) in ready.items():
            context = ScoreContext(device=device, cache_dir=run.cache_dir / "metrics", options=family_options, weights=found,
                                   prompts=prompts)
            instances[name] = cls(context)
        numerics = {name: scoring_numerics(metric, batch_size) for name, metric in instances.items()}
        signatures = {name: scoring_signature(name, family_options, found, numerics[name])
                      for name, (_, found, family_options) in ready.items()}
        info = run.info()
        target_source = target_sources(info.get("params") or {}, info.get("head_inputs"))
        done = set() if force else _up_to_date(run, signatures, digests)

        todo = [t for t in tasks if any((t.task_id, name) not in done for name in instances)]
        bar = progress.add_task("score", total=len(todo)) if progress and todo else None
        flushes = _Flushes()
        proven: set[str] = set()  # metrics that scored at least one image this pass
        read = lambda t: _item(run, bench, t, groups[(t.identity_id, t.prompt_id)], target_source)  # noqa: E731
        for batch, items in _read_ahead([todo[i : i + batch_size] for i in range(0, len(todo), batch_size)], read, pool):
            for name, metric in instances.items():
                pairs = [(t, it) for t, it in zip(batch, items) if (t.task_id, name) not in done]
                if not pairs:
                    continue
                try:
                    rows = _measure(metric, [it for _, it in pairs])
                except BenchError as exc:
                    raise BenchError(_cannot_run(name, str(exc))) from None
                failures = [r.reason for r in rows if r.status == "error"]
                if name not in proven and failures and len(failures) == len(rows):
                    raise BenchError(_cannot_run(name, failures[0]))
                proven.add(name)
                flushes.add([_row(t, name, r, digests[t.task_id], signatures[name]) for (t, _), r in zip(pairs, rows)])
                summary.scored[name] = summary.scored.get(name, 0) + len(pairs)
                if failures:
                    summary.errors[name] = summary.errors.get(name, 0) + len(failures)
            flushes.items += len(batch)
            if flushes.due():
                flushes.merge(run)
            if bar is not None:
                progress.advance(bar, len(batch))
        flushes.merge(run)
    _record_scoring(run, {name: (family_options, found, signatures[name], numerics[name], instances[name].record())
                          for name, (_, found, family_options) in ready.items()}, skipped, kept_earlier=not force)
    return summary


def _read_ahead(chunks: list[list[Task]], read, pool: ThreadPoolExecutor):
    """(tasks, items) per chunk, the next chunk's items being read by `pool` meanwhile."""
    ahead = [pool.submit(read, t) for t in chunks[0]] if chunks else []
    for index, chunk in enumerate(chunks):
        current = ahead
        ahead = [pool.submit(read, t) for t in chunks[index + 1]] if index + 1 < len(chunks) else []
        yield chunk, [future.result() for future in current]


class _Flushes:
    """When to merge the pending rows into scores.parquet: after FLUSH_EVERY items at least, and once
    the pass has scored for (1 − FLUSH_SHARE) / FLUSH_SHARE times as long as the last merge took.
    Merging rewrites the whole file, so a fixed item count would make a 105,000-image pass quadratic;
    this way merges stay a tenth of the time and an interruption loses at most that much scoring."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.items = 0
        self.merge_seconds = 0.0
        self.last = time.monotonic()

    def add(self, rows: list[dict]) -> None:
        self.rows += rows

    def due(self) -> bool:
        waited = time.monotonic() - self.last
        return self.items >= FLUSH_EVERY and waited * FLUSH_SHARE >= self.merge_seconds * (1 - FLUSH_SHARE)

    def merge(self, run: RunDir) -> None:
        if self.rows:
            start = time.monotonic()
            _merge_scores(run, self.rows)
            self.last = time.monotonic()
            self.merge_seconds = self.last - start
        self.rows, self.items = [], 0


def _cannot_run(metric: str, cause: str) -> str:
    return (f"metric {metric} cannot run ({' '.join(cause.split())}); scoring stopped; fix the "
            f"cause (weights file, --device, model name) or leave it out with --metrics")


def _measure(metric: BenchMetric, items: list[ScoreItem]) -> list[ItemScore]:
    """The metric's rows for a batch; when the batch fails, each image on its own, so one bad
    image does not take its batch down. A BenchError (a cause the user must fix) is not caught."""
    try:
        metric.update(items)
        return metric.last_rows
    except BenchError:
        raise
    except Exception as exc:
        if len(items) == 1:
            return [_error_row(metric, exc)]
    rows = []
    for item in items:
        try:
            metric.update([item])
            rows.append(metric.last_rows[0])
        except BenchError:
            raise
        except Exception as exc:  # this image fails: an error row, retried by the next pass
            rows.append(_error_row(metric, exc))
    return rows


def _error_row(metric: BenchMetric, exc: Exception) -> ItemScore:
    return ItemScore({v: math.nan for v in metric.value_names}, "error", f"{type(exc).__name__}: {exc}")


def _item(run: RunDir, bench: Benchmark, task: Task, group: list[Task],
          target_source: tuple[str | None, tuple[str, ...]] = (None, ())) -> ScoreItem:
    try:
        image, error = load_rgb(run.image_path(task.task_id)), None
        image_digest(image)  # memoised for the metrics, computed here off the main thread
    except ImageError as exc:
        image, error = None, str(exc)
    target = run.read_target(task.identity_id, task.condition_id)
    if target is None:  # the method knows no target: the condition's own parameters (no shape)
        target, target_source = bench.conditions[task.condition_id].coefficients(), (None, ())
    return ScoreItem(
        task_id=task.task_id, identity_id=task.identity_id, prompt_id=task.prompt_id,
        condition_id=task.condition_id, sample=task.sample, image=image, image_error=error,
        reference=bench.reference_image(task.identity_id), reference_sha256=bench.reference_sha256(task.identity_id),
        references=tuple(photos) if len(photos := bench.reference_images(task.identity_id)) > 1 else (),
        prompt=bench.prompts[task.prompt_id].fill(NEUTRAL_SUBJECT), target=target,
        siblings=tuple((t.task_id, t.condition_id, run.image_path(t.task_id)) for t in group if t.task_id != task.task_id),
        subject_prompt=bench.prompts[task.prompt_id].fill(bench.identities[task.identity_id].subject),
        target_reconstructor=target_source[0], target_from_reference=target_source[1],
    )


def scoring_numerics(metric: BenchMetric, batch_size: int) -> dict:
    """What a family's rows are computed with: device (and GPU model), dtype, the TF32 state inside the
    pass, the batch size, and whatever the family adds (a protocol's fp16, a host library)."""
    found = metric.numerics()
    return {**found, "device": device_label(found["device"]), "tf32": tf32_state(), "batch_size": batch_size}


def scoring_signature(metric: str, options: dict, found_weights: dict, numerics: dict) -> str:
    """What a score depends on besides the image: the metric, the scoring options, its weights files
    and the arithmetic (device kind, dtype; not the batch size or the GPU model, which must not
    matter). A stored row is reused only while this and the image's sha256 are unchanged."""
    files = {wid: [str(path), path.stat().st_size] for wid, path in sorted(found_weights.items())}
    relevant = {k: v for k, v in options.items() if k != "weights_paths"}
    arithmetic = {"device": device_kind(numerics["device"]), "dtype": numerics["dtype"]}
    return config_hash({"metric": metric, "options": relevant, "weights": files, "arithmetic": arithmetic})[:16]


def _row(task: Task, metric: str, score: ItemScore, image_sha256: str, signature: str) -> dict:
    row = {"task_id": task.task_id, "image_sha256": image_sha256, "scored_with": signature, "identity_id": task.identity_id, "prompt_id": task.prompt_id,
           "condition_id": task.condition_id, "sample": task.sample, "metric": metric,
           "status": score.status, "reason": score.reason, "extra": json.dumps(score.extra, default=str, sort_keys=True)}
    row.update({k: (float(v) if v is not None else math.nan) for k, v in score.values.items()})
    return row


def read_scores(run: RunDir) -> pd.DataFrame:
    """scores.parquet, checked: readable, the key columns with their types, known statuses, one row
    per (task, metric). A file that fails any check raises DamagedScores naming what is wrong."""
    if not run.scores_file.exists():
        return pd.DataFrame(columns=KEY_COLUMNS)
    try:
        return _checked_scores(run.scores_file)
    except DamagedScores as exc:
        raise DamagedScores(f"{exc}; `caphuman-bench score {run.path}` rebuilds it") from None


def _checked_scores(where) -> pd.DataFrame:
    try:
        df = pd.read_parquet(where)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, … on junk
        raise DamagedScores(f"{where}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    missing = [c for c in KEY_COLUMNS if c not in df]
    if missing:
        raise DamagedScores(f"{where}: column {missing[0]!r} missing")
    if len(df) == 0:
        return df
    for column in ("task_id", "image_sha256", "scored_with", "metric", "status", "reason"):
        if not df[column].map(lambda v: isinstance(v, str)).all():
            raise DamagedScores(f"{where}: column {column!r} holds a value that is not a string")
    unknown = sorted(set(df["status"]) - set(ROW_STATUSES))
    if unknown:
        raise DamagedScores(f"{where}: column 'status' holds {unknown[0]!r} (expected {', '.join(ROW_STATUSES)})")
    duplicated = df.duplicated(["task_id", "metric"])
    if duplicated.any():
        row = df[duplicated].iloc[0]
        raise DamagedScores(f"{where}: {int(duplicated.sum())} duplicate row(s), e.g. task {row['task_id']!r} metric {row['metric']!r}")
    values = [c for c in df.columns if c not in KEY_COLUMNS]
    for column in values:
        if not pd.api.types.is_float_dtype(df[column]):
            raise DamagedScores(f"{where}: value column {column!r} is not floating point")
        infinite = df[column].abs() == math.inf  # NaN means "no value"; an infinity is no score any metric gives
        if infinite.any():
            raise DamagedScores(f"{where}: value column {column!r} holds an infinite value (task {df['task_id'][infinite].iloc[0]!r})")
    return df


def _trusted_scores(run: RunDir, warn: bool) -> pd.DataFrame:
    """The stored rows, or none when the file is damaged: every pair is then rescored and the file rebuilt."""
    if not run.scores_file.exists():
        return pd.DataFrame(columns=KEY_COLUMNS)
    try:
        return _checked_scores(run.scores_file)
    except DamagedScores as exc:
        if warn:
            log.warning("%s; rescoring every image to rebuild it", exc)
        return pd.DataFrame(columns=KEY_COLUMNS)


def _up_to_date(run: RunDir, signatures: dict[str, str], digests: dict[str, str]) -> set[tuple[str, str]]:
    """(task, metric) pairs whose stored row was scored on this very image with these settings and
    did not fail (an `error` row is retried)."""
    df = _trusted_scores(run, warn=True)
    return {(tid, metric) for tid, metric, sig, digest, status
            in zip(df["task_id"], df["metric"], df["scored_with"], df["image_sha256"], df["status"])
            if signatures.get(metric) == sig and digests.get(tid) == digest and status != "error"}


def _merge_scores(run: RunDir, rows: list[dict]) -> None:
    """Add rows to scores.parquet under a lock, replacing older rows of the same (task, metric)."""
    new = pd.DataFrame(rows)
    with run.lock("scores"):
        old = _trusted_scores(run, warn=False)  # _up_to_date said so, unless --force asked to rescore anyway
        if len(old):
            keys = set(zip(new["task_id"], new["metric"]))
            old = old[[k not in keys for k in zip(old["task_id"], old["metric"])]]
            new = pd.concat([old, new], ignore_index=True) if len(old) else new
        new = new.sort_values(["task_id", "metric"], kind="stable").reset_index(drop=True)
        atomic_write(run.scores_file, lambda fh: new.to_parquet(fh, index=False))


def _record_scoring(run: RunDir, scored: dict[str, tuple[dict, dict, str, dict, dict]], skipped: dict[str, str],
                    kept_earlier: bool = True) -> None:
    """Per metric family, what its rows were scored with (options, weights files, signature, numerics, and
    what the family adds: head_control's reconstructor), and the families the last pass skipped. Families
    not in this pass keep their earlier entry; a family whose stored rows were kept from an earlier pass
    (same signature) lists every batch size used."""
    with run.lock("scoring"):
        try:
            previous = run.scoring()
        except BenchError as exc:  # derived: rebuilt from this pass
            log.warning("%s; rewriting it", exc)
            previous = {}
        metrics = previous.get("metrics", {})
        for name, (options, found, signature, numerics, record) in scored.items():
            earlier = metrics.get(name) or {}
            if kept_earlier and earlier.get("signature") == signature:  # rows of the earlier pass are kept beside this one's
                sizes = (earlier.get("numerics") or {}).get("batch_size", [])
                sizes = sorted({*(sizes if isinstance(sizes, list) else [sizes]), numerics["batch_size"]})
                numerics = {**numerics, "batch_size": sizes[0] if len(sizes) == 1 else sizes}
            metrics[name] = {"signature": signature, "protocol": scoring_protocol(options).name,
                             "weights": {wid: str(path) for wid, path in sorted(found.items())},
                             "options": {k: v for k, v in options.items() if k != "weights_paths"}, "numerics": numerics,
                             **record}
        write_json_atomic(run.scoring_file, {"metrics": dict(sorted(metrics.items())), "skipped_metrics": skipped})


def check_reference_faces(bench: Benchmark, identity_ids, metrics: list[str] | None, options: dict) -> None:
    """Before generation: the identity metrics among `metrics` need a face in every reference photo
    (else each image of that identity is an error row and scoring stops on a misleading cause)."""
    from caphuman_bench.metrics.identity import IdentitySimilarity, photos_without_face

    ready, _ = select_metrics(metrics, options)
    identity_metrics = {name: found for name, (cls, found, _) in ready.items() if issubclass(cls, IdentitySimilarity)}
    if not identity_metrics:
        return
    owners = {bench.identities[i].photo_owner: i for i in identity_ids}  # "<id>@k" shares <id>'s first photo
    faceless = photos_without_face({owner: bench.reference_image(i) for owner, i in owners.items()}, options,
                                   next(iter(identity_metrics.values())))
    if faceless:
        named = ", ".join(f"{i} ({bench.identities[i].files[0]})" for i in faceless[:5])
        raise BenchError(f"no face found (MTCNN) in the reference photo of {len(faceless)} identit{'y' if len(faceless) == 1 else 'ies'}: "
                         f"{named}; {', '.join(identity_metrics)} need(s) one: replace the photo, leave the identity out "
                         "of the split, or leave these metrics out with --metrics")
