"""The paper's reported numbers (`benchmark_data/paper_results.yaml`) beside a run's, labelled as the paper's."""

from __future__ import annotations

from pathlib import Path

import yaml

from caphuman_bench.errors import BenchError
from caphuman_bench.report.numbers import fmt

PAPER_FILE = Path(__file__).resolve().parents[1] / "benchmark_data" / "paper_results.yaml"


def load_paper(path: Path = PAPER_FILE) -> dict | None:
    """The file's content, checked; None when the file is absent (an installed copy without it)."""
    if not path.exists():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: not valid YAML: {exc}") from None
    for key in ("source", "caveat", "columns", "rows"):
        if not isinstance(data, dict) or key not in data:
            raise BenchError(f"{path}: field {key!r} missing")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict) or not {"method", "card", "values"} <= set(row):
            raise BenchError(f"{path}: rows[{i}] needs fields method, card, values")
        unknown = set(row["values"]) - set(data["columns"].values())
        if unknown:
            raise BenchError(f"{path}: rows[{i}] ({row['method']}): value(s) {', '.join(sorted(unknown))} not in 'columns'")
    return data


def paper_table(results: list[dict], labels: list[str], path: Path = PAPER_FILE):
    """(source, caveat, header, rows): each paper row ('paper: CapHuman'), then the runs of its card."""
    data = load_paper(path)
    if data is None:
        return None
    columns = data["columns"]
    header = [f"{paper} ({ours})" for paper, ours in columns.items()]
    rows = []
    for row in data["rows"]:
        rows.append([f"paper: {row['method']}"] + [fmt(row["values"].get(ours)) for ours in columns.values()])
        for res, label in zip(results, labels):
            if res.get("method_card") == row["card"]:
                rows.append([f"this run: {label}"] + [fmt((res["metrics"].get(ours) or {}).get("mean"))
                                                     for ours in columns.values()])
    caveat = f"{data['caveat']} {data.get('transcribed_from', '')}".strip()
    return data["source"], caveat, header, rows
