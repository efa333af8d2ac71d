"""Numbers as they are written: a fixed number of significant digits, so a rerun writes the same bytes
(float sums in another order differ in the 16th digit; four digits do not)."""

from __future__ import annotations

import math

SIGNIFICANT = 4


def round_sig(value, digits: int = SIGNIFICANT):
    """`value` rounded to `digits` significant digits; None / NaN → None; ints and bools unchanged."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return None
    return float(f"{value:.{digits}g}")


def rounded(obj, digits: int = SIGNIFICANT):
    """A JSON-able structure with every float rounded (dicts, lists, tuples walked)."""
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    if isinstance(obj, float):
        return round_sig(obj, digits)
    return obj


def fmt(value, digits: int = SIGNIFICANT) -> str:
    """A number for a table cell: significant digits, no exponent for everyday magnitudes; '–' for none."""
    value = round_sig(value, digits)
    if value is None:
        return "–"
    if isinstance(value, (bool, int)):
        return str(value)
    if value != 0 and abs(value) < 1e-4:
        return f"{value:.{digits - 1}e}"
    return f"{value:#.{digits}g}".rstrip(".")  # '#' keeps trailing zeros: 1.000, 0.5000


def fmt_interval(mean, ci95, digits: int = SIGNIFICANT) -> str:
    """'0.8123 [0.8011, 0.8230]', or the mean alone without an interval."""
    if ci95 is None or any(v is None for v in ci95):
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} [{fmt(ci95[0], digits)}, {fmt(ci95[1], digits)}]"


def fmt_p(p: float | None) -> str:
    """p-value as a reader expects it: 'p < 0.001' or 'p = 0.042'."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p = –"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
