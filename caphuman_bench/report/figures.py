"""Figures drawn with matplotlib (Agg) at sizes that read at 1400 px and on a phone: one figure per
metric, labels wrapped, titles on two short lines, every mean with its 95 % interval as an error bar.

The axes are filled with `AXES_FACE` (a colour used nowhere else), so the plotting area of a figure
can be measured from its pixels (the browser test does). PNG and SVG are written without dates or
software versions, so the same numbers give the same bytes.
"""

from __future__ import annotations

import io
import textwrap

AXES_FACE = "#eef1f6"
PALETTE = ("#3b6ea8", "#e08a2c", "#4f9a5a", "#c0504d", "#7e62a8", "#8c6d4f", "#d17fb7", "#6b6b6b")
DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.facecolor": AXES_FACE,
                         "axes.edgecolor": "#9aa3ad", "svg.hashsalt": "caphuman-bench", "svg.fonttype": "path"})
    return plt


def wrap(label: str, width: int = 22) -> str:
    return "\n".join(textwrap.wrap(str(label), width, break_long_words=True, break_on_hyphens=True)) or str(label)


def direction(higher: bool | None) -> str:
    return "" if higher is None else ("higher is better ↑" if higher else "lower is better ↓")


def _errors(means, lows, highs):
    """Asymmetric error bars from intervals (0 where a mean has no interval)."""
    below = [0.0 if m is None or lo is None else max(m - lo, 0.0) for m, lo in zip(means, lows)]
    above = [0.0 if m is None or hi is None else max(hi - m, 0.0) for m, hi in zip(means, highs)]
    return [below, above]


def save_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def save_files(fig, stem) -> list:
    """`stem`.png and `stem`.svg (for papers), each written atomically (a full disk names the file), then
    close; returns the paths."""
    from pathlib import Path

    from caphuman_bench.atomic import atomic_write

    stem = Path(stem)
    try:
        atomic_write(stem.with_suffix(".png"), lambda fh: fig.savefig(fh, format="png", dpi=DPI, metadata={"Software": None}))
        atomic_write(stem.with_suffix(".svg"), lambda fh: fig.savefig(fh, format="svg", metadata={"Date": None, "Creator": None}))
    finally:
        _plt().close(fig)
    return [stem.with_suffix(".png"), stem.with_suffix(".svg")]


def color_of(name: str, names: list[str]) -> str:
    """One colour per method (or variant) across every figure of a page."""
    return PALETTE[names.index(name) % len(PALETTE)] if name in names else PALETTE[-1]


def metric_bars(labels: list[str], means: list, lows: list, highs: list, metric: str, higher: bool | None):
    """Horizontal bars, one per method, with the 95 % interval; the value is written at each bar."""
    plt = _plt()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(4.4, 1.3 + 0.42 * n), layout="constrained")
    y = list(range(n))[::-1]
    values = [0.0 if m is None else m for m in means]
    scored = [i for i, m in enumerate(means) if m is not None]  # an unscored method gets no bar, only its label
    if scored:
        ax.barh([y[i] for i in scored], [values[i] for i in scored],
                xerr=_errors(*([seq[i] for i in scored] for seq in (means, lows, highs))),
                color=[PALETTE[i % len(PALETTE)] for i in scored], height=0.6, capsize=4,
                error_kw={"elinewidth": 1.2, "ecolor": "#222"})
    ax.set_yticks(y, [wrap(label, 20) for label in labels])
    finite = [v for v in (list(values) + [h for h in highs if h is not None]) if v is not None]
    top = max(finite + [0.0]) or 1.0
    bottom = min(finite + [0.0])
    ax.set_xlim(bottom - 0.02 * (top - bottom), top + 0.25 * (top - bottom or 1.0))
    for yi, value, m, hi in zip(y, values, means, highs):  # written past the interval, not on it
        ax.text(max(value, hi if hi is not None else value), yi, f"  {m:.3g}" if m is not None else "  not scored",
                va="center", ha="left", fontsize=9)
    ax.set_title(f"{metric}\n{direction(higher)}", loc="left")
    ax.grid(axis="x", color="white", linewidth=1)
    ax.set_axisbelow(True)
    return fig


def grouped_bars(groups: list[str], series: dict[str, tuple[list, list, list]], metric: str, higher: bool | None,
                 xlabel: str = "", names: list[str] | None = None):
    """Vertical bars: one cluster per group (condition, category, variant), one bar per series (method),
    each with its interval. `series[name] = (means, lows, highs)` aligned with `groups`; `names` fixes
    each series' colour (the page's method order)."""
    names = names or list(series)
    plt = _plt()
    k = max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.6, 1.0 + 0.55 * len(groups) * k), 3.6), layout="constrained")
    width = 0.8 / k
    plotted = 0
    for i, (name, (means, lows, highs)) in enumerate(series.items()):
        kept = [(g + (i - (k - 1) / 2) * width, m, lo, hi) for g, (m, lo, hi) in enumerate(zip(means, lows, highs))
                if m is not None]  # an unscored group gets no bar (a zero-height bar would read as 0)
        if not kept:
            continue
        xs, means, lows, highs = (list(c) for c in zip(*kept))
        ax.bar(xs, means, width * 0.92, yerr=_errors(means, lows, highs), color=color_of(name, names),
               label=wrap(name, 30), capsize=3, error_kw={"elinewidth": 1})
        plotted += 1
        if len(groups) * k <= 16:  # few bars: write each mean, so a zero is seen as a zero, not a gap
            for x, m, hi in zip(xs, means, highs):  # above the interval, not on it
                ax.annotate(f"{m:.3g}", (x, max(m, hi if hi is not None else m)), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=8)
    if not plotted:
        ax.text(0.5, 0.5, "not scored", transform=ax.transAxes, ha="center", va="center", color="#555")
    ax.set_xlim(-0.5, len(groups) - 0.5)
    long = max((len(str(g)) for g in groups), default=0) > 10
    ax.set_xticks(range(len(groups)), [wrap(g, 14) for g in groups], rotation=30 if long else 0,
                  ha="right" if long else "center")
    ax.set_title(f"{metric}\n{direction(higher)}", loc="left")
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.grid(axis="y", color="white", linewidth=1)
    ax.set_axisbelow(True)
    if plotted:
        fig.legend(loc="outside lower center", ncols=min(plotted, 3), frameon=False, fontsize=9)
    return fig


def tau_curves(panels: list[tuple[str, bool | None, dict[str, tuple[list, list, list, list]]]]):
    """The τ trade-off: one panel per metric (identity similarity, head-control error, …); one line per
    identity-feature setting; `lines[name] = (taus, means, lows, highs)`, intervals as error bars."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), layout="constrained", squeeze=False)
    handles = {}
    for ax, (metric, higher, lines) in zip(axes[0], panels):
        plotted = False
        for i, (name, (taus, means, lows, highs)) in enumerate(lines.items()):
            points = [(t, m, lo, hi) for t, m, lo, hi in zip(taus, means, lows, highs) if m is not None]
            if not points:
                continue
            t, m, lo, hi = zip(*points)
            # Markers and dashes differ per setting, so lines that coincide stay visible.
            handle = ax.errorbar(t, m, yerr=_errors(m, lo, hi), marker="os^Dv"[i % 5], markersize=8 - 1.5 * (i % 3),
                                 linestyle=("-", "--", ":", "-.")[i % 4], capsize=4, color=PALETTE[i % len(PALETTE)],
                                 label=name)
            handles[name] = handle
            plotted = True
        if not plotted:
            ax.text(0.5, 0.5, "not scored", transform=ax.transAxes, ha="center", va="center", color="#555")
        ax.set_xlabel("τ (identity context dropped while t > τ; 0 = off)")
        ax.set_title(f"{metric}\n{direction(higher)}", loc="left")
        ax.grid(color="white", linewidth=1)
        ax.set_axisbelow(True)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 3),
                   frameon=False, title="identity features")
    return fig

