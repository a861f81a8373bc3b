"""Snakemake's HTML report of a finished demo run, rendered in headless Chromium.

`snakemake --report` packs every `report()` output (tables, plots, captions) into one
self-contained HTML file whose page is built by JavaScript. Chromium loads it offline,
runs the scripts, and dumps the resulting DOM; its console (`--enable-logging=stderr`)
shows any script error. Needs `chromium` (Debian package; .ci/run installs it).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from _workflow import snakemake

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs chromium (apt-get install chromium)"
)

CONSOLE = re.compile(r":CONSOLE[^\]]*\] \"(.*)\", source: (.*)$", re.M)


def render(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """``(DOM after the page's scripts ran, console messages that report errors)``."""
    p = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp / 'chromium-profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    errors = [
        f"{msg} ({src})"
        for msg, src in CONSOLE.findall(p.stderr)
        if re.search(r"Uncaught|Error|error", msg)
    ]
    return p.stdout, errors


def test_console_errors_are_caught(tmp_path):
    """The check itself: a page with a script error is reported as one."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><p id=x>a</p><script>x.textContent='ran'; nope();</script>")
    dom, errors = render(page, tmp_path)
    assert '<p id="x">ran</p>' in dom
    assert any("Uncaught ReferenceError: nope is not defined" in e for e in errors)


def test_snakemake_html_report_renders(demo, tmp_path):
    snakemake(demo, "--report", "results/report.html")
    page = demo / "results/report.html"
    html = page.read_text(encoding="utf-8")
    # Every report() output is packed in, with its caption.
    for name in (
        "merge_eval_pivot.csv",
        "merge_eval_report.html",
        "merge_eval_scores.png",
        "method_ranking.png",
    ):
        assert name in html, name
    # The plots and the report page travel inside the file, as data URIs.
    for mime, name in (
        ("image/png", "merge_eval_scores.png"),
        ("image/png", "method_ranking.png"),
        ("text/html", "merge_eval_report.html"),
    ):
        assert re.search(rf"data:{mime};[^,\"]*filename={re.escape(name)};base64,", html), name
    assert "paired-bootstrap" in html  # from the captions (report/*.rst)
    dom, errors = render(page, tmp_path)
    assert errors == [], errors
    # The page was built by its scripts: the app's navigation is in the rendered DOM (the
    # raw file's <div id="app"> is empty; script bodies are left out of the check).
    shown = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    app = shown[shown.index('<div id="app">') :]
    text = re.sub(r"<[^>]+>", " ", re.sub(r'src="data:[^"]*"', "", app))
    assert {"Workflow", "Statistics", "Results"} <= set(text.split()), text[:500]
    # What a click on the report page shows: our HTML report, with its tables and plots.
    m = re.search(r"data:text/html;[^,\"]*filename=merge_eval_report\.html;base64,([^\"]+)", html)
    inner = tmp_path / "inner.html"
    inner.write_bytes(base64.b64decode(m.group(1)))
    dom, errors = render(inner, tmp_path)
    assert errors == [], errors
    assert dom.count("<table>") >= 1 + 3 * 2  # ranking; per size: scores, retention, oracles
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 2
    assert "within noise" in dom and "oracle − base (pp)" in dom
