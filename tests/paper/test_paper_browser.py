"""The paper report in a real browser (headless Chromium driven by playwright): no console errors, every
figure drawn, hover data on the interactive heatmaps, a hostile prompt shown as text, and the static
fallbacks with JavaScript off.

Skipped, with the reason, when playwright or a Chromium is missing (`.ci/run` installs both). Also a script:
``python tests/paper/test_paper_browser.py REPORT.html SHOT.png`` screenshots a report (docs/images/report.png).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

HOSTILE = "<script>window.pwned = 1; alert('pwned')</script> the cat sat"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _skip_reason() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; .ci/run does)"
    if chromium_path() is None:
        return "no Chromium on PATH (apt-get install chromium; .ci/run does)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    import sinkscope as ss
    from helpers import SENTENCES, tiny_model, tiny_plan, word_tokenizer
    from sinkscope.data import Prompt
    from sinkscope.paper import build_report, run_paper
    from sinkscope.paper.plan import Inputs

    out = tmp_path_factory.mktemp("paper-browser")
    prompts = [Prompt(f"p{i}", s, "test") for i, s in enumerate(SENTENCES)] + [Prompt("hostile", HOSTILE, "test")]
    loaded = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    run_paper([loaded], out, tiny_plan(), Inputs(prompts, "prompts.txt"), progress=False,
              only=("scan_add", "smoothing", "perturb"))
    build_report([out], out, prompt_texts=[(p.id, p.text) for p in prompts])
    return out / "report.html"


def test_report_renders_in_chromium(report_html, tmp_path):
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        page.goto(report_html.as_uri())
        n_plots = page.locator(".plotly-graph-div").count()
        assert n_plots == 4
        page.wait_for_function(f"document.querySelectorAll('.plotly-graph-div .main-svg').length >= {n_plots}",
                               timeout=30_000)
        # every static figure decoded (a broken base64 image has naturalWidth 0)
        widths = page.eval_on_selector_all("figure.static img", "images => images.map(i => i.naturalWidth)")
        assert widths and all(w > 0 for w in widths)
        # hovering the alpha heatmap shows layer, head and value
        target = page.locator("#alpha-0 .nsewdrag").first
        target.scroll_into_view_if_needed()
        box = target.bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
        page.mouse.move(box["x"] + box["width"] * 0.3 + 2, box["y"] + box["height"] * 0.5)
        page.wait_for_selector("#alpha-0 .hoverlayer .hovertext", timeout=10_000)
        hover = page.locator("#alpha-0 .hoverlayer .hovertext").first.text_content() or ""
        assert "layer" in hover and "head" in hover and "α" in hover
        # the hostile prompt is text, and its script never ran
        assert HOSTILE in page.locator("#prompt-table").inner_text()
        assert page.evaluate("window.pwned") is None
        page.screenshot(path=str(tmp_path / "report.png"), full_page=False)
        assert (tmp_path / "report.png").stat().st_size > 10_000
        browser.close()
    assert not problems, problems


def test_report_is_readable_without_javascript(report_html):
    from playwright.sync_api import sync_playwright

    from sinkscope.paper.verdicts import STATUSES

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_context(java_script_enabled=False).new_page()
        page.goto(report_html.as_uri())
        widths = page.eval_on_selector_all("figure.interactive img", "images => images.map(i => i.naturalWidth)")
        assert len(widths) == 4 and all(w > 0 for w in widths)  # the static twins of the heatmaps
        table = page.locator("#findings-table").inner_text()
        assert "table1" in table and any(status in table for status in STATUSES)  # the verdicts, as text
        browser.close()


def screenshot(html: Path, png: Path) -> None:
    """A screenshot of the top of a report (for the README)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1200, "height": 1100})
        page.goto(html.resolve().as_uri())
        page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length > 0", timeout=60_000)
        png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(png))
        browser.close()


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
