"""Matplotlib set-up shared by the evaluation report and the study report: a headless pyplot, labels
wrapped to a width, figures saved with everything drawn outside their axes."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (imported on first use: matplotlib is slow to
    import and only the reports need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wrap_label(name, width: int = 18) -> str:
    """``name`` broken into lines of at most ``width`` characters at underscores, spaces or hyphens
    (a word longer than ``width`` stays whole)."""
    s = str(name)
    if len(s) <= width:
        return s
    words = s.replace("_", "_\x00").replace(" ", " \x00").replace("-", "-\x00").split("\x00")
    lines, cur = [], ""
    for w in words:
        if cur and len(cur) + len(w.rstrip()) > width:
            lines.append(cur.rstrip())
            cur = ""
        cur += w
    if cur:
        lines.append(cur.rstrip())
    return "\n".join(lines)


def save_figure(fig, path: str | Path, dpi: int) -> None:
    """Write ``fig`` to ``path`` (PNG at ``dpi``) with everything drawn outside the axes (legends,
    rotated labels) kept, and close it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    pyplot().close(fig)
