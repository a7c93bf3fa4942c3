"""Figures and how they are printed: percentiles, markdown tables, numbers formatted for them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile; NaN for no values (a step that delivered nothing)."""
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def p50_p95(values: Sequence[float]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 95)


def fmt(value: float, digits: int = 1) -> str:
    """`value` with `digits` decimals; "n/a" for NaN (no data)."""
    return "n/a" if value != value else f"{value:.{digits}f}"


def rate(per_s: float) -> str:
    """A rate with 2 decimals below 10, 1 above (same significance either side)."""
    return f"{per_s:.2f}" if per_s < 10 else f"{per_s:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A markdown table; `align` has one of l / r / c per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
