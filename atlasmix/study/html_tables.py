"""HTML tables of the study report: mixtures x eval sets pivots, every row, scores beside baselines, checks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from atlasmix.study.report_format import NOT_BEATING, ci, esc, fmt, is_false, is_true, order, wbr
from atlasmix.study.tables import CHECK_KEYS


def pivot_html(d: pd.DataFrame, value: str, *, rows_first: str | None = None, mark: str | None = None,
                flags: bool = False, signed: bool = False) -> str:
    """Mixtures (rows) x eval sets (columns): value with ``[lo, hi]`` in small text beneath.

    ``mark``: a boolean column; marked cells get class ``excl`` and an asterisk. ``flags``:
    dagger for undertrained, the :data:`~atlasmix.study.report_format.NOT_BEATING` label for beats_baseline False.
    """
    multi_b = d["budget"].nunique() > 1
    d = d.assign(row_label=d["mixture"].astype(str) + ((" @ " + d["budget"].astype(str)) if multi_b else ""))
    rows = order(d["row_label"], rows_first)
    cols = order(d["eval_set"])
    cell = {(r.row_label, r.eval_set): r for r in d.itertuples()}
    h = ['<table><tr><th class="l">mixture</th>' + "".join(f"<th>{wbr(c)}</th>" for c in cols) + "</tr>"]
    for rw in rows:
        tds = []
        for c in cols:
            r = cell.get((rw, c))
            if r is None:
                tds.append("<td></td>")
                continue
            v = getattr(r, value)
            txt = fmt(v)
            if signed and txt:
                txt = f"{float(v):+.3f}"
            cls = ""
            if mark and is_true(getattr(r, mark)):
                cls, txt = ' class="excl"', txt + "*"
            extra = ""
            if flags:
                if is_true(getattr(r, "undertrained")):
                    txt += "\u2020"
                if is_false(getattr(r, "beats_baseline")):
                    extra = f'<br><span class="notbeat">{NOT_BEATING}</span>'
            tds.append(f"<td{cls}>{txt}<br><small>{ci(r.lo, r.hi)}</small>{extra}</td>")
        h.append(f'<tr><td class="l mix">{esc(rw)}</td>' + "".join(tds) + "</tr>")
    h.append("</table>")
    return "\n".join(h)


def long_html(df: pd.DataFrame, cols: list[str], *, notbeat: bool = False, mark: str | None = None) -> str:
    h = ["<table><tr>" + "".join(f'<th class="{"l" if df[c].dtype == object else ""}">{wbr(c)}</th>'
                                 for c in cols) + ("<th class=\"l\">label</th>" if notbeat else "") + "</tr>"]
    for r in df.itertuples(index=False):
        rd = r._asdict()
        cls = ' class="excl"' if mark and is_true(rd.get(mark)) else ""
        tds = []
        for c in cols:
            v = rd[c]
            if isinstance(v, (float, np.floating)):
                tds.append(f"<td>{fmt(v)}</td>")
            elif isinstance(v, (bool, np.bool_)) or v is None:
                tds.append(f'<td class="l">{"" if v is None else str(bool(v))}</td>')
            else:
                tds.append(f'<td class="l">{wbr(v)}</td>' if isinstance(v, str) else f"<td>{esc(v)}</td>")
        if notbeat:
            tds.append(f'<td class="l"><span class="notbeat">{NOT_BEATING}</span></td>'
                       if is_false(rd.get("beats_baseline")) else "<td></td>")
        h.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    h.append("</table>")
    return "\n".join(h)


def baseline_table(d: pd.DataFrame) -> str:
    """Rows of one (model kind, metric): mixture, eval set, [budget], seeds, score, interval, baseline, verdict."""
    multi_b = d["budget"].nunique() > 1
    h = ['<table><tr><th class="l">mixture</th><th class="l">eval set</th>' +
         ('<th class="l">budget</th>' if multi_b else "") +
         "<th>seeds</th><th>score</th><th>95 % interval</th><th>baseline</th><th class=\"l\">verdict</th></tr>"]
    for r in d.itertuples():
        verdict = (f'<span class="notbeat">{NOT_BEATING}</span>' if is_false(r.beats_baseline)
                   else "beats its baseline" if is_true(r.beats_baseline) else "")
        h.append(f'<tr><td class="l">{wbr(r.mixture)}</td><td class="l">{wbr(r.eval_set)}</td>' +
                 (f'<td class="l">{esc(r.budget)}</td>' if multi_b else "") +
                 f"<td>{esc(r.n_seeds)}</td><td>{fmt(r.mean)}</td><td><small>{ci(r.lo, r.hi)}</small></td>"
                 f'<td>{fmt(r.baseline)}</td><td class="l">{verdict}</td></tr>')
    h.append("</table>")
    return "\n".join(h)


def smallest_fraction_table(smallest: pd.DataFrame) -> str:
    """Strategies (rows) x eval sets (columns) of one scaling group: the smallest sufficient fraction
    with the best mean beneath (rows of ``scaling_smallest.parquet``)."""
    piv = smallest.pivot_table(index="strategy", columns="eval_set", values="smallest_fraction", aggfunc="first",
                               sort=False)
    h = ['<table><tr><th class="l">strategy</th>' + "".join(f"<th>{wbr(c)}</th>" for c in piv.columns) + "</tr>"]
    for st, r in piv.iterrows():
        best = smallest[smallest["strategy"] == st].set_index("eval_set")
        h.append(f'<tr><td class="l">{wbr(st)}</td>' + "".join(
            f"<td>{'' if not np.isfinite(v) else f'{v:g}'}<br><small>best "
            f"{fmt(best['best_mean'].get(c))}</small></td>" for c, v in r.items()) + "</tr>")
    h.append("</table>")
    return "\n".join(h)


def check_rows(raw: list) -> list[dict]:
    """The rows of the sanity-check table: every check dict of ``checks.json`` with its ``status``
    (passed / FAILED / not applicable) and CSS class."""
    out = []
    for c in raw:
        if not isinstance(c, dict):
            continue
        if c.get("applicable") is False:
            status, css = "not applicable", "na"
        elif c.get("passed") is True:
            status, css = "passed", "passed"
        else:
            status, css = "FAILED", "failed"
        out.append({"status": status, "css": css, **{k: "" if c.get(k) is None else c.get(k) for k in CHECK_KEYS}})
    return out
