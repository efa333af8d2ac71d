"""Stage 4's parts beyond aggregation (`stages/report.py`): statistics, breakdowns, figures, pages.

    stats.py       bootstrap intervals, the paired comparison of two runs on the same tasks
    numbers.py     rounding to fixed significant digits (reruns write byte-identical files)
    breakdowns.py  per-image table joined with the tasks and the spec; per condition / |yaw| / category / identity
    figures.py     matplotlib figures sized to be read (one per metric, intervals drawn)
    pages.py       the self-contained HTML pages: report.html and ablation.html
    paper.py       the paper's reported numbers (benchmark_data/paper_results.yaml)

Everything here reads run directories (`RunDir`) and the benchmark spec (`Benchmark`), never another
stage's objects.
"""
