"""How the study report writes numbers, intervals, flags and names, in its figures and its tables alike."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from markupsafe import escape

#: label of a score that does not beat its metric's baseline (tables and figures alike)
NOT_BEATING = "does not beat its baseline"


def flag(v: Any) -> bool | None:
    """A True / False flag of a table, None for None / NA."""
    if v is None:
        return None
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        return None
    return bool(v)


def is_false(v: Any) -> bool:
    """True for a False flag (not for None / NA)."""
    return flag(v) is False


def is_true(v: Any) -> bool:
    """True for a True flag (not for None / NA)."""
    return flag(v) is True


def fmt(v: Any, nd: int = 3) -> str:
    """``v`` with ``nd`` decimals; "" for NaN / inf / None, ``str(v)`` for a non-number."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    return "" if not math.isfinite(f) else f"{f:.{nd}f}"


def ci(lo: Any, hi: Any, nd: int = 3) -> str:
    """``[lo, hi]`` with ``nd`` decimals; "" unless both ends are finite numbers."""
    a, b = fmt(lo, nd), fmt(hi, nd)
    return f"[{a}, {b}]" if a and b else ""


def order(values, first: str | None = None) -> list:
    """Unique values in first-seen order, ``first`` moved to the front."""
    out = list(dict.fromkeys(v for v in values))
    if first is not None and first in out:
        out.remove(first)
        out.insert(0, first)
    return out


def budgets_of(df: pd.DataFrame) -> list:
    """The budgets of a table (str), in first-seen order."""
    return order(df["budget"].astype(str)) if "budget" in df and not df.empty else []


def esc(s: Any) -> str:
    """``s`` as HTML-escaped text ("" for None)."""
    return str(escape("" if s is None else str(s)))


def wbr(s: Any) -> str:
    """Escaped text with line-break opportunities after underscores and slashes."""
    return esc(s).replace("_", "_<wbr>").replace("/", "/<wbr>")
