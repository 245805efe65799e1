"""The demo in a real browser (Debian's chromium, driven by Playwright): upload the example samples, build the
bank, ask a query, and find both answers on the page. Saves a screenshot to $DEMO_SCREENSHOT (else tmp_path).

Needs ``apt-get install chromium`` (Playwright's own browser download is not used).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1200)]

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
LABELS = {"wake-up buzz", "sky report", "tunes", "grub", "headlines", "plans", "getting around", "house stuff"}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) to run the "
                    "browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from demo.testing import serve
    with serve(tmp_path_factory.getbasetemp() / "demo-cache") as u:  # shared with test_demo.py in one run
        yield u


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def test_upload_build_ask_in_browser(browser, url, tmp_path):
    from playwright.sync_api import expect

    from demo.testing import EXAMPLE_SAMPLES

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)  # gradio keeps a stream open: no networkidle
    page.get_by_text("Consistent Marginalization: an LLM that answers in").wait_for(timeout=120_000)

    # 1. upload the example samples; the column dropdowns fill themselves
    page.locator("#samples-file input[type=file]").set_input_files(str(EXAMPLE_SAMPLES))
    expect(page.locator("#data-status")).to_contain_text("60 rows", timeout=60_000)
    assert _value(page, "text-col") == "utterance" and _value(page, "label-col") == "my_label"

    # 2. a fifth of the rows as preference samples (12: quick on CPU), then build
    fraction = page.locator("#pref-fraction input[type=number]")
    fraction.fill("0.2")
    fraction.press("Enter")
    page.locator("#build-btn").click()
    expect(page.locator("#bank-status")).to_contain_text("Memory bank built", timeout=600_000)
    expect(page.locator("#bank-status")).to_contain_text("12 samples")
    expect(page.locator("#bank-status")).to_contain_text(  # the command line that repeats this bank
        "python -m cm_core evaluate --dataset demo/examples/my_labels_samples.csv --test-file held_out.csv")
    page.get_by_text("model answer (response)").first.wait_for()

    # 3. ask; both answers appear, each one of the user's labels
    page.locator("#query textarea, #query input").first.fill("set a timer for the pasta")
    page.locator("#ask-btn").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#baseline-answer textarea, #cm-answer textarea, "
        "#baseline-answer input, #cm-answer input')].filter(e => e.value.trim()).length >= 2",
        timeout=300_000)
    baseline, cm = _value(page, "baseline-answer"), _value(page, "cm-answer")
    assert baseline in LABELS and cm in LABELS, (baseline, cm)
    why = _value(page, "why")
    assert re.match(r"(keep|map|choose):", why), why
    page.get_by_text("knn (embeddings, your samples)").wait_for()

    shot = Path(os.environ.get("DEMO_SCREENSHOT") or tmp_path / "demo.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    page.close()


def test_user_text_is_rendered_as_text(browser, url):
    """Pasted rows with HTML in them show up literally: no element is created, no script runs."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)
    page.get_by_text("Consistent Marginalization: an LLM that answers in").wait_for(timeout=120_000)
    rows = ('text,label\n"<img src=x onerror=""window.__xss=1"">hello",<b>bold</b>\n'
            'plain words here,other\n')
    page.get_by_label("…or paste rows here").fill(rows)
    page.get_by_role("button", name="Load pasted rows").click()
    expect(page.locator("#data-status")).to_contain_text("2 rows", timeout=60_000)
    expect(page.get_by_text("<b>bold</b>").first).to_be_visible()
    assert page.evaluate("() => window.__xss === undefined")
    assert page.locator("img[src=x]").count() == 0
    assert page.locator("#data-status b, #data-status img").count() == 0
    page.close()
