"""The self-contained HTML pages: `report.html` (leaderboard, figures, breakdowns, paired comparisons,
a qualitative grid, the paper's numbers) and `ablation.html` (the τ trade-off and the feature switches).

Images are embedded (PNG figures, JPEG thumbnails as data URIs), so a page is one file that can be
mailed or committed. The layout is one column of cards that wrap: it reads at 1400 px and on a phone.
Nothing on a page depends on the time it was written.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from markupsafe import Markup
from PIL import Image

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.registry import metric_direction
from caphuman_bench.report import figures
from caphuman_bench.report.breakdowns import AXIS_TITLES, run_spec
from caphuman_bench.report.cache import AggregateCache
from caphuman_bench.report.numbers import fmt, fmt_interval, fmt_p
from caphuman_bench.report.paper import paper_table
from caphuman_bench.report.reconstructors import ALL, condition_reconstructor, matrix_title, row_bins
from caphuman_bench.report.stats import (
    PairedResult,
    paired_sentence,
    recogniser_agreement,
    recogniser_means,
    win_tie_loss,
)
from caphuman_bench.report.titles import best_index, grouped, ranked, sort_value, title
from caphuman_bench.rundir import RunDir

# The values a reader looks at first; the rest are one click away.
HEADLINE = ("face_detection", "id_sim_facenet", "id_sim_arcface", "id_sim_dlib", "clip_score", "prompt_acc_top1",
            "rmse_pose", "pose_error_deg", "mp_pose_error_deg")
THUMB = 192
TEMPLATES = Path(__file__).parent / "templates"


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(template: str, **context) -> str:
    """A template of `report/templates/` filled in; every value escaped unless it is `Markup`."""
    return _environment().get_template(template).render(**context)


def protocols(res: dict) -> dict[str, str]:
    """Metric family → the name of the scoring protocol its rows followed: the one `scoring.json`
    recorded (results.json `scored_with`), else the convention's `protocol`."""
    found = {}
    for family in sorted(set(res.get("conventions", {})) | set(res.get("scored_with", {}))):
        conv = res.get("conventions", {}).get(family) or {}
        scored = res.get("scored_with", {}).get(family) or {}
        protocol = scored.get("protocol") or conv.get("protocol")
        if protocol:
            found[family] = str(protocol)
    return found


def run_protocol(res: dict) -> str:
    return ", ".join(sorted(set(protocols(res).values()))) or "–"


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _drawn(cache: AggregateCache | None, draw, *args) -> bytes:
    """The PNG of `figures.draw(*args)`, from `cache` when the same figure (same inputs, same
    figures.py) was drawn before: matplotlib takes most of a warm report's time."""
    key = hashlib.sha256(json.dumps([draw.__name__, args], default=str).encode()
                         + Path(figures.__file__).read_bytes()).hexdigest()
    entry = cache.get("figures", key) if cache else None
    if entry is not None:
        return base64.b64decode(entry["png"])
    png = figures.save_png(draw(*args))
    if cache:
        cache.put("figures", key, {"png": base64.b64encode(png).decode()})
    return png


def _figure(png: bytes, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f"<figure><img alt='{html.escape(alt)}' src='{_b64(png, 'image/png')}'>{cap}</figure>"


def _thumb(image: Image.Image | None) -> str | None:
    """A JPEG thumbnail as a data URI (None without an image)."""
    if image is None:
        return None
    image = image.convert("RGB")
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85, optimize=True)
    return _b64(buf.getvalue(), "image/jpeg")


def _page(title: str, body: list[str]) -> str:
    return render("page.html", title=title, body=Markup("\n".join(body)))


def _cell(m: dict | None, images: int, best: bool) -> dict:
    """A leaderboard cell: mean, interval, n where fewer images than finished carry it, sort key."""
    if m is None or m.get("mean") is None:
        return {"text": "–", "ci": "", "n": "", "sort": "", "best": False}
    ci = f"[{fmt(m['ci95'][0])}, {fmt(m['ci95'][1])}]" if m.get("ci95") else ""
    return {"text": fmt(m["mean"]), "ci": ci, "n": m["n"] if m["n"] < images else "", "sort": repr(m["mean"]),
            "best": best}


def _metric_names(results: list[dict], order: list[str]) -> list[str]:
    present = {name for res in results for name in res["metrics"]}
    return [v for v in order if v in present] + sorted(present - set(order))


def _directions(results: list[dict]) -> dict[str, bool]:
    return {name: m["higher_is_better"] for res in results for name, m in res["metrics"].items()}


def leaderboard_table(results: list[dict], labels: list[str], order: list[str]) -> str:
    """The sortable leaderboard: the paper's column groups, titles in words, best value per column
    marked, rows ranked by the headline identity similarity (plain JS sorts by any column)."""
    names = _metric_names(results, order)
    higher = _directions(results)
    groups = [(g.capitalize(), [{"id": n, "title": title(n, higher.get(n)), "higher": "true" if higher.get(n) else "false"}
                                for n in members]) for g, members in grouped(names)]
    rows_order = ranked(results)
    best = {n: best_index([(results[i]["metrics"].get(n) or {}).get("mean") for i in rows_order], higher.get(n))
            for n in names}
    flat = [c["id"] for _, columns in groups for c in columns]
    rows = []
    for rank, i in enumerate(rows_order, 1):
        res = results[i]
        images = res["images"]["ok"]
        rows.append({"label": labels[i], "rank": rank, "split": res["split"], "head_input": str(res.get("head_input", "none")),
                     "images": images, "cells": [_cell(res["metrics"].get(n), images, rank - 1 in best[n]) for n in flat]})
    sorted_by = sort_value(results)
    named = {run_protocol(res) for res in results}
    # One protocol name for the page; runs under several (or only a convention's description) show it per row
    # in the Conventions section, where it can be read in full.
    protocol = named.pop() if len(named) == 1 and len(next(iter(named))) <= 40 and "–" not in named else ""
    return render("leaderboard.html", groups=groups, rows=rows, sorted_by=sorted_by,
                  sorted_by_title=title(sorted_by) if sorted_by else "input order", protocol=protocol,
                  show_split=len({res["split"] for res in results}) > 1)


def metric_figures(results: list[dict], labels: list[str], names: list[str], cache: AggregateCache | None = None) -> list[str]:
    higher = _directions(results)
    out = []
    for name in names:
        ms = [res["metrics"].get(name) or {} for res in results]
        means = [m.get("mean") for m in ms]
        lows = [(m.get("ci95") or [None, None])[0] for m in ms]
        highs = [(m.get("ci95") or [None, None])[1] for m in ms]
        png = _drawn(cache, figures.metric_bars, labels, means, lows, highs, title(name), higher.get(name))
        out.append(_figure(png, name, "mean and 95 % bootstrap interval over images"))
    return out


def _series(results: list[dict], labels: list[str], axis: str, name: str) -> tuple[list[str], dict]:
    """Groups of one breakdown axis (first-seen order across runs) and, per run, (means, lows, highs)."""
    groups = list(dict.fromkeys(g for res in results for g, vals in res.get("breakdowns", {}).get(axis, {}).items()
                                if name in vals))
    series = {}
    for res, label in zip(results, labels):
        table = res.get("breakdowns", {}).get(axis, {})
        cells = [table.get(g, {}).get(name) or {} for g in groups]
        if any(c.get("mean") is not None for c in cells):
            series[label] = ([c.get("mean") for c in cells], [(c.get("ci95") or [None, None])[0] for c in cells],
                             [(c.get("ci95") or [None, None])[1] for c in cells])
    return groups, series


def breakdown_table(results: list[dict], labels: list[str], axis: str, name: str) -> str:
    groups, _ = _series(results, labels, axis, name)
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = []
    for g in groups:
        cells = []
        for res in results:
            m = res.get("breakdowns", {}).get(axis, {}).get(g, {}).get(name)
            cells.append("<td>–</td>" if not m else f"<td>{fmt_interval(m['mean'], m.get('ci95'))}"
                         f"<br><span class='ci'>n = {m['n']}</span></td>")
        rows.append(f"<tr><td class='l'>{html.escape(g)}</td>{''.join(cells)}</tr>")
    return (f"<div class='scroll'><table><thead><tr><th class='l'>{html.escape(AXIS_TITLES[axis])}</th>{head}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table></div>")


def _shade(value: float | None, low: float, high: float, higher: bool | None) -> tuple[str, str]:
    """(background, text colour) of a heatmap cell: matplotlib's Blues, darker is better."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if value is None:
        return "#f3f5f8", "#6b7280"
    t = 0.5 if high == low else (value - low) / (high - low)
    t = 0.1 + 0.8 * (t if higher is not False else 1.0 - t)  # the palest and darkest blues stay readable
    return to_hex(colormaps["Blues"](t)), "#ffffff" if t > 0.55 else "#1d232a"


def breakdown_heatmap(results: list[dict], labels: list[str], order: list[int], axis: str, name: str,
                      higher: bool | None) -> str | None:
    """Methods (rows, leaderboard order) × groups of one axis as an HTML table coloured by the mean:
    text at the page's size however many methods, each cell's interval and n on hover."""
    groups, series = _series(results, labels, axis, name)
    if not series:
        return None
    table = {labels[i]: results[i].get("breakdowns", {}).get(axis, {}) for i in order}
    scored = [m for label in table for g in groups if (m := (table[label].get(g, {}).get(name) or {}).get("mean")) is not None]
    low, high = min(scored), max(scored)
    rows = []
    for label in (labels[i] for i in order):
        if label not in series:
            continue
        cells = []
        for g in groups:
            m = table[label].get(g, {}).get(name) or {}
            background, color = _shade(m.get("mean"), low, high, higher)
            tip = f"{label}, {g}: {fmt_interval(m['mean'], m.get('ci95'))}, n = {m['n']}" if m.get("mean") is not None else ""
            cells.append({"text": fmt(m.get("mean"), 3), "background": background, "color": color, "tip": tip})
        rows.append({"label": label, "cells": cells})
    return render("heatmap.html", title=title(name), direction=figures.direction(higher), groups=groups, rows=rows)


def breakdown_section(results: list[dict], labels: list[str], names: list[str]) -> list[str]:
    """Per axis one heatmap per value (methods × groups, in the leaderboard's order), tables on click."""
    higher = _directions(results)
    parts = ["<h2 id='breakdowns'>Breakdowns</h2>",
             "<p class='note'>The benchmark's splits: per head condition, per |yaw| bin, per prompt category, per "
             "identity. Each cell is a group's mean, darker is better (hover for its 95 % interval and n; the tables "
             "give them too). Weighted by n, the groups give back the overall mean.</p>"]
    order = ranked(results)
    for axis in ("condition", "abs_yaw", "category"):
        maps = [(name, breakdown_heatmap(results, labels, order, axis, name, higher.get(name))) for name in names]
        maps = [(name, m) for name, m in maps if m]
        if not maps:
            continue
        tables = [f"<h4>{html.escape(title(name, higher.get(name)))}</h4>" + breakdown_table(results, labels, axis, name)
                  for name, _ in maps]
        parts += [f"<h3>By {AXIS_TITLES[axis]}</h3><div class='figs'>", *(m for _, m in maps), "</div>",
                  f"<details><summary>Tables by {AXIS_TITLES[axis]}</summary>{''.join(tables)}</details>"]
    tables = [f"<h4>{html.escape(title(n, higher.get(n)))}</h4>" + breakdown_table(results, labels, "identity", n)
              for n in names]
    parts.append(f"<h3>By identity</h3><details><summary>Tables by identity</summary>{''.join(tables)}</details>")
    return parts


def recogniser_section(results: list[dict], labels: list[str]) -> list[str]:
    """The face recognisers side by side, and how well their rankings of the methods agree (Kendall's τ)."""
    means = recogniser_means(results, labels)
    if len(means) < 2:
        return []
    methods = sorted({m for per in means.values() for m in per})
    head = "".join(f"<th>{html.escape(name)}</th>" for name in means)
    rows = "".join(f"<tr><td class='l'>{html.escape(m)}</td>" +
                   "".join(f"<td>{fmt(per.get(m))}</td>" for per in means.values()) + "</tr>" for m in methods)
    pairs = "".join(f"<tr><td class='l'>{html.escape(r['recogniser_a'])} · {html.escape(r['recogniser_b'])}</td>"
                    f"<td>{r['methods']}</td><td>{fmt(r['kendall_tau'])}</td><td>{fmt(r['p_value'])}</td></tr>"
                    for r in recogniser_agreement(means))
    return ["<h2 id='recognisers'>Face recognisers side by side</h2>",
            "<p class='note'>A method tuned against one recogniser ranks high under it only; Kendall's τ compares "
            "the recognisers' rankings of the methods (scipy τ-b; no τ below three methods scored by both).</p>",
            f"<div class='scroll'><table><thead><tr><th class='l'>method</th>{head}</tr></thead><tbody>{rows}</tbody></table></div>",
            "<div class='scroll'><table><thead><tr><th class='l'>recognisers</th><th>methods</th><th>Kendall τ</th>"
            f"<th>p</th></tr></thead><tbody>{pairs}</tbody></table></div>"]


def paired_section(paired: list[tuple[str, str, list[PairedResult]]]) -> list[str]:
    """Few comparisons (an ablation against its first variant) as sentences."""
    if not paired:
        return []
    parts = ["<h2 id='paired'>Paired comparisons</h2>",
             "<p class='note'>Runs planned on the same tasks, compared image by image: the mean per-image difference "
             "with its paired-bootstrap 95 % interval and the Wilcoxon signed-rank p-value (scipy). Significant: the "
             "interval excludes 0 and p &lt; 0.05. Images of one identity are not independent: read the intervals "
             "as a lower bound on the uncertainty across identities.</p>"]
    for name_a, name_b, results in paired:
        items = "".join(f"<li>{html.escape(paired_sentence(r, name_a, name_b))}</li>" for r in results)
        parts.append(f"<h3>{html.escape(name_a)} vs {html.escape(name_b)}</h3><ul class='paired'>{items}</ul>")
    return parts


def matrix_section(results: list[dict], labels: list[str], paired: dict[tuple[int, int], list[PairedResult]]) -> list[str]:
    """One win/tie/loss matrix per headline value over every pair of runs with the same tasks, rows
    in the leaderboard's order, Holm-adjusted per value (`stats.win_tie_loss`); sentences on click."""
    if not paired:
        return []
    higher = _directions(results)
    order = ranked(results)
    position = {i: k for k, i in enumerate(order)}
    values = [v for v in HEADLINE if any(r.metric == v for compared in paired.values() for r in compared)]
    values.sort(key=lambda v: v != sort_value(results))  # the ranking's value first, opened
    matrices = []
    for value in values:
        pairs = {}
        for (i, j), compared in paired.items():
            for r in compared:
                if r.metric == value:
                    pairs[(i, j)] = r
        cells = win_tie_loss(pairs)
        rows = []
        for i in order:
            row = {"name": labels[i], "cells": [], "wins": 0, "ties": 0, "losses": 0}
            for j in order:
                verdict = cells.get((i, j))
                if i == j or verdict is None:
                    row["cells"].append({"outcome": "self" if i == j else "", "symbol": "" if i == j else "·",
                                         "tip": "" if i == j else "not planned on the same tasks"})
                    continue
                row[{"win": "wins", "tie": "ties", "loss": "losses"}[verdict.outcome]] += 1
                r = verdict.result
                sign = 1.0 if (i, j) in pairs else -1.0  # a pair's result is first − second
                low, high = sorted(sign * v for v in r.ci95) if r.ci95 else (None, None)
                tip = (f"{labels[i]} − {labels[j]} = {fmt(sign * (r.difference or 0.0), 3)} [{fmt(low, 2)}, {fmt(high, 2)}], "
                       f"Holm-adjusted {fmt_p(verdict.p_holm)}, n = {r.n}")
                row["cells"].append({"outcome": verdict.outcome, "symbol": {"win": "W", "loss": "L", "tie": "="}[verdict.outcome],
                                     "tip": tip})
            rows.append(row)
        sentences = [paired_sentence(r, labels[i], labels[j], decided=cells[(i, j)].outcome != "tie",
                                     p_holm=cells[(i, j)].p_holm) for (i, j), r in sorted(pairs.items(),
                                                                                          key=lambda kv: (position[kv[0][0]], position[kv[0][1]]))]
        matrices.append({"title": title(value, higher.get(value)), "names": [labels[i] for i in order], "rows": rows,
                         "sentences": sentences})
    return [render("matrix.html", matrices=matrices, pair_count=len(paired))]


def reconstructor_section(matrices: list[dict]) -> list[str]:
    """Per method the condition × scoring reconstructor tables (`report.reconstructors.matrices`): per value,
    each condition reconstructor's overall row, then its rows per |yaw| bin of the target."""
    if not matrices:
        return []
    shown = []
    for m in matrices:
        values = []
        for value, cells in m["values"].items():
            higher = metric_direction(value)
            rows = []
            for condition in m["conditions"]:
                bins = row_bins(cells, condition, m["scorers"])
                for b in bins:
                    row = {"all": b == ALL, "span": len(bins), "condition": condition, "bin": "all images" if b == ALL else b,
                           "cells": []}
                    for judge in m["scorers"]:
                        summary = cells.get((condition, judge), {}).get(b) or {}
                        ci = summary.get("ci95")
                        row["cells"].append({"mean": fmt(summary.get("mean"), 3),
                                             "ci": f"[{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]" if ci else "no interval",
                                             "n": summary.get("n") or "", "cls": "home" if judge == condition else ""})
                    rows.append(row)
            values.append({"title": matrix_title(value), "direction": figures.direction(higher), "rows": rows})
        shown.append({"method": m["method"], "split": m["split"], "scorers": m["scorers"], "tables": values})
    return [render("reconstructors.html", matrices=shown)]


def choose_tasks(runs: list[RunDir], count: int) -> list:
    """`count` tasks finished in every run, spread evenly over (identity, prompt, condition)."""
    if not runs or count <= 0:
        return []
    common = set.intersection(*(r.finished_ids() for r in runs))
    tasks = sorted((t for t in runs[0].tasks() if t.task_id in common),
                   key=lambda t: (t.identity_id, t.prompt_id, t.condition_id, t.sample))
    if len(tasks) <= count:
        return tasks
    return [tasks[int(i)] for i in np.linspace(0, len(tasks) - 1, count).round()]


def _head_render(runs: list[RunDir], identity_id: str, condition_id: str) -> Image.Image | None:
    """The head render a method was steered with, from the first run that cached one."""
    for run in runs:
        path = run.cache_dir / "method" / "render" / identity_id / condition_id / "head_render.npz"
        if not path.exists():
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                pixels = np.clip(data["rendered"], 0, 1).transpose(1, 2, 0)
        except Exception:  # a damaged cache entry costs its picture, not the page (numpy raises many kinds)
            continue
        return Image.fromarray((pixels * 255).round().astype(np.uint8))
    return None


def _task_text(task, bench: Benchmark | None) -> dict:
    prompt = bench.prompts.get(task.prompt_id) if bench else None
    condition = bench.conditions.get(task.condition_id) if bench else None
    identity = bench.identities.get(task.identity_id) if bench else None
    try:
        reference = bench.reference_image(task.identity_id) if bench else None
    except Exception:  # a moved photo must not cost the whole page
        reference = None
    return {"text": prompt.fill(identity.subject if identity else "a person") if prompt else task.prompt_id,
            "where": f"{task.condition_id}: {condition.description}" if condition else task.condition_id,
            "identity": task.identity_id, "sample": task.sample, "reference": reference}


def sample_tasks(runs: list[RunDir], labels: list[str], bench: Benchmark | None, count: int) -> list[dict]:
    """Per chosen task: its prompt and condition, then tiles: reference photo, head render, each run's image."""
    tasks = []
    for task in choose_tasks(runs, count):
        about = _task_text(task, bench)
        tiles = [{"label": "reference photo", "src": _thumb(about.pop("reference")), "given": True},
                 {"label": "head render", "src": _thumb(_head_render(runs, task.identity_id, task.condition_id)),
                  "given": True}]
        for run, label in zip(runs, labels):
            with Image.open(run.image_path(task.task_id)) as img:
                tiles.append({"label": label, "src": _thumb(img), "given": False})
        tasks.append(about | {"tiles": tiles})
    return tasks


def sample_grid(runs: list[RunDir], labels: list[str], bench: Benchmark | None, count: int) -> list[str]:
    """The same tasks across methods as tiles that wrap: 11 a row at 1400 px, 3 on a phone."""
    tasks = sample_tasks(runs, labels, bench, count)
    if not tasks:
        return []
    return [render("samples.html", anchor="samples", heading="Samples", tasks=tasks,
                   note="The same tasks across methods, in the leaderboard's order: the reference photo and the head "
                        "render the head-controlled methods were steered with (grey, — where no run has one), then "
                        "each method's image.")]


def conventions_section(results: list[dict], labels: list[str]) -> list[str]:
    rows = []
    for res, label in zip(results, labels):
        for family, conv in sorted(res.get("conventions", {}).items()):
            protocol = protocols(res).get(family)
            rest = "; ".join(f"{k}: {v}" for k, v in sorted(conv.items()))
            rows.append(f"<tr><td class='l'>{html.escape(label)}</td><td class='l'>{html.escape(family)}</td>"
                        f"<td class='l'>{html.escape(str(protocol) if protocol else '–')}</td>"
                        f"<td class='l'>{html.escape(rest)}</td></tr>")
    if not rows:
        return []
    return ["<h2 id='conventions'>Conventions</h2><details><summary>Scoring protocol and conventions per metric family</summary>"
            "<div class='scroll'><table><thead><tr><th class='l'>run</th><th class='l'>family</th>"
            f"<th class='l'>protocol</th><th class='l'>convention</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div></details>"]


def provenance_section(results: list[dict], labels: list[str]) -> list[str]:
    rows = []
    for res, label in zip(results, labels):
        prov = res.get("provenance", {})
        versions = prov.get("environment", {}).get("versions", {})
        soft = ", ".join(f"{k} {versions[k]}" for k in ("torch", "diffusers", "transformers") if k in versions)
        rows.append(f"<tr><td class='l'>{html.escape(label)}</td><td class='l'>{html.escape(str(prov.get('config_hash', ''))[:12])}</td>"
                    f"<td class='l'>{html.escape(str(prov.get('card_hash', ''))[:12])}</td>"
                    f"<td class='l'>{html.escape(res['benchmark_version'])} ({html.escape(str(prov.get('spec_hash', ''))[:12])})</td>"
                    f"<td class='l'>{html.escape(soft)}</td></tr>")
    return ["<h2 id='provenance'>Provenance</h2><div class='scroll'><table><thead><tr><th class='l'>run</th>"
            "<th class='l'>config</th><th class='l'>card</th><th class='l'>benchmark (spec hash)</th><th class='l'>versions</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"]


def paper_section(results: list[dict], labels: list[str]) -> list[str]:
    table = paper_table(results, labels)
    if table is None:
        return []
    source, caveat, header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='{'l' if i == 0 else ''}'>{html.escape(str(c))}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return ["<h2 id='paper'>The paper's numbers beside this run's</h2>",
            f"<p class='caveat'><b>Rows marked “paper” are the paper's reported numbers</b>, not measured here "
            f"({html.escape(source)}). {html.escape(caveat)}</p>",
            f"<div class='scroll'><table><thead><tr><th class='l'>row</th>{head}</tr></thead><tbody>{body}</tbody></table></div>"]


def report_page(results: list[dict], runs: list[RunDir], labels: list[str], order: list[str],
                paired: dict[tuple[int, int], list[PairedResult]], grid_tasks: int = 6,
                cache: AggregateCache | None = None, reconstructors: list[dict] = ()) -> str:
    names = _metric_names(results, order)
    headline = [n for _, members in grouped([n for n in names if n in HEADLINE] or names) for n in members]
    others = [n for n in names if n not in headline]
    bench = run_spec(runs[0]) if runs else None
    versions = sorted({res["benchmark_version"] for res in results})
    by_rank = ranked(results)
    ranked_results, ranked_labels = [results[i] for i in by_rank], [labels[i] for i in by_rank]
    body = ["<h1>caphuman-bench report</h1>",
            f"<p class='note'>{len(results)} run(s) on {html.escape(', '.join(sorted({r['split'] for r in results})))} · "
            f"benchmark {html.escape(', '.join(versions))}, a documented reconstruction of HumanIPHC (the paper's lists "
            "were not released). Every number is a mean over images with its 95 % bootstrap interval; "
            "<code>n</code> is shown where fewer images than finished carry a value.</p>",
            "<p class='note'><a href='#figures'>figures</a> · <a href='#breakdowns'>breakdowns</a> · "
            + ("<a href='#reconstructors'>reconstructors</a> · " if reconstructors else "") +
            "<a href='#paired'>paired comparisons</a> · <a href='#samples'>samples</a> · <a href='#paper'>paper</a> · "
            "<a href='#provenance'>provenance</a></p>",
            "<h2 id='leaderboard'>Leaderboard</h2>", leaderboard_table(results, labels, order)]
    if headline:
        body += ["<h2 id='figures'>Figures</h2><div class='figs'>",
                 *metric_figures(ranked_results, ranked_labels, headline, cache), "</div>"]
    if others:
        body += ["<details><summary>Every other reported value</summary><div class='figs'>",
                 *metric_figures(ranked_results, ranked_labels, others, cache), "</div></details>"]
    body += breakdown_section(results, labels, headline)
    body += reconstructor_section(list(reconstructors))
    body += recogniser_section(results, labels)
    body += matrix_section(results, labels, paired)
    body += sample_grid([runs[i] for i in by_rank], ranked_labels, bench, grid_tasks)
    body += paper_section(results, labels)
    body += conventions_section(results, labels)
    body += provenance_section(results, labels)
    return _page("caphuman-bench report", body)


FEATURE_NAMES = {"global+local": "global + local features", "global": "global feature only",
                 "local": "local features only", "none": "no identity features"}


def _params(res: dict) -> dict:
    return res.get("provenance", {}).get("params", {})


def _variant(res: dict) -> tuple[int, str]:
    """(τ, identity features) of an ablation run, from its resolved parameters."""
    params = _params(res)
    use_global, use_local = params.get("use_global", True), params.get("use_local", True)
    features = "global+local" if use_global and use_local else "global" if use_global else "local" if use_local else "none"
    return int(params.get("tau", 0) or 0), features


def variant_name(res: dict) -> str:
    """A variant as the sweep's options name it ('τ = 300 · global feature only'), plus its base
    model when the sweep set one, instead of the run label's parameter list."""
    tau, features = _variant(res)
    backbone = _params(res).get("backbone")
    return f"τ = {tau} · {FEATURE_NAMES[features]}" + (f" · base {Path(str(backbone)).name}" if backbone else "")


def _conditions_by(results: list[dict]) -> list[str]:
    """' · condition by NAME' per variant where the variants' condition reconstructors differ, else ''."""
    names = [condition_reconstructor(r) for r in results]
    return [f" · condition by {n}" if len(set(names)) > 1 else "" for n in names]


def variant_names(results: list[dict]) -> list[str]:
    """Each variant's name; variants that read alike (other --param overrides) keep their run label beside it."""
    names = [variant_name(r) + by for r, by in zip(results, _conditions_by(results))]
    return [n if names.count(n) == 1 else f"{n} ({r['method']})" for n, r in zip(names, results)]


def ablation_page(results: list[dict], labels: list[str], order: list[str], out_dir: Path,
                  identity: list[str], head: list[str],
                  paired: list[tuple[str, str, list[PairedResult]]] = (), runs: list[RunDir] | None = None,
                  grid_tasks: int = 4, reconstructors: list[dict] = ()) -> tuple[str, list[Path]]:
    """The τ sweep as curves (identity similarity and head-control error against τ), the feature
    switches as grouped bars, each with its intervals (figures also written as PNG and SVG), and with
    the variants' `runs` an image grid per τ. Variants are named by what was swept (`variant_name`);
    `labels` (the run labels) stay in the table of every variant."""
    higher = _directions(results)
    variants = [_variant(r) for r in results]
    names_of = variant_names(results)
    names = _metric_names(results, order)
    present = ([n for n in identity if n in names], [n for n in head if n in names])
    panels_for = [found[0] for found in present if found] or names[:2]
    features = list(dict.fromkeys(f for _, f in variants))
    taus = sorted({t for t, _ in variants})

    def cell(t, f, name):
        for (vt, vf), res in zip(variants, results):
            if (vt, vf) == (t, f):
                m = res["metrics"].get(name) or {}
                ci = m.get("ci95") or [None, None]
                return m.get("mean"), ci[0], ci[1]
        return None, None, None

    written, body = [], ["<h1>caphuman-bench ablation</h1>",
                         f"<p class='note'>{len(results)} variant(s) of {html.escape(labels[0].split('[')[0] if labels else '')} "
                         "on the same tasks: τ (the identity context is dropped at every step with t &gt; τ) and the "
                         "identity features (global FaceNet token, local CLIP tokens). Means with 95 % bootstrap intervals.</p>"]
    if panels_for:
        panels = []
        for name in panels_for:
            lines = {FEATURE_NAMES[f]: ([t for t in taus], *map(list, zip(*[cell(t, f, name) for t in taus]))) for f in features}
            panels.append((title(name), higher.get(name), lines))
        written += figures.save_files(figures.tau_curves(panels), out_dir / "ablation_tau")
        body += [f"<h2>τ: identity against head control</h2><div class='figs {'one' if len(panels) > 1 else 'wide'}'>",
                 _figure(written[-2].read_bytes(), "tau sweep", "one line per identity-feature setting"), "</div>"]
        body += ["<h2>Identity features</h2><div class='figs wide'>"]
        for name in panels_for:
            series = {f"τ = {t}": tuple(map(list, zip(*[cell(t, f, name) for f in features]))) for t in taus}
            fig = figures.grouped_bars([FEATURE_NAMES[f] for f in features], series, title(name), higher.get(name),
                                       "identity features")
            written += figures.save_files(fig, out_dir / f"ablation_features_{name}")
            body.append(_figure(written[-2].read_bytes(), f"{name} by identity features"))
        body.append("</div>")
    if runs:
        bench, by = run_spec(runs[0]), _conditions_by(results)
        for tau in taus:
            chosen = [k for k, (t, _) in enumerate(variants) if t == tau]
            tasks = sample_tasks([runs[k] for k in chosen], [FEATURE_NAMES[variants[k][1]] + by[k] for k in chosen], bench,
                                 grid_tasks)
            if tasks:
                body.append(render("samples.html", anchor=f"samples-tau-{tau}", heading=f"Images at τ = {tau}", tasks=tasks,
                                   note="The same tasks for each identity-feature setting at this τ: the reference photo "
                                        "and the head render (grey), then each variant's image."))
    body += reconstructor_section(list(reconstructors))
    body += paired_section(list(paired))
    body += ["<h2>Every variant</h2>", leaderboard_table(results, names_of, order),
             "<details><summary>Run labels</summary><ul>" + "".join(
                 f"<li>{html.escape(n)}: <code>{html.escape(label)}</code></li>" for n, label in zip(names_of, labels))
             + "</ul></details>"]
    return _page("caphuman-bench ablation", body), written
