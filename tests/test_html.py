"""`bench report`'s HTML page (bench.report.html) on a results folder of tiny real runs, an audit and a toy paper: valid
HTML, every number equal to the CSV's, links and images that resolve; then in headless Chromium (Debian's, driven
by Playwright; skipped where it is absent): no failed request, every image loads, sorting, folding, filtering,
a screenshot; and a page of 1,000 runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from xml.etree.ElementTree import Element

import html5lib
import pandas as pd
import pytest

from bench.grid.store import Store
from bench.report import build_report, html
from bench.report.frame import load_frame
from bench.report.tables import stats
from tests.conftest import TESTS, TINY_PROFILE, bench
from tests.many_runs import write_runs
from tests.test_paper import toy_reference

PLUGINS = [
    "--plugin",
    str(TESTS / "plugins" / "good_plugin.py"),
    "--plugin",
    str(TESTS / "plugins" / "partial_plugin.py"),
]
TOY_PAPER = """
[papers.toy-html]
title = "A toy paper for the HTML page"
venue = "tests"

[[papers.toy-html.tables]]
name = "main"
caption = "accuracy and fidelity"
methods = ["noisy-means"]
datasets = ["synthetic"]
eps = [1, 10]
delta = 1e-5
metrics = { acc = "acc_logreg", fd = "fd_domain" }
"""
TOY_ROWS = """paper,method,setting,dataset,epsilon,delta,metric,protocol,source_kind,value,source
toy-html,noisy-means,,synthetic,1,1e-5,acc,dpdm,primary,{acc1},"toy (a)"
toy-html,noisy-means,,synthetic,10,1e-5,acc,dpdm,primary,{acc10},"toy (a)"
toy-html,noisy-means,,synthetic,10,1e-5,fd,other:toy-fd,primary,3.5,"toy (b)"
"""


def chromium() -> str | None:
    path = os.environ.get("BENCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and Path(path).is_file() else None


def parse(text: str) -> Element:
    """The page as an element tree; html5lib in strict mode raises on any HTML parse error."""
    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(text)


def cell_texts(table: Element) -> tuple[list[str], list[list[str]]]:
    """Header and the first row of each <tbody> of a page table (the folded card rows left out)."""
    head = ["".join(th.itertext()).strip() for th in table.find("thead").find("tr")]
    rows = []
    for body in table.findall("tbody"):
        tr = body.find("tr")
        rows.append(["".join(td.find("span").itertext()) for td in tr.findall("td")])
    return head, rows


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[dict[str, Any]]:
    """Two plugin methods × ε 1, 10 × seeds 0, 1 on synthetic, an audit, a toy paper compared through
    `bench paper`, and `bench report` (every format, plots) into reports/."""
    base = tmp_path_factory.mktemp("site")
    results, out = base / "results", base / "reports"
    r = bench("run", "--methods", "noisy-means,partial-means", "--eps", "1,10", "--seeds", "0,1", "--dataset",
              "synthetic", "--profile", TINY_PROFILE, "--device", "cpu", "--results", str(results), "--metrics",
              "fd_domain,acc_logreg", *PLUGINS)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = bench("audit", "--methods", "noisy-copies", "--eps", "1", "--dataset", "synthetic", "--canaries", "40",
              "--samples", "200", "--plugin", str(TESTS / "plugins" / "copies.py"), "--profile", TINY_PROFILE,
              "--results", str(results), "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    ref = base / "reference"
    ref.mkdir()
    (ref / "papers.toml").write_text(TOY_PAPER)
    # published values 2% from ours at ε = 1 and half of ours at ε = 10, so two colours show
    df = load_frame(Store(results))
    ours = df[(df["method"] == "noisy-means") & (df["metric"] == "acc_logreg")]
    acc = {e: stats(ours.loc[ours["eps"] == e, "values"])[0] for e in ("1", "10")}
    (ref / "published_results.csv").write_text(TOY_ROWS.format(acc1=f"{acc['1'] * 1.02:.4f}",
                                                               acc10=f"{acc['10'] * 0.5:.4f}"))  # fmt: skip
    with toy_reference(ref):
        r = bench("paper", "toy-html", "--profile", TINY_PROFILE, "--seeds", "0,1", "--results", str(results),
                  "--device", "cpu", *PLUGINS)  # fmt: skip
        assert r.exit_code == 0, r.output
        r = bench("report", "--results", str(results), "--out", str(out))
        assert r.exit_code == 0, r.output
    yield {"results": results, "out": out, "page": out / "index.html", "stdout": r.stdout, "reference": ref}


def test_report_writes_the_page_and_says_so(site: dict[str, Any]) -> None:
    assert site["page"].is_file()
    assert f"page {site['page']}" in site["stdout"]
    assert (site["results"] / "papers" / "toy-html.json").is_file()  # `bench paper` recorded that it ran here
    assert (site["out"] / "paper-toy-html.csv").is_file()


def test_page_is_valid_html_with_unique_ids(site: dict[str, Any]) -> None:
    text = site["page"].read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    tree = parse(text)
    ids = [e.get("id") for e in tree.iter() if e.get("id")]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for e in tree.iter():  # aria-controls and data-table name elements that exist
        for attr in ("aria-controls", "data-table"):
            if e.get(attr):
                assert e.get(attr) in ids, (attr, e.get(attr))


def test_page_is_self_contained_and_its_links_resolve(site: dict[str, Any]) -> None:
    out, tree = site["out"], parse(site["page"].read_text(encoding="utf-8"))
    assert not tree.findall(".//link") and all(not s.get("src") for s in tree.iter("script"))  # CSS, JS inline
    targets = [e.get("src") for e in tree.iter("img")] + [e.get("href") for e in tree.iter("a")]
    assert len([t for t in targets if t]) > 20
    for target in targets:
        url = urlparse(target)
        assert url.scheme in ("", "file"), target  # nothing leaves the file system
        if url.path:
            assert (out / unquote(url.path)).exists(), target
    keys = {d.name for d in (site["results"] / "runs").iterdir() if (d / "config.json").is_file()}
    linked = {unquote(a.get("href")).rstrip("/").rsplit("/", 1)[-1] for a in tree.iter("a") if a.get("class") == "key"}
    assert {k for k in keys if not k.startswith("audit-")} <= linked  # every run's key links to its folder
    folders = {unquote(a.get("href")).rstrip("/").rsplit("/", 1)[-1] for a in tree.iter("a") if a.get("href")}
    assert keys <= folders  # and every audit's row too
    imgs = [e.get("src") for e in tree.iter("img")]
    assert any("samples_synthetic_eps1" in s for s in imgs) and any("metric_vs_eps_acc_logreg" in s for s in imgs)


def test_every_number_on_the_page_equals_the_csv(site: dict[str, Any]) -> None:
    out, tree = site["out"], parse(site["page"].read_text(encoding="utf-8"))
    tables = {t.get("data-csv"): t for t in tree.iter("table") if t.get("data-csv")}
    assert {"summary.csv", "acc_logreg.csv", "fd_domain.csv", "cost.csv", "audit.csv"} <= set(tables)
    for name, table in tables.items():
        if name.startswith("paper-"):
            continue
        csv = pd.read_csv(out / name, dtype=str, keep_default_na=False)
        head, rows = cell_texts(table)
        assert head == list(csv.columns), name
        assert sorted(rows) == sorted(csv.values.tolist()), name
    # the paper table: published, ours and the difference as the comparison CSV has them
    frame = pd.read_csv(out / "paper-toy-html.csv")
    (table,) = [t for n, t in tables.items() if n == "paper-toy-html.csv"]
    head, rows = cell_texts(table)
    shown = pd.DataFrame(rows, columns=head)
    assert len(shown) == len(frame)
    for (_, row), (_, page) in zip(frame.iterrows(), shown.iterrows(), strict=True):
        assert page["published"] == f"{row['published']:g}"
        if row["n"]:
            assert page["ours"].startswith(f"{row['ours_mean']:.2f}") and f"(n={row['n']})" in page["ours"]
            assert page["ours − published"] == f"{row['diff']:+.2f}"
        else:
            assert page["ours"] == "—" and row["status"] in page["note"]


def test_paper_differences_are_coloured_by_their_relative_size(site: dict[str, Any]) -> None:
    tree = parse(site["page"].read_text(encoding="utf-8"))
    frame = pd.read_csv(site["out"] / "paper-toy-html.csv")
    (table,) = [t for t in tree.iter("table") if t.get("data-csv") == "paper-toy-html.csv"]
    head, _ = cell_texts(table)
    col = head.index("ours − published")
    classes = [body.find("tr").findall("td")[col].get("class") or "" for body in table.findall("tbody")]
    seen = set()
    for cls, (_, row) in zip(classes, frame.iterrows(), strict=True):
        if math.isnan(row["diff"]):
            assert "diff-" not in cls
            continue
        rel = abs(row["diff"]) / abs(row["published"])
        want = "diff-close" if rel <= html.CLOSE else "diff-near" if rel <= html.NEAR else "diff-far"
        assert want in cls.split(), (row["epsilon"], rel, cls)
        seen.add(want)
    assert seen == {"diff-close", "diff-far"}  # ε = 1 published 2% from ours, ε = 10 half of ours


def test_cards_hold_every_stage_of_the_privacy_card(site: dict[str, Any]) -> None:
    tree = parse(site["page"].read_text(encoding="utf-8"))
    privacy = pd.read_csv(site["out"] / "privacy.csv", dtype=str, keep_default_na=False)
    cards = {tr.get("id"): tr for tr in tree.iter("tr") if tr.get("class") == "card"}
    assert cards and all(tr.get("hidden") is not None for tr in cards.values())  # folded
    text = {"".join(tr.itertext()) for tr in cards.values()}
    for stages in privacy["stages"]:  # e.g. "sums (gaussian: σ=3.1, count=2)": its σ and count in a card
        name, rest = stages.split(" (", 1)
        sigma = rest.split("σ=")[1].split(",")[0]
        assert any(name in t and f"σ={sigma}" in t for t in text), stages
    assert any("pixel range of the private data, without noise" in t for t in text)  # partial-means's non-private


def test_html_only_and_bad_format(site: dict[str, Any], tmp_path: Path) -> None:
    r = bench("report", "--results", str(site["results"]), "--out", str(tmp_path), "--format", "html", "--no-plots")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    parse(text)
    assert "--no-plots" in text and "data-csv" not in text  # no CSV beside it to point at
    r = bench("report", "--results", str(site["results"]), "--out", str(tmp_path), "--format", "html,pdf")
    assert r.exit_code == 2 and "error: unknown format 'pdf'; choose from md, csv, tex, html" in r.output


def test_runs_without_a_curve_get_no_curve_section_or_files(site: dict[str, Any]) -> None:
    tree = parse(site["page"].read_text(encoding="utf-8"))
    assert "sec-curves" not in {e.get("id") for e in tree.iter()}
    assert not (site["out"] / "curves.csv").exists() and not list((site["out"] / "plots").glob("curve_*"))


def test_a_page_with_curves_is_valid_and_shows_them(tmp_path: Path, one_thread: None) -> None:
    """Two seeds with `eval.curve=3`: the section's figures (mean and ± std band) and CSV, on a valid page whose
    links resolve."""
    results, out = tmp_path / "results", tmp_path / "reports"
    r = bench("run", "--methods", "step-stamp", "--eps", "10", "--seeds", "0,1", "--dataset", "synthetic", "--profile",
              TINY_PROFILE, "--device", "cpu", "--results", str(results), "--metrics", "fd_domain", "--no-real",
              "--plugin", str(TESTS / "plugins" / "step_stamp.py"), "--set", "eval.curve=3", "--set",
              "eval.curve_n=20", "--set", "eval.curve_metrics=['fd_domain']")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = bench("report", "--results", str(results), "--out", str(out))
    assert r.exit_code == 0, r.output
    tree = parse((out / "index.html").read_text(encoding="utf-8"))
    ids = [e.get("id") for e in tree.iter() if e.get("id")]
    assert len(ids) == len(set(ids)) and "sec-curves" in ids
    section = next(e for e in tree.iter("section") if e.get("id") == "sec-curves")
    imgs = [e.get("src") for e in section.iter("img")]
    assert imgs == ["plots/curve_fd_domain_synthetic_eps10.png"]
    links = [a.get("href") for a in section.iter("a")]
    assert links == ["curves.csv"]
    for target in [*imgs, *links, *(a.get("href") for a in tree.iter("a") if a.get("href") == "#sec-curves")]:
        assert target.startswith("#") or (out / unquote(target)).is_file(), target
    assert len(pd.read_csv(out / "curves.csv")) == 2 * 3  # seeds × points (one metric)


def test_sort_key() -> None:
    assert html.sort_key("0.89 ± 0.01 (n=3)") == "0.89"
    assert html.sort_key("−1.5 (n=1)") == "-1.5" and html.sort_key("1e-05") == "1e-05"
    assert html.sort_key("∞") == "Infinity" and html.sort_key("—") == "" and html.sort_key("dpsad-e2e") == ""


def test_a_thousand_runs_render_in_seconds(tmp_path: Path) -> None:
    """100 (method, ε) rows × 10 seeds: the page (all formats, no plots) within 20 s on 2 cores (about 2 s here)."""
    store = write_runs(tmp_path / "results", methods=[f"m{i}" for i in range(10)],
                       epsilons=[0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256], seeds=list(range(10)))  # fmt: skip
    start = time.perf_counter()
    build_report(store, out=tmp_path / "reports", keys=None, echo=lambda line: None,
                 formats=("md", "csv", "tex", "html"))  # fmt: skip
    seconds = time.perf_counter() - start
    assert seconds < 20, seconds
    tree = parse((tmp_path / "reports" / "index.html").read_text(encoding="utf-8"))
    summary = tree.find(".//table[@id='summary-table']")
    assert len(summary.findall("tbody")) == 100
    assert sum(1 for s in summary.iter("section") if s.get("class") == "run") == 1000


# ---------------------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------------------

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium here: `apt-get install chromium` (make test does so where it runs as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS)
        yield b
        b.close()


def open_page(browser: Any, page: Path) -> tuple[Any, list[str]]:
    """The page loaded from the file system; the list of failed requests and errors it collects."""
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    tab.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    tab.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status}: {r.url}"))
    tab.on("pageerror", lambda e: problems.append(f"error: {e}"))
    tab.on("console", lambda m: m.type in ("error", "warning") and problems.append(f"console: {m.text}"))
    tab.goto(page.as_uri(), wait_until="load")
    return tab, problems


def column(tab: Any, table: str, index: int) -> list[str]:
    cells = f"#{table} > tbody:not([hidden]) > tr:first-child > td:nth-child({index + 1})"
    return tab.eval_on_selector_all(cells, "cells => cells.map(c => c.textContent.trim())")


def test_in_chromium_the_page_loads_sorts_and_folds(site: dict[str, Any], browser: Any) -> None:
    tab, problems = open_page(browser, site["page"])
    images = tab.eval_on_selector_all(
        "img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    assert images and all(done and width > 0 for _, done, width in images), images
    # sorting: click the fd_domain column of the summary: ascending, then descending, empty cells last
    head = tab.eval_on_selector_all("#summary-table > thead th", "ths => ths.map(t => t.textContent.trim())")
    fd = next(i for i, h in enumerate(head) if h.startswith("fd_domain"))
    before = column(tab, "summary-table", fd)
    tab.click(f"#summary-table > thead th:nth-child({fd + 1})")
    up = column(tab, "summary-table", fd)
    numbers = [float(html.sort_key(c)) for c in up if html.sort_key(c)]
    assert numbers == sorted(numbers) and sorted(up) == sorted(before) and up != before
    tab.click(f"#summary-table > thead th:nth-child({fd + 1})")
    down = [float(html.sort_key(c)) for c in column(tab, "summary-table", fd) if html.sort_key(c)]
    assert down == sorted(numbers, reverse=True)
    assert tab.get_attribute(f"#summary-table > thead th:nth-child({fd + 1})", "aria-sort") == "descending"
    # folding: the first row's card opens under it (it moved with its row) and shows the run's key and card
    first = "#summary-table > tbody:first-of-type"
    card = tab.locator(f"{first} > tr.card")
    assert not card.is_visible()
    tab.click(f"{first} button.fold")
    assert card.is_visible() and tab.get_attribute(f"{first} button.fold", "aria-expanded") == "true"
    assert "ε recomputed" in card.inner_text() and card.locator("a.key").count() >= 1
    tab.click(f"{first} button.fold")
    assert not card.is_visible()
    # filtering: only the rows of one method stay
    tab.fill("input.filter", "partial-means")
    shown = column(tab, "summary-table", 0)
    assert shown and all("partial-means" in s for s in shown)
    tab.fill("input.filter", "")
    path = site["out"] / "screenshot.png"
    tab.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not problems, problems
    tab.close()


def test_in_chromium_a_page_of_a_thousand_runs_stays_responsive(tmp_path: Path, browser: Any) -> None:
    """1,000 rows (100 methods × 10 ε, one seed): sorting a column takes well under a second (about 50 ms here)."""
    store = write_runs(tmp_path / "results", methods=[f"m{i:02d}" for i in range(100)],
                       epsilons=[0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256], seeds=[0], samples_for_seed=None)  # fmt: skip
    build_report(store, out=tmp_path / "reports", keys=None, echo=lambda line: None, formats=("html",))
    tab, problems = open_page(browser, tmp_path / "reports" / "index.html")
    ms = tab.evaluate("""() => {
        const th = document.querySelectorAll('#summary-table > thead th')[9];
        const t = performance.now(); th.click(); return performance.now() - t; }""")
    assert tab.eval_on_selector_all("#summary-table > tbody", "b => b.length") == 1000
    values = [float(html.sort_key(c)) for c in column(tab, "summary-table", 9) if html.sort_key(c)]
    assert len(values) == 1000 and values == sorted(values)
    assert ms < 1000, ms
    assert not problems, problems
    tab.close()


def test_a_paper_record_that_cannot_be_read_is_shown_not_fatal(site: dict[str, Any], tmp_path: Path) -> None:
    """The report rebuilds a paper's table from the plan `bench paper` recorded: a plugin file gone since then
    does not matter (nothing is planned again); a record without a plan (an older bench's) is a warning and an
    error paragraph on the page, and the rest of the report is written."""
    results = tmp_path / "results"
    shutil.copytree(site["results"], results)
    record = results / "papers" / "toy-html.json"
    record.write_text(record.read_text().replace("good_plugin.py", "gone_plugin.py"))
    with toy_reference(site["reference"]):
        r = bench("report", "--results", str(results), "--out", str(tmp_path / "gone"), "--no-plots")
    assert r.exit_code == 0 and "warning: paper" not in r.output, r.output
    assert (tmp_path / "gone" / "paper-toy-html.csv").is_file()
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "plan"}))
    with toy_reference(site["reference"]):
        r = bench("report", "--results", str(results), "--out", str(tmp_path / "out"), "--no-plots")
    assert r.exit_code == 0, r.output
    assert "warning: paper toy-html: " in r.output
    tree = parse((tmp_path / "out" / "index.html").read_text(encoding="utf-8"))
    errors = ["".join(p.itertext()) for p in tree.iter("p") if p.get("class") == "error"]
    assert len(errors) == 1 and "holds no plan" in errors[0]
