"""The leaderboard's cost: images/s per card (stock vs ours) and GPU-hours for the full split, as markdown.

    python benchmarks/leaderboard_cost.py reports/perf/h100_2026-12-06/*.json > cost.md

Reads the JSON of `bench_run.py generation --method NAME` (one card's family pipeline, stock diffusers and
ours) and of `bench_run.py generation` (CapHuman's stock and default-fast rows). Cards not measured are
estimated from a measured card of their family (same base model and ControlNet setting, else the same
base model): its milliseconds per image-step times the card's steps; such rows are marked as estimates.
Totals: the paper's Table 1 rows and all 22 cards, on one GPU and on one 4-GPU node (perfect scaling:
a projection, sharding's efficiency not included). Generation only; fine-tuning and scoring are not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FULL_SPLIT_IMAGES = 105_000  # 100 identities × 35 prompts × 10 head conditions × 3 samples
# The rows README's methods table marks as the paper's Table 1 (issue 8's list), with CapHuman itself.
TABLE1 = ("caphuman", "controlnet_head", "controlnet_landmarks", "textual_inversion", "textual_inversion_controlnet_head",
          "dreambooth", "dreambooth_controlnet_head", "lora", "lora_controlnet_head", "fastcomposer")
CAPHUMAN_STOCK, CAPHUMAN_FAST = "stock diffusers (eager)", "all + torch.compile (default)"


def measurements(paths: list[Path]) -> tuple[dict[str, dict], str]:
    """card -> {stock, ours (images/s), stock_ms, ours_ms (per image-step), steps, batch}; and the devices seen."""
    found: dict[str, dict] = {}
    devices = set()
    for path in paths:
        data = json.loads(path.read_text())
        rows = {r.get("label"): r for r in data.get("rows", []) if "images_per_second" in r}
        if data.get("part") == "generation-method":
            card, steps = data["method"], data["steps"]
            stock, ours = rows.get("stock"), rows.get("ours")
        elif data.get("part") == "generation":
            card, steps = "caphuman", data["steps"]
            stock, ours = rows.get(CAPHUMAN_STOCK), rows.get(CAPHUMAN_FAST)
        else:
            continue
        if not (stock or ours) or data.get("tiny"):
            continue
        devices.add(data.get("device", "?"))
        entry = found.setdefault(card, {"steps": steps, "source": path.name, "device": data.get("device")})
        for key, row in (("stock", stock), ("ours", ours)):
            if row:
                entry[key] = row["images_per_second"]
                entry[f"{key}_ms"] = row["seconds_per_batch"] / row["batch"] / steps * 1e3
                entry["batch"] = row["batch"]
    return found, ", ".join(sorted(devices)) or "no device"


def cost_rows(found: dict[str, dict]) -> list[dict]:
    """One row per generating card: measured, estimated from its family, or unknown."""
    from method_pipelines import CARD_FAMILIES, card_setting

    rows = []
    for card in ("caphuman", *CARD_FAMILIES):
        steps = 20 if card == "caphuman" else card_setting(card)["steps"]
        if card in found:
            m = found[card]
            rows.append({"card": card, "stock": m.get("stock"), "ours": m.get("ours"), "estimate": "", "steps": steps})
            continue
        family = CARD_FAMILIES.get(card)
        same = lambda c, f=family: c in CARD_FAMILIES and (CARD_FAMILIES[c].base, CARD_FAMILIES[c].controlnet) == (f.base, f.controlnet)  # noqa: E731
        peers = [c for c in found if same(c)] if family else []
        note = "estimate from " + (peers[0] if peers else "")
        if family and not peers:
            peers = [c for c in found if c in CARD_FAMILIES and CARD_FAMILIES[c].base == family.base]
            if peers:
                note = f"estimate from {peers[0]} " + ("(without ControlNet: hours are a lower bound)" if family.controlnet
                                                       else "(with ControlNet: hours are an upper bound)")
        if not peers:
            rows.append({"card": card, "stock": None, "ours": None, "estimate": "not measured", "steps": steps})
            continue
        m = found[peers[0]]
        per_image = {k: m.get(f"{k}_ms") and m[f"{k}_ms"] * steps / 1e3 for k in ("stock", "ours")}
        rows.append({"card": card, "steps": steps, "estimate": note,
                     **{k: round(1 / v, 3) if v else None for k, v in per_image.items()}})
    return rows


def hours(rate: float | None) -> float | None:
    return FULL_SPLIT_IMAGES / rate / 3600 if rate else None


def markdown(rows: list[dict], device: str) -> str:
    def fmt(value, digits=2):
        return "—" if value is None else f"{value:.{digits}f}"

    lines = [f"Device: {device}. Full split = {FULL_SPLIT_IMAGES:,} images per card; generation only.", "",
             "| card | steps | stock images/s | ours images/s | ours / stock | GPU-hours, stock | GPU-hours, ours | how |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["ours"] / r["stock"] if r["ours"] and r["stock"] else None
        lines.append(f"| `{r['card']}`{'¹' if r['card'] in TABLE1 else ''} | {r['steps']} | {fmt(r['stock'])} | {fmt(r['ours'])} | "
                     f"{fmt(ratio) + '×' if ratio else '—'} | {fmt(hours(r['stock']), 1)} | {fmt(hours(r['ours']), 1)} | {r['estimate'] or 'measured'} |")
    lines.append("")
    for title, cards in (("paper's Table 1 rows (¹)", TABLE1), ("all 22 cards (`reference` costs nothing)", [r["card"] for r in rows])):
        chosen = [r for r in rows if r["card"] in cards]
        for key in ("stock", "ours"):
            known = [hours(r[key]) for r in chosen if r[key]]
            missing = len(chosen) - len(known)
            total = sum(known)
            lines.append(f"* {title}, {key}: **{total:.1f} GPU-hours** on one GPU, **{total / 4:.1f} hours** on one 4-GPU node "
                         f"(perfect scaling){f'; {missing} card(s) without a figure left out' if missing else ''}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="bench_run.py generation outputs (one device)")
    parser.add_argument("--out", type=Path, help="write the markdown here (default: stdout)")
    args = parser.parse_args()
    found, device = measurements(args.json)
    text = markdown(cost_rows(found), device)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
