"""`report --latex`: the leaderboard as a LaTeX booktabs table for a paper.

Columns in the paper's groups (identity / text / head control) under a \\cmidrule'd header; each
cell is the mean ± half the width of its 95 % percentile bootstrap interval over images (the
interval itself is asymmetric; half its width is what a ± cell can carry), the best mean of each
column in bold. Rows are ranked as on the page. Needs \\usepackage{booktabs} in the preamble.
"""

from __future__ import annotations

from caphuman_bench.report.numbers import fmt
from caphuman_bench.report.titles import best_index, grouped, ranked, title

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "—": "---", "↑": r"$\uparrow$",
            "↓": r"$\downarrow$", "≥": r"$\geq$", "×": r"$\times$", "±": r"$\pm$", "°": r"$^\circ$"}


def escape(text: str) -> str:
    return "".join(_SPECIAL.get(c, c) for c in str(text))


def _cell(m: dict | None, bold: bool) -> str:
    if not m or m.get("mean") is None:
        return "--"
    text = fmt(m["mean"], 3)
    if m.get("ci95"):
        text += r" $\pm$ " + fmt((m["ci95"][1] - m["ci95"][0]) / 2, 2)
    return rf"\textbf{{{text}}}" if bold else text


def latex_table(results: list[dict], labels: list[str], order: list[str]) -> str:
    """A complete table environment; `order` the values to show (those no run scored are left out)."""
    present = {n for res in results for n in res["metrics"]}
    groups = grouped([n for n in order if n in present])
    names = [n for _, members in groups for n in members]
    higher = {n: m["higher_is_better"] for res in results for n, m in res["metrics"].items()}
    rows = ranked(results)
    best = {n: best_index([(results[i]["metrics"].get(n) or {}).get("mean") for i in rows], higher.get(n))
            for n in names}
    lines = [r"% caphuman-bench leaderboard; needs \usepackage{booktabs}",
             r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "".join(" " + "c" * len(members) for _, members in groups) + "}",
             r"\toprule"]
    spans, rules, column = [], [], 2
    for name, members in groups:
        spans.append(rf"\multicolumn{{{len(members)}}}{{c}}{{{escape(name.capitalize())}}}")
        rules.append(rf"\cmidrule(lr){{{column}-{column + len(members) - 1}}}")
        column += len(members)
    lines += [" & " + " & ".join(spans) + r" \\", " ".join(rules)]
    lines.append("Method & " + " & ".join(escape(title(n, higher.get(n))) for n in names) + r" \\")
    lines.append(r"\midrule")
    for row, i in enumerate(rows):
        cells = [_cell(results[i]["metrics"].get(n), row in best[n]) for n in names]
        lines.append(escape(labels[i]) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{Mean $\pm$ half the width of the 95\,\% bootstrap interval over images; best mean per "
              r"column in bold; $\uparrow$/$\downarrow$: higher/lower is better.}",
              r"\label{tab:caphuman-bench}", r"\end{table}", ""]
    return "\n".join(lines)


def reconstructor_tables(matrices: list[dict]) -> str:
    """The reconstructor matrices (`report.reconstructors.matrices`) as booktabs tables, one per method and
    value: condition reconstructor × |yaw| bin of the target (rows), scoring reconstructor (columns),
    each cell mean ± half its 95 % interval; empty without matrices."""
    from caphuman_bench.registry import metric_direction
    from caphuman_bench.report.reconstructors import ALL, matrix_title, row_bins

    tables = []
    for m in matrices:
        for value, cells in m["values"].items():
            lines = [r"\begin{table}[t]", r"\centering", r"\small",
                     r"\begin{tabular}{ll" + "c" * len(m["scorers"]) + "}", r"\toprule",
                     rf" & & \multicolumn{{{len(m['scorers'])}}}{{c}}{{scored by}} \\",
                     rf"\cmidrule(lr){{3-{2 + len(m['scorers'])}}}",
                     "condition by & target $|$yaw$|$ & " + " & ".join(escape(s) for s in m["scorers"]) + r" \\", r"\midrule"]
            for k, condition in enumerate(m["conditions"]):
                bins = row_bins(cells, condition, m["scorers"])
                if k:
                    lines.append(r"\midrule")
                for b in bins:
                    row = [escape(condition) if b == ALL else "", "all" if b == ALL else escape(b)]
                    row += [_cell(cells.get((condition, s), {}).get(b), False) for s in m["scorers"]]
                    lines.append(" & ".join(row) + r" \\")
            caption = (f"{escape(matrix_title(value, metric_direction(value)))} of {escape(m['method'])}: head condition made by one "
                       r"reconstructor (rows), images scored by another (columns); mean $\pm$ half the 95\,\% bootstrap "
                       "interval over images, overall and per $|$yaw$|$ of the target.")
            lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", r"\end{table}", ""]
            tables.append("\n".join(lines))
    return "\n" + "\n".join(tables) if tables else ""
