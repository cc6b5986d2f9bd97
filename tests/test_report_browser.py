"""The HTML reports (study and evaluation): content checks, and a real headless Chromium that loads
every image and measures whether the page fits its window (no sideways scrolling).

The browser tests need the Debian package ``chromium`` (``/usr/bin/chromium``) and skip without it.
Chromium runs as a subprocess on a copy of the page with an injected ``<script>`` that, on
``load``, writes its measurements as JSON into ``<pre id="probe">``; ``--dump-dom`` prints the
DOM after the load, and the test reads the JSON back.
"""

from __future__ import annotations

import html as htmllib
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_fixtures import GF_METRIC, HEADLINE, make_evaluation, make_study  # noqa: E402

from atlasmix.errors import AtlasmixError  # noqa: E402
from atlasmix.evaluation.plotting import wrap_label  # noqa: E402
from atlasmix.study.curves import curves_plot  # noqa: E402
from atlasmix.study.figures import baseline_plot, delta_heatmap, mean_heatmap  # noqa: E402
from atlasmix.study.report import render_study_report  # noqa: E402
from atlasmix.study.report_format import NOT_BEATING  # noqa: E402


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A synthetic study folder and its rendered report (``report.html`` inside the folder)."""
    info = make_study(tmp_path_factory.mktemp("study") / "out")
    rep = render_study_report(info["dir"])
    return info, rep


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """A synthetic evaluation folder and its rendered report."""
    from atlasmix.evaluation.report import render_report

    d = tmp_path_factory.mktemp("evaluation")
    res = make_evaluation(d / "res", n_models=8)
    rep = render_report(res, d / "rep" / "report.html")
    return res, rep


class _Tables(HTMLParser):
    """Every ``<table>`` of a page: a list of rows, a row a list of (text, class) cells, with the
    ``<tr>`` class and the nearest preceding ``<h2>`` / ``<h3>`` text as the table's title."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self._head = None
        self._title = ""
        self._cell = None
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("h2", "h3"):
            self._head = ""
        elif tag == "table":
            self.tables.append({"title": self._title, "rows": []})
        elif tag == "tr" and self.tables:
            self._row = {"cls": a.get("class") or "", "cells": []}
            self.tables[-1]["rows"].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = [tag, a.get("class") or "", ""]
            self._row["cells"].append(self._cell)
        elif tag == "br" and self._cell is not None:
            self._cell[2] += "\n"

    def handle_endtag(self, tag):
        if tag in ("h2", "h3") and self._head is not None:
            self._title, self._head = self._head.strip(), None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._head is not None:
            self._head += data
        if self._cell is not None:
            self._cell[2] += data


def tables_of(page: str) -> list[dict]:
    p = _Tables()
    p.feed(page)
    return p.tables


def _table(tabs: list[dict], title: str) -> dict:
    found = [t for t in tabs if t["title"] == title]
    assert found, f"no table titled {title!r}; titles: {[t['title'] for t in tabs]}"
    return found[0]


# ---------------------------------------------------------------------------------------------- unit tests
def test_study_report_figures_exist_and_are_on_the_page(study):
    info, rep = study
    page = Path(rep["html"]).read_text()
    assert Path(rep["html"]) == info["dir"] / "report.html"
    names = [Path(f).name for f in rep["figures"]]
    assert names == ["report_heatmap_means.png", "report_heatmap_deltas.png", "report_curves.png",
                     "report_scaling.png", "report_baselines.png"]
    for f in rep["figures"]:
        assert Path(f).is_file() and Path(f).stat().st_size > 5000 and Path(f).parent == info["dir"]
        assert f'src="{Path(f).name}"' in page
    # the sections come in the order of the brief
    heads = re.findall(r"<h2 id=\"([^\"]+)\"", page)
    assert heads == ["checks", "means0", "deltas0", "curves", "scaling0", "baselines", "summary", "delta_table"]
    # header: name, runs, seeds, budget, the metric explained
    page = page.replace("<wbr>", "")
    assert "synthetic_blood_composition" in page and f"<dd>{info['n_runs']} (" in page
    assert "<dd>0, 1, 2</dd>" in page and "cells=200000" in page
    for words in ("Pearson r", "log1p(CP10k)", "top 1,000", "median over cells", "mean of that median over seeds",
                  "two-level bootstrap"):
        assert words in page, words
    # no table outside a sideways-scrolling wrapper
    assert page.count("<table") == page.count('<div class="wrap"><table')


def test_sanity_checks_table_marks_the_failed_check(study):
    info, rep = study
    page = Path(rep["html"]).read_text()
    checks = json.loads((info["dir"] / "checks.json").read_text())
    tab = _table(tables_of(page), "Sanity checks")
    rows = tab["rows"][1:]
    assert len(rows) == len(checks)
    status = {r["cells"][1][2].replace("\n", ""): (r["cls"], r["cells"][0][2]) for r in rows}
    for c in checks:
        want = "not applicable" if c["applicable"] is False else "passed" if c["passed"] else "FAILED"
        assert status[c["name"]][1] == want, c["name"]
    assert status[info["failed_check"]] == ("failed", "FAILED")
    assert sum(r["cls"] == "failed" for r in rows) == 1
    assert "1 FAILED</b>" in page and 'class="banner bad"' in page


def test_baseline_label_in_table_and_figure(study, tmp_path):
    info, rep = study
    page = Path(rep["html"]).read_text()
    tab = _table(tables_of(page), f"Scores and baselines: geneformer, {GF_METRIC}")
    labelled = {(r["cells"][0][2].replace("\n", ""), r["cells"][1][2].replace("\n", ""))
                for r in tab["rows"][1:] if NOT_BEATING in r["cells"][-1][2]}
    assert labelled == set(info["gf_not_beating"]) and labelled
    assert len(tab["rows"]) - 1 == 2 * len(info["eval_sets"])  # every geneformer row, beating ones too
    knn = _table(tables_of(page), "Scores and baselines: ldvae, knn_macro_f1")
    assert len(knn["rows"]) - 1 == len(info["mixtures"]) * len(info["eval_sets"])
    assert not any(NOT_BEATING in r["cells"][-1][2] for r in knn["rows"][1:])
    # the figure labels exactly the rows that do not beat their baseline
    summ = pd.read_parquet(info["dir"] / "summary.parquet")
    fig = baseline_plot(summ, tmp_path / "b.png")
    assert {(m, e) for _, m, e, _ in fig["not_beating"]} == set(info["gf_not_beating"])
    # a heatmap of such a metric labels them too (double dagger), never as a plain result
    hm = mean_heatmap(summ, tmp_path / "h.png", metric=GF_METRIC, model_kind="geneformer")
    assert set(hm["not_beating"]) == set(info["gf_not_beating"])
    # and the summary table of that metric carries the label in the same cells
    piv = _table(tables_of(page), f"geneformer: {GF_METRIC}")
    cols = [c[2].replace("\n", "") for c in piv["rows"][0]["cells"]]
    cells = {(r["cells"][0][2], cols[j]) for r in piv["rows"][1:] for j, c in enumerate(r["cells"])
             if NOT_BEATING in c[2]}
    assert cells == set(info["gf_not_beating"])


def test_deltas_marked_where_interval_excludes_zero(study, tmp_path):
    info, rep = study
    dl = pd.read_parquet(info["dir"] / "deltas.parquet")
    d = dl[(dl["metric"] == HEADLINE) & (dl["model_kind"] == "ldvae")]
    want = {(r.mixture, r.eval_set) for r in d.itertuples() if r.excludes_zero}
    assert 0 < len(want) < len(d)  # the fixture has both kinds of cells
    fig = delta_heatmap(dl, tmp_path / "d.png")
    assert set(fig["marked"]) == want and fig["reference"] == info["reference"]
    assert info["reference"] not in fig["rows"]
    page = Path(rep["html"]).read_text()
    assert f"Paired deltas vs the reference {info['reference']}" in page
    piv = _table(tables_of(page), f"ldvae: {HEADLINE}, vs {info['reference']}")
    cols = [c[2].replace("\n", "") for c in piv["rows"][0]["cells"]]
    marked = {(r["cells"][0][2], cols[j]) for r in piv["rows"][1:] for j, c in enumerate(r["cells"])
              if "excl" in c[1].split()}
    assert marked == want
    starred = {(r["cells"][0][2], cols[j]) for r in piv["rows"][1:] for j, c in enumerate(r["cells"])
               if j and c[2].split("\n")[0].endswith("*")}
    assert starred == want


def test_undertrained_and_curve_fallback(study, tmp_path):
    info, rep = study
    summ = pd.read_parquet(info["dir"] / "summary.parquet")
    hm = mean_heatmap(summ, tmp_path / "h.png", reference=info["reference"])
    assert hm["rows"][0] == info["reference"] and len(hm["rows"]) == len(info["mixtures"])
    assert set(hm["undertrained"]) == {(info["undertrained"], e) for e in info["eval_sets"]}
    assert not hm["not_beating"]
    cur = pd.read_parquet(info["dir"] / "curves.parquet")
    cv = curves_plot(cur, tmp_path / "c.png", undertrained={("ldvae", info["undertrained"])})
    assert cv["train_fallback"] == [info["no_validation_run"]]
    assert len(cv["panels"]) == len(info["mixtures"]) + 2  # + two Geneformer mixtures
    assert sum(p.endswith("\u2020") for p in cv["panels"]) == 1
    page = Path(rep["html"]).read_text()
    piv = _table(tables_of(page), f"ldvae: {HEADLINE}")
    daggers = {r["cells"][0][2] for r in piv["rows"][1:] if any("\u2020" in c[2] for c in r["cells"][1:])}
    assert daggers == {info["undertrained"]}


def test_scaling_section_and_smallest_table(study):
    info, rep = study
    page = Path(rep["html"]).read_text()
    sm = pd.read_parquet(info["dir"] / "scaling_smallest.parquet")
    tab = _table(tables_of(page), "Smallest fraction within 95 % of the best score")
    cols = [c[2].replace("\n", "") for c in tab["rows"][0]["cells"]]
    got = {(r["cells"][0][2].replace("\n", ""), cols[j]): float(c[2].split("\n")[0])
           for r in tab["rows"][1:] for j, c in enumerate(r["cells"]) if j}
    want = {(r.strategy, r.eval_set): r.smallest_fraction for r in sm.itertuples()}
    assert got == want


def test_study_without_scaling_or_checks(tmp_path):
    info = make_study(tmp_path / "s", mixtures=["ref", "other_mixture"], eval_sets=["e1"], seeds=(0,), scaling=False,
                      n_points=5)
    (info["dir"] / "checks.json").unlink()
    rep = render_study_report(info["dir"], out=tmp_path / "elsewhere" / "page.html", title="small")
    names = [Path(f).name for f in rep["figures"]]
    assert names == ["page_heatmap_means.png", "page_heatmap_deltas.png", "page_curves.png", "page_baselines.png"]
    assert all(Path(f).parent == tmp_path / "elsewhere" for f in rep["figures"])
    page = rep["html"].read_text()
    assert "No <code>checks.json</code>" in page and "Subset-size scaling" not in page


def test_not_a_study_folder(tmp_path):
    with pytest.raises(AtlasmixError, match="not a study output folder"):
        render_study_report(tmp_path)
    info = make_study(tmp_path / "s", mixtures=["a", "b"], eval_sets=["e"], seeds=(0,), scaling=False, n_points=3)
    s = pd.read_parquet(info["dir"] / "summary.parquet").drop(columns=["lo"])
    s.to_parquet(info["dir"] / "summary.parquet")
    with pytest.raises(AtlasmixError, match=r"lacks the columns \['lo'\]"):
        render_study_report(info["dir"])


def test_wrap_label():
    assert wrap_label("base_plus_bone_marrow_balanced", 16) == "base_plus_bone_\nmarrow_balanced"
    assert wrap_label("pbmc3k", 16) == "pbmc3k"
    w = wrap_label("base_plus_all_non_blood_sources_balanced", 12)
    assert w.replace("\n", "") == "base_plus_all_non_blood_sources_balanced"
    assert all(len(x) <= 12 for x in w.split("\n"))


def test_evaluation_report_figures_and_wrapped_tables(evaluation):
    res, rep = evaluation
    page = Path(rep["html"]).read_text()
    names = sorted(Path(f).name for f in rep["figures"])
    assert names == ["report_few_shot.png", "report_heatmap.png", "report_knn.png", "report_per_cell_0.png",
                     "report_per_cell_1.png", "report_per_cell_2.png", "report_rank_prediction.png"]
    for f in rep["figures"]:
        assert Path(f).stat().st_size > 5000 and f'src="{Path(f).name}"' in page
    assert page.count("<table") == page.count('<div class="wrap"><table') > 0
    # the box plot widens with the number of models
    from PIL import Image

    from atlasmix.evaluation.report import per_cell_boxplot

    pc = pd.read_parquet(res / "per_cell.parquet")
    e = pc["eval_set"].iloc[0]
    few = pc[pc["model"].isin(sorted(pc["model"].unique())[:2])]
    small, big = res.parent / "few.png", res.parent / "many.png"
    per_cell_boxplot(few, e, small)
    per_cell_boxplot(pc, e, big)
    assert Image.open(big).size[0] > Image.open(small).size[0] + 300


# ---------------------------------------------------------------------------------------------- browser
def chromium_binary() -> str | None:
    """``/usr/bin/chromium``, else ``chromium`` on PATH, else None."""
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


needs_chromium = pytest.mark.skipif(chromium_binary() is None,
                                    reason="headless Chromium is absent (apt-get install -y chromium)")

_PROBE = """<script>
window.addEventListener("load", function () {
  var vw = window.innerWidth;
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {src: i.getAttribute("src"), complete: i.complete, natural_width: i.naturalWidth,
            shown_width: Math.round(i.getBoundingClientRect().width)};
  });
  var wide = [];
  document.querySelectorAll("body *").forEach(function (e) {
    var r = e.getBoundingClientRect();
    if (r.right > vw + 0.5 && wide.length < 8) {
      wide.push(e.tagName.toLowerCase() + (e.className ? "." + e.className : "") + " right=" + Math.round(r.right)
                + " " + (e.textContent || "").trim().slice(0, 40));
    }
  });
  var out = {inner_width: vw, scroll_width: document.documentElement.scrollWidth, images: imgs, too_wide: wide};
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.style.whiteSpace = "pre-wrap";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def probe(page: Path, width: int, tmp: Path, height: int = 900) -> dict:
    """Load ``page`` in headless Chromium at ``width`` x ``height`` and return the probe's measurements.

    A copy of the page with the probe script is written beside it (relative image paths resolve as
    in the original) and removed afterwards.

    Returns
    -------
    dict
        ``inner_width``, ``scroll_width`` (px), ``images`` (``src``, ``complete``, ``natural_width``,
        ``shown_width``), ``too_wide`` (up to 8 elements that reach past the window's right edge).
    """
    text = page.read_text()
    assert "</body>" in text
    copy = page.parent / f"_probe_{width}_{page.name}"
    copy.write_text(text.replace("</body>", _PROBE + "</body>", 1))
    profile = tmp / f"chromium-profile-{width}-{page.stem}"
    cmd = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
           f"--window-size={width},{height}", "--virtual-time-budget=10000", "--dump-dom", copy.resolve().as_uri()]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    finally:
        copy.unlink()
        shutil.rmtree(profile, ignore_errors=True)
    m = re.search(r'<pre id="probe"[^>]*>(.*?)</pre>', r.stdout, re.S)
    assert m, f"no probe output (rc {r.returncode}); stderr tail: {r.stderr[-1500:]}"
    return json.loads(htmllib.unescape(m.group(1)))


def failed_images(m: dict) -> list[str]:
    return [i["src"] for i in m["images"] if not i["complete"] or i["natural_width"] <= 0]


def assert_page_ok(m: dict, width: int, n_images: int) -> None:
    assert m["inner_width"] == width
    assert len(m["images"]) == n_images
    assert not failed_images(m), f"images that did not load: {failed_images(m)}"
    assert all(0 < i["shown_width"] <= width for i in m["images"]), m["images"]
    assert m["scroll_width"] <= m["inner_width"], f"page scrolls sideways: {m['scroll_width']} > " \
                                                  f"{m['inner_width']}; too wide: {m['too_wide']}"


@needs_chromium
@pytest.mark.parametrize("width", [1280, 800])
def test_study_report_in_chromium(study, width, tmp_path):
    _, rep = study
    m = probe(Path(rep["html"]), width, tmp_path)
    assert_page_ok(m, width, len(rep["figures"]))


@needs_chromium
@pytest.mark.parametrize("width", [1280, 800])
def test_evaluation_report_in_chromium(evaluation, width, tmp_path):
    _, rep = evaluation
    m = probe(Path(rep["html"]), width, tmp_path)
    assert_page_ok(m, width, len(rep["figures"]))


@needs_chromium
def test_probe_detects_a_missing_figure(study, tmp_path):
    """The check itself fails when it should: a report whose curves PNG is gone."""
    info, _ = study
    d = tmp_path / "copy"
    shutil.copytree(info["dir"], d)
    (d / "report_curves.png").unlink()
    m = probe(d / "report.html", 1280, tmp_path)
    assert failed_images(m) == ["report_curves.png"]
    with pytest.raises(AssertionError, match="did not load"):
        assert_page_ok(m, 1280, 5)


@needs_chromium
def test_probe_detects_a_page_wider_than_the_window(tmp_path):
    """The width check fails on a table that is not wrapped (and passes once it is)."""
    wide = "<table><tr>" + "".join(f"<td>column_{i}_{'x' * 30}</td>" for i in range(12)) + "</tr></table>"
    bad = tmp_path / "bad.html"
    bad.write_text(f"<!doctype html><html><body style='max-width:1200px'>{wide}</body></html>")
    m = probe(bad, 800, tmp_path)
    assert m["scroll_width"] > m["inner_width"] == 800 and m["too_wide"]
    with pytest.raises(AssertionError, match="scrolls sideways"):
        assert_page_ok(m, 800, 0)
    good = tmp_path / "good.html"
    good.write_text(f"<!doctype html><html><body style='max-width:1200px'>"
                    f"<div style='overflow-x:auto'>{wide}</div></body></html>")
    assert_page_ok(probe(good, 800, tmp_path), 800, 0)


def test_probe_helpers_without_a_browser():
    """The verdict functions on made-up measurements (they run where Chromium is absent, too)."""
    ok = {"inner_width": 800, "scroll_width": 800, "too_wide": [],
          "images": [{"src": "a.png", "complete": True, "natural_width": 10, "shown_width": 10}]}
    assert_page_ok(ok, 800, 1)
    broken = dict(ok, images=[dict(ok["images"][0], natural_width=0)])
    assert failed_images(broken) == ["a.png"]
    with pytest.raises(AssertionError):
        assert_page_ok(broken, 800, 1)
    with pytest.raises(AssertionError):
        assert_page_ok(dict(ok, scroll_width=801), 800, 1)
