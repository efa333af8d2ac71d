"""Stage 4's parts beyond aggregation (`stages/report.py`): statistics, breakdowns, figures, pages.

    stats.py       bootstrap intervals, the paired comparison of two runs on the same tasks, Holm's
                   step-down and the win/tie/loss matrix over many pairs
    numbers.py     rounding to fixed significant digits (reruns write byte-identical files)
    breakdowns.py  per-image table joined with the tasks and the spec; per condition / |yaw| / category / identity
    figures.py     matplotlib figures sized to be read (one per metric, intervals drawn)
    pages.py       the self-contained HTML pages: report.html and ablation.html (templates/*.html, jinja2)
    titles.py      values in words with units, the paper's column groups, the ranking of rows
    latex.py       `report --latex`: the leaderboard as a booktabs table
    cache.py       per-run aggregates and paired comparisons kept under the hash of their inputs
    paper.py       the paper's reported numbers (benchmark_data/paper_results.yaml)

Everything here reads run directories (`RunDir`) and the benchmark spec (`Benchmark`), never another
stage's objects.
"""
