"""The demo in a real browser (Debian's chromium, driven by Playwright), as a new visitor meets it:

- the built-in example end to end with the page's defaults: build (both base methods compared on the held-out
  rows, one sentence saying which wins), four queries (the explanation names CM's label, every column of the
  candidates table visible at 1400 px), the batch evaluation on the example's test file, the three downloads, the
  bank uploaded again (the held-out rows stay held out), and the result tables and heatmap on a 390 px phone;
- hostile inputs: refused files (the status says why, the rejected file leaves its box, no stale "Loaded"), a
  semicolon-separated file, a saved bank uploaded as samples, bad banks, pasted rows with a file in the box, new
  samples clearing the old bank, and user text rendered as text.

Saves a screenshot of the walk to $DEMO_SCREENSHOT (else tmp_path). Needs ``apt-get install chromium``
(Playwright's own browser download is not used).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(2400)]

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
LABELS = {"wake-up buzz", "sky report", "tunes", "grub", "headlines", "plans", "getting around", "house stuff"}
BASES = r"(the model's own words|zero-shot over your labels)"
RESULT_TABLES = ("bank-table", "cand-table", "all-table", "score-table", "eval-table")
MODEL = 600_000  # ms: a step that runs the embedded model on a busy CPU


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


def _open(browser, url, width=1400, height=1000):
    page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)  # gradio keeps a stream open: no networkidle
    page.get_by_text("Consistent Marginalization: an LLM that answers in").wait_for(timeout=120_000)
    return page, errors


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _table(page, elem_id: str) -> list[dict]:
    """A result table as the page shows it: header cells and body cells, row by row."""
    return page.locator(f"#{elem_id}").evaluate("""e => {
        const heads = [...e.querySelectorAll('[role=columnheader]')].map(h => h.innerText.trim());
        return [...e.querySelectorAll('.virtual-row[role=row]')].map(r => Object.fromEntries(
            [...r.querySelectorAll('[role=gridcell]')].map((c, i) => [heads[i], c.innerText.trim()])))
          .filter(r => Object.values(r).some(v => v)); }""")


def _columns_visible(page, elem_id: str) -> dict:
    """Where each header cell of a table sits against the viewport and the table's own (scrolling) box."""
    return page.locator(f"#{elem_id}").evaluate("""e => {
        const wrap = e.querySelector('.table-wrap') || e;
        const box = wrap.getBoundingClientRect();
        const cells = [...e.querySelectorAll('[role=columnheader]'),
                       ...[...e.querySelectorAll('.virtual-row[role=row]')].slice(0, 12).flatMap(
                           r => [...r.querySelectorAll('[role=gridcell]')])];
        const heads = cells.map(h => { const r = h.getBoundingClientRect();
            const clipped = h.getAttribute('role') === 'gridcell' &&
                [h, ...h.querySelectorAll('span, .cell-wrap')].some(x => x.scrollWidth > x.clientWidth + 1);
            return {text: h.innerText.trim(), left: r.left, right: r.right, clipped}; });
        return {heads, left: box.left, right: box.right, scroll: wrap.scrollWidth, client: wrap.clientWidth,
                viewport: window.innerWidth}; }""")


def _assert_all_columns_visible(page, elem_id: str) -> None:
    seen = _columns_visible(page, elem_id)
    assert seen["heads"], (elem_id, seen)
    assert seen["scroll"] <= seen["client"] + 1, (elem_id, seen)  # nothing hidden to the right
    for h in seen["heads"]:
        assert 0 <= h["left"] and h["right"] <= min(seen["viewport"], seen["right"]) + 1, (elem_id, h, seen)
        assert not h["clipped"], (elem_id, h)  # a number cut short would be worse than a hidden one


def _download(page, elem_id: str, to: Path) -> Path:
    with page.expect_download(timeout=60_000) as info:
        page.locator(f"#{elem_id}").click()
    path = to / info.value.suggested_filename
    info.value.save_as(str(path))
    return path


def _ask(page, query: str) -> tuple[str, str, str]:
    from playwright.sync_api import expect
    page.locator("#query textarea, #query input").first.fill(query)
    old = _value(page, "why")
    page.locator("#ask-btn").click()
    page.wait_for_function(
        "old => { const w = document.querySelector('#why textarea'); return w && w.value.trim() && w.value !== old; }",
        arg=old, timeout=MODEL)
    expect(page.locator("#all-table")).to_contain_text("logistic regression")
    return _value(page, "baseline-answer"), _value(page, "cm-answer"), _value(page, "why")


# --------------------------------------------------------------------------- the built-in example, end to end

def test_built_in_example_end_to_end(browser, url, tmp_path):
    from playwright.sync_api import expect

    from demo.handlers import EXAMPLE_QUERIES

    page, errors = _open(browser, url)
    # Nothing to download yet: the buttons are off.
    for dl in ("bank-download", "held-download", "eval-download"):
        assert page.locator(f"#{dl}").is_disabled(), dl

    # 1. the built-in example: 60 rows, 8 labels, the model's own words filled in, the test file in its box
    page.locator("#example-btn").click()
    expect(page.locator("#data-status")).to_contain_text("60 rows", timeout=60_000)
    expect(page.locator("#data-status")).to_contain_text("8 labels")
    assert _value(page, "text-col") == "utterance" and _value(page, "label-col") == "my_label"
    assert _value(page, "words").split() == ["alarm", "weather", "music", "play", "cooking", "takeaway", "news",
                                             "calendar", "transport", "iot"]
    expect(page.locator("#test-file")).to_contain_text("my_labels_test")

    # 2. build with the defaults (auto, 0.8, 0.7): both bases on the 12 held-out rows, one sentence says which wins
    page.locator("#build-btn").click()
    expect(page.locator("#bank-status")).to_contain_text("Memory bank built", timeout=MODEL)
    status = _text(page, "bank-status")
    m = re.search(rf"On your 12 held-out rows, {BASES} \+ CM got (\d+(\.\d)?) % vs (\d+(\.\d)?) % for {BASES} \+ CM; "
                  r"(kNN|logistic regression) trained on the same 48 samples got (\d+(\.\d)?) %", status)
    assert m, status
    assert m.group(1) != m.group(4) and float(m.group(2)) >= float(m.group(5))
    assert f"The page uses {m.group(1)} + CM" in status
    assert ("python -m cm_core evaluate --dataset demo/examples/my_labels_samples.csv --test-file held_out.csv"
            in status and "--responses demo/examples/model_words.txt" in status)
    expect(page.locator("#bank-table")).to_contain_text("model answer")
    assert {r["your label"] for r in _table(page, "bank-table")} <= LABELS
    assert page.locator("#bank-plot img").count() == 1
    for dl in ("bank-download", "held-download"):
        expect(page.locator(f"#{dl}")).to_be_enabled()
    own_words = m.group(1) == "the model's own words"

    # 3. four queries; the explanation names the label CM chose; the candidates table shows all its columns
    for query in EXAMPLE_QUERIES[:4]:
        base, cm, why = _ask(page, query)
        assert cm in LABELS or (own_words and why.startswith("keep")), (query, base, cm, why)
        assert re.match(r"(keep|map|choose):", why) and f"CM answered '{cm}'" in why, why
        if own_words:
            assert base not in LABELS  # the model answers in its own words
        if why.startswith("choose"):
            rows = _table(page, "cand-table")
            assert rows and all(r["re-ask score"] for r in rows), rows
        for t in ("cand-table", "all-table", "score-table"):
            _assert_all_columns_visible(page, t)
    expect(page.locator("#all-table")).to_contain_text("kNN (your samples)")

    # 4. batch evaluation on the example's test file: the winner sentence, p never a bare 0, the per-row CSV
    page.locator("#eval-btn").click()
    expect(page.locator("#eval-status")).to_contain_text("On these 40 rows", timeout=MODEL)
    summary = _text(page, "eval-status")
    assert re.search(rf"On these 40 rows \(my_labels_test\.csv\), {BASES} \+ CM got \d+(\.\d)? %", summary), summary
    rows = {r["method"]: r for r in _table(page, "eval-table")}
    assert {"own_words", "own_words+cm", "own_words+cm_soft", "zero_shot", "zero_shot+cm", "knn", "logreg"} <= set(rows)
    for r in rows.values():
        p = r["p vs base"]
        assert p in ("", "< 0.0001") or 0 < float(p) <= 1, r
    _assert_all_columns_visible(page, "eval-table")
    per_row = list(csv.DictReader(io.StringIO(_download(page, "eval-download", tmp_path).read_text("utf-8"))))
    assert len(per_row) == 40 and {"text", "gold", "own_words+cm", "zero_shot+cm", "cm_action"} <= set(per_row[0])
    shot = Path(os.environ.get("DEMO_SCREENSHOT") or tmp_path / "demo.png")  # what a new visitor sees
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    held = _download(page, "held-download", tmp_path)
    assert held.name == "held_out.csv" and len(held.read_text("utf-8").splitlines()) == 13
    bank = _download(page, "bank-download", tmp_path)
    saved = json.loads(bank.read_text("utf-8"))
    assert saved["format"] == "cm-memory-bank" and saved["meta"]["n_samples"] == 48

    # 5. the downloaded bank uploaded again: the same split, the 12 held-out rows stay held out and are evaluated
    page.locator("#bank-file input[type=file]").set_input_files(str(bank))
    expect(page.locator("#bank-status")).to_contain_text("loaded from memory_bank.json", timeout=60_000)
    expect(page.locator("#bank-status")).to_contain_text("the 12 held-out rows stay held out")
    expect(page.locator("#bank-status")).to_contain_text("48 preference samples only")
    expect(page.locator("#cm-answer textarea, #cm-answer input").first).to_have_value("")  # the old answers and
    expect(page.locator("#eval-status")).to_have_text("")  # the old evaluation left the page
    assert not _table(page, "eval-table") and page.locator("#eval-download").is_disabled()
    page.locator("#test-file button[aria-label='Clear']").first.click()
    page.locator("#eval-btn").click()
    expect(page.locator("#eval-status")).to_contain_text("On these 12 rows (held-out rows)", timeout=MODEL)
    assert {r["n"] for r in _table(page, "eval-table")} == {"12"}
    _ask(page, EXAMPLE_QUERIES[2])

    # 6. the same page on a 390 px phone: every column of every result table visible, the heatmap at full size
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(1000)
    for t in RESULT_TABLES:
        _assert_all_columns_visible(page, t)
    plot = page.locator("#bank-plot img").evaluate("""i => { const c = i.parentElement, r = i.getBoundingClientRect();
        return {natural: i.naturalWidth, shown: r.width, left: r.left, box: c.getBoundingClientRect().left,
                scroll: c.scrollWidth, client: c.clientWidth}; }""")
    assert plot["shown"] >= 0.95 * plot["natural"], plot  # not shrunk: its numbers stay readable
    assert plot["left"] >= plot["box"] - 1 and plot["scroll"] > plot["client"], plot  # scrolls, from its left edge
    assert not errors, errors
    page.close()


# --------------------------------------------------------------------------- hostile inputs

def test_refused_uploads_leave_no_stale_screen(browser, url, tmp_path):
    """Each refused file: its own reason in the status (never 'pick the columns' for a file no column choice can
    mend), the rejected file out of its box, no 'Loaded … 60 rows' left under the error."""
    from playwright.sync_api import expect

    from cm_core.bank import MemoryBank
    page, errors = _open(browser, url)
    page.locator("#example-btn").click()
    expect(page.locator("#data-status")).to_contain_text("60 rows", timeout=60_000)
    bank = MemoryBank.from_pairs([("tunes", "tunes"), ("grub", "grub")], {"labels": ["grub", "tunes"]}).to_json()
    cases = [("empty.csv", b"", "is empty"), ("header.csv", b"text,label\n", "header row but no rows"),
             ("blank.csv", b"text,label\nwake me,alarm\nhi,\n", "needs your label"),
             ("broken.jsonl", b'{"text": "a", "label": "x"}\n{"text": \n', "one JSON object per line"),
             ("long.csv", b"text,label\n" + b"x" * 5000 + b",y\nhi,z\n", "Shorten that text"),
             ("one_label.csv", b"text,label\nwake me,alarm\nhi,alarm\n", "only one distinct label"),
             ("memory_bank.json", bank.encode(), "is a saved memory bank, not preference samples")]
    for name, content, says in cases:
        path = tmp_path / name
        path.write_bytes(content)
        page.locator("#samples-file input[type=file]").set_input_files(str(path))
        expect(page.locator("#data-status")).to_contain_text(f"{name} was not loaded", timeout=60_000)
        status = _text(page, "data-status")
        assert says in status and "Pick the right text and label columns" not in status, status
        assert "60 rows" not in status and "my_labels_samples.csv) are still in use" in status, status
        expect(page.locator("#samples-file")).not_to_contain_text(name.split(".")[0])  # the box is empty again
    big = tmp_path / "big.csv"  # over 5 MB: the server refuses it before the app sees it, and says why
    big.write_bytes(b"text,label\n" + b"x" * (6 * 1024 * 1024) + b",y\n")
    page.locator("#samples-file input[type=file]").set_input_files(str(big))
    expect(page.get_by_text("exceed the maximum allowed size of 5.0 Mb").first).to_be_visible(timeout=60_000)

    # a semicolon-separated file is read as such
    semi = tmp_path / "semi.csv"
    semi.write_text("text;label\nwake me at six;wake-up buzz\nis it raining;sky report\n", encoding="utf-8")
    page.locator("#samples-file input[type=file]").set_input_files(str(semi))
    expect(page.locator("#data-status")).to_contain_text("Loaded semi.csv: 2 rows", timeout=60_000)
    expect(page.locator("#data-status")).to_contain_text("separated by semicolons")
    assert "1 labels" not in _text(page, "data-status")
    assert not errors, errors
    page.close()


def test_bad_banks_and_stale_results(browser, url, tmp_path):
    """A bank on screen leaves it when new samples load; bad banks say what they are; pasted rows are loaded even
    with a file in the box."""
    from playwright.sync_api import expect
    page, errors = _open(browser, url)
    page.locator("#example-btn").click()
    expect(page.locator("#data-status")).to_contain_text("60 rows", timeout=60_000)
    paper = tmp_path / "paper_bank.json"
    paper.write_text(json.dumps({"grub": ["grub", "tunes"], "tunes": ["tunes"]}), encoding="utf-8")
    page.locator("#bank-file input[type=file]").set_input_files(str(paper))
    expect(page.locator("#bank-status")).to_contain_text("loaded from paper_bank.json", timeout=60_000)
    expect(page.locator("#bank-download")).to_be_enabled()
    assert len(_table(page, "bank-table")) == 3
    page.locator("#bank-file button[aria-label='Clear']").first.click()  # the visitor removes it from the box

    for i, (content, says) in enumerate([
            (b"\x80\x04\x95\x10\x00pickle", "not a memory bank: it is not UTF-8 text"),
            (json.dumps({"version": 1, "counts": {"a": {"b": 1}}}).encode(), 'no "format" entry'),
            (b"text,label\nwake me,alarm\n", "looks like a table of samples")]):
        bad = tmp_path / f"bad_bank{i}.json"
        bad.write_bytes(content)
        page.locator("#bank-file input[type=file]").set_input_files(str(bad))
        expect(page.locator("#bank-status")).to_contain_text(f"bad_bank{i}.json was not loaded", timeout=60_000)
        status = _text(page, "bank-status")
        assert says in status and "Excel" not in status and "None" not in status, status
        assert "still in use" in status and len(_table(page, "bank-table")) == 3
        expect(page.locator("#bank-file")).not_to_contain_text("bad_bank")

    # A JSONL file sits in the upload box; the pasted CSV rows are what "Load pasted rows" loads.
    other = tmp_path / "other.jsonl"
    other.write_text('{"q": "book the vet", "tag": "pets"}\n{"q": "fix the tap", "tag": "repairs"}\n',
                     encoding="utf-8")
    page.locator("#samples-file input[type=file]").set_input_files(str(other))
    expect(page.locator("#data-status")).to_contain_text("Loaded other.jsonl", timeout=60_000)
    # ...which cleared the old bank, its heatmap and its downloads
    expect(page.locator("#bank-status")).to_have_text("", timeout=30_000)
    expect(page.locator("#bank-download")).to_be_disabled()
    assert not _table(page, "bank-table")
    assert page.locator("#bank-plot img").count() == 0 and page.locator("#bank-download").is_disabled()
    page.get_by_label("…or paste rows here").fill(
        "text,label\nwake me at six,wake-up buzz\nis it raining,sky report\n")
    expect(page.locator("#samples-file")).to_contain_text("other")  # the JSONL file is still in its box
    page.locator("#paste-btn").click()
    expect(page.locator("#data-status")).to_contain_text("Loaded pasted.csv: 2 rows", timeout=60_000)
    assert _value(page, "text-col") == "text" and _value(page, "label-col") == "label"
    expect(page.locator("#samples-file")).not_to_contain_text("other")  # what is loaded is the pasted text
    assert not errors, errors
    page.close()


def test_user_text_is_rendered_as_text(browser, url):
    """Pasted rows with HTML in them show up literally: no element is created, no script runs."""
    from playwright.sync_api import expect

    page, _errors = _open(browser, url, 1200, 900)
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
