"""The demo's event handlers: each takes the page's inputs and the session's state, calls the library and formats
what the page shows. No parsing, splitting or scoring of their own: uploads and columns come from
:mod:`cm_core.upload` / :mod:`cm_core.data`, methods from :func:`cm_core.registry.build`, the bank from
:func:`cm_core.cm.estimate_bank`, the batch evaluation from :func:`cm_core.evaluate.run_evaluation` and the heatmap
from :mod:`cm_core.report`. Next to a bank and an evaluation the page shows the ``python -m cm_core`` line that
repeats it on the same files with the same split, seed, methods and temperature (:mod:`cm_core.upload`).

Two base methods are compared on the visitor's held-out rows: ``own_words`` (the model answers in its own words,
a vocabulary; CM's bank maps them onto the visitor's labels: the case CM is for) and ``zero_shot`` (the model picks
one of the visitor's labels). *auto* builds both banks and keeps the better one; the page says which, by how much,
and what a classifier trained on the same samples gets.

Per-user data (parsed samples, the split, the memory banks) lives in the ``gr.State`` a handler receives and
returns, as plain JSON-able data; nothing per-user is kept in module globals, and the API key is never put there.
"""
from __future__ import annotations

import contextlib
import functools
import re
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from cm_core import registry, report, upload
from cm_core.bank import MemoryBank
from cm_core.cm import estimate_bank
from cm_core.data import Dataset, Example, Split, columns_of, guess_columns, parse_examples
from cm_core.errors import DataError
from cm_core.evaluate import results_table, run_evaluation
from cm_core.marginalize import decide
from cm_core.methods import Decoding

if __package__:
    from . import deploy
else:  # a Space: app.py, handlers.py and deploy.py side by side
    import deploy  # type: ignore[no-redef]

UserError, esc, guarded, md = deploy.UserError, deploy.esc, deploy.guarded, deploy.md

SEED = upload.SEED  # the command line's default seed: the shown command repeats the run exactly
CHUNK = 8  # preference samples per progress step (the library's batch size)
N_BOOT = 1000  # bootstrap resamples of the confidence intervals (the command line's default)
HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
EXAMPLE_SAMPLES = EXAMPLES_DIR / "my_labels_samples.csv"
EXAMPLE_TEST = EXAMPLES_DIR / "my_labels_test.csv"
EXAMPLE_WORDS = EXAMPLES_DIR / "model_words.txt"  # the model's own words for the example's eight request types
GENERIC_WORDS = EXAMPLES_DIR / "generic_words.txt"  # the 18 MASSIVE scenario names: for a visitor's own file
EXAMPLE_QUERIES = [
    "wake me up at half past six",
    "set a timer for the potatoes",
    "play the evening news podcast",
    "will it rain on my walk home",
    "turn the heating down a little",
    "when does the next bus to the airport leave",
]
METHODS = {"auto": "auto: the better one on your held-out rows",
           "own_words": "the model answers in its own words",
           "zero_shot": "the model picks one of your labels",
           "few_shot": "few-shot: picks a label, 5 similar samples shown"}
BASES = ("own_words", "zero_shot", "few_shot")  # what a bank can be built for
COMPARED = ("own_words", "zero_shot")  # auto builds both and keeps the better on the held-out rows
NAMES = {"own_words": "the model's own words", "zero_shot": "zero-shot over your labels",
         "few_shot": "few-shot over your labels", "knn": "kNN", "logreg": "logistic regression"}
BASELINES = ("knn", "logreg")  # classifiers trained on the same samples, for an honest comparison
BANK_COLUMNS = ["model answer", "your label", "count", "p"]
CAND_COLUMNS = ["candidate", "count", "p(label | answer)", "re-ask score"]
SCORE_COLUMNS = ["model answer", "p(answer | query)"]
ALL_COLUMNS = ["method", "answer", "confidence"]
EVAL_COLUMNS = ["method", "acc. %", "95% CI low", "95% CI high", "F1 %", "p vs base", "n"]  # short: fit a phone
HELD_OUT_FILE = "held_out.csv"
WORDS_FILE = "model_words.txt"


def _n(count: int, word: str) -> str:
    """'1 label', '3 labels'."""
    return f"{count} {word}" + ("" if count == 1 else "s")


def fmt_p(p: float | None) -> str | None:
    """McNemar's p as shown: four decimals, '< 0.0001' below that (never a bare 0)."""
    if p is None:
        return None
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def pct(x: float) -> float:
    """A share as the evaluation table shows it: percent, one decimal (40.0, 87.5)."""
    return round(100 * x, 1)


def fmt_pct(x: float) -> str:
    return f"{100 * x:.0f} %" if abs(100 * x - round(100 * x)) < 1e-9 else f"{100 * x:.1f} %"


# --------------------------------------------------------------------------- reading the user's files

def read_file(path: str | None, what: str, kind: str = "table") -> tuple[str, str]:
    """(file name, UTF-8 text) of an uploaded file, size and encoding checked (:func:`cm_core.upload.read_upload`)."""
    if not path:
        raise UserError(f"No {what} file was uploaded.")
    try:
        return upload.read_upload(path, deploy.MAX_FILE_BYTES, kind)
    except DataError as e:
        raise UserError(esc(str(e))) from None


def _load_raw(name: str, text: str) -> tuple[dict, Any, Any, str, pd.DataFrame]:
    """Read an uploaded table: refuses what is not samples (a bank, one column, no rows, a broken line, a single
    label) with what to do about it; a file that only needs other columns loads, and the status says so."""
    if upload.looks_like_bank(text):
        raise UserError(f"{esc(name)} is a saved memory bank, not preference samples: upload it in section 2 "
                        "(<b>…or upload a saved bank</b>), after loading your samples here.")
    text, note = upload.normalize_table(name, text)
    try:
        cols = [str(c) for c in columns_of(text, name) if c is not None]
    except DataError as e:
        raise UserError(f"{esc(name)} was not loaded: {esc(str(e))}. {upload.table_advice(e)[0]}") from None
    if not cols:
        raise UserError(f"{esc(name)} has no columns: it needs a header row (CSV) or JSON objects (JSONL).")
    if len(cols) < 2:
        raise UserError(f"{esc(name)} has only the column {esc(cols[0])}; it needs a text column and a label "
                        "column (for CSV: a header row like <code>text,label</code>; separated by commas, tabs or "
                        "semicolons).")
    text_col, label_col = guess_columns(text, name, cols)
    raw = {"name": name, "text": text, "columns": cols, "note": note}
    preview = pd.DataFrame(columns=["text", "label"])
    try:
        ex = parse_examples(text, source=name, text_column=text_col, label_column=label_col)
    except DataError as e:
        advice, other_columns_help = upload.table_advice(e)
        if not other_columns_help:
            raise UserError(f"{esc(name)} was not loaded: {esc(str(e))}. {advice}") from None
        msg = (f"Loaded **{md(name)}** (columns {md(', '.join(cols))}), but with the guessed columns it does not "
               f"parse: {md(str(e))}. {advice}")
    else:
        preview = _preview_frame(ex)
        labs = sorted({e.label for e in ex})
        if len(labs) < 2 and len(cols) == 2:
            raise UserError(f"{esc(name)} has only one distinct label ({esc(labs[0])}) in column "
                            f"{esc(repr(label_col))}: CM needs at least two of your labels. Add samples with other "
                            "labels and upload it again.")
        msg = (f"Loaded **{md(name)}**: {_n(len(ex), 'row')}, columns {md(', '.join(cols))}. Using text column "
               f"**{md(text_col)}** and label column **{md(label_col)}** ({_n(len(labs), 'label')}: "
               f"{_labels_md(labs)}).")
        if len(labs) < 2:
            msg += (f"\n\n⚠️ Only one distinct label in **{md(label_col)}**: CM needs at least two. Pick another "
                    "label column below.")
        elif len(labs) > deploy.MAX_LABELS:
            msg += (f"\n\n⚠️ {len(labs)} distinct values in **{md(label_col)}**; this demo takes at most "
                    f"{deploy.MAX_LABELS} labels. Pick another label column below.")
        else:
            msg += " Change the columns below if that is wrong, then build the memory bank."
    if note:
        msg += f"\n\n{md(note)}."
    return raw, gr.Dropdown(choices=cols, value=text_col), gr.Dropdown(choices=cols, value=label_col), msg, preview


def _labels_md(labels: list[str], n: int = 12) -> str:
    return md(", ".join(labels[:n])) + (" …" if len(labels) > n else "")


def _preview_frame(examples: list[Example]) -> pd.DataFrame:
    return pd.DataFrame([{"text": e.text, "label": e.label} for e in examples[:8]], columns=["text", "label"])


def _parse(raw: dict | None, text_col: str | None, label_col: str | None) -> Dataset:
    """The session's samples with the chosen columns, as a Dataset (label set: every label in the file)."""
    if not raw:
        raise UserError("Load preference samples first: upload a CSV/JSONL file, paste text, or click "
                        "<b>Use the built-in example</b>.")
    cols = raw["columns"]
    if not text_col or not label_col:
        raise UserError(f"Pick the text column and the label column (the file has: {esc(', '.join(cols))}).")
    for what, col in (("text", text_col), ("label", label_col)):
        if col not in cols:
            raise UserError(f"The {what} column {esc(repr(col))} is not in {esc(raw['name'])}; its columns are: "
                            f"{esc(', '.join(cols))}.")
    if text_col == label_col:
        raise UserError("The text column and the label column must be different columns.")
    try:
        examples = parse_examples(raw["text"], source=raw["name"], text_column=text_col, label_column=label_col)
    except DataError as e:
        msg = str(e)
        if "empty label" in msg or "missing label" in msg:
            msg += " Every preference sample needs a label (your label for that text)."
        raise UserError(esc(msg)) from None
    ds = Dataset(Path(raw["name"]).stem, examples, source=raw["name"])
    if len(ds.labels) < 2:
        raise UserError(f"Only one distinct label ({esc(ds.labels[0])}) in column {esc(repr(label_col))}: "
                        "CM needs at least two of your labels. Is that the right label column?")
    if len(ds.labels) > deploy.MAX_LABELS:
        raise UserError(f"Column {esc(repr(label_col))} has {len(ds.labels)} distinct values; this demo takes at "
                        f"most {deploy.MAX_LABELS} labels. Is that the right label column?")
    return ds


def _fresh_state(raw: dict) -> dict:
    """New samples replace the old ones and the banks built from them (a stale bank would mislead)."""
    return {"raw": raw}


@guarded
def load_samples(file, pasted, state):
    """Upload preference samples (or, with no file, pasted rows): fills the column dropdowns. (api: /load_samples)"""
    if file:
        name, text = read_file(file, "samples")
    elif pasted and pasted.strip():
        return load_pasted.__wrapped__(pasted, state)
    else:
        raise UserError("Upload a CSV/JSONL file or paste some rows first.")
    raw, tcol, lcol, msg, preview = _load_raw(name, text)
    return _fresh_state(raw), tcol, lcol, msg, preview


@guarded
def load_pasted(pasted, state):
    """The pasted rows, whatever file sits in the upload box. (api: /load_pasted)"""
    if not (pasted and pasted.strip()):
        raise UserError("Paste some rows first (a header row like <code>text,label</code>, then one row per "
                        "sample).")
    name = "pasted.jsonl" if pasted.lstrip().startswith("{") else "pasted.csv"
    try:
        text = upload.decode_upload(pasted.encode("utf-8"), "The pasted text", deploy.MAX_FILE_BYTES)
    except DataError as e:
        raise UserError(esc(str(e))) from None
    raw, tcol, lcol, msg, preview = _load_raw(name, text)
    return _fresh_state(raw), tcol, lcol, msg, preview


def _still_loaded(state) -> str:
    raw = (state or {}).get("raw")
    if not raw:
        return ""
    return f" The samples loaded before ({md(raw['name'])}) are still in use."


def _failure_text(fn, *args) -> str:
    """The message a failed handler showed (it is run again: loading is cheap and has no side effects)."""
    try:
        fn(*args)
    except gr.Error as e:
        return str(e.message if hasattr(e, "message") else e)
    except Exception as e:  # pragma: no cover - guarded handlers raise gr.Error only
        return esc(str(e))
    return "it could not be loaded."


def samples_upload_failed(file, state):
    """After a refused upload: the rejected file leaves the box and the status says why (no stale 'Loaded')."""
    name = md(Path(file).name) if file else "The file"
    why = _failure_text(load_samples, file, "", state)
    return gr.File(value=None), f"⚠️ **{name} was not loaded.** {why}{_still_loaded(state)}"


def paste_failed(pasted, state):
    why = _failure_text(load_pasted, pasted, state)
    return f"⚠️ **The pasted rows were not loaded.** {why}{_still_loaded(state)}"


@guarded
def load_example(state):
    """The built-in example: one user's slang for eight everyday request types. (api: /use_example)"""
    raw, tcol, lcol, msg, preview = _load_raw(EXAMPLE_SAMPLES.name, EXAMPLE_SAMPLES.read_text(encoding="utf-8"))
    msg += ("\n\nThis user says *wake-up buzz* for alarms, *sky report* for weather, *grub* for food (kitchen timers "
            "included) and *headlines* for news (news podcasts included). The model's own words for these requests "
            f"(alarm, weather, music, news, …) are filled in below (`examples/{WORDS_FILE}`); a labelled test file "
            "is built in for the batch evaluation.")
    return _fresh_state(raw), tcol, lcol, msg, preview, str(EXAMPLE_TEST), "\n".join(builtin_words(EXAMPLE_WORDS))


def preview_columns(state, text_col, label_col):
    """Column dropdowns changed: re-parse for the preview; problems are shown in the status line, not raised."""
    raw = (state or {}).get("raw")
    if not raw or not text_col or not label_col:
        return gr.skip(), gr.skip()
    try:
        ds = _parse(raw, text_col, label_col)
    except UserError as e:
        return f"⚠️ {e}", pd.DataFrame(columns=["text", "label"])
    return (f"{_n(len(ds), 'row')} with text column **{md(text_col)}** and label column **{md(label_col)}**: "
            f"{_n(len(ds.labels), 'label')} ({_labels_md(ds.labels)})."), _preview_frame(ds.examples)


def use_example_test():
    """(api: /example_test) The built-in labelled test file, as an upload."""
    return str(EXAMPLE_TEST)


def cleared(test_file: bool = False, words: str | None = None):
    """What new samples leave on the page: no bank, no answers, no evaluation, no downloads (all of it belonged to
    the old samples). The outputs of :func:`clear_results`, in the page's order."""
    return (pd.DataFrame(columns=BANK_COLUMNS), None, _no_download(), _no_download(), "",
            "", "", "", pd.DataFrame(columns=CAND_COLUMNS), pd.DataFrame(columns=SCORE_COLUMNS),
            pd.DataFrame(columns=ALL_COLUMNS), pd.DataFrame(columns=EVAL_COLUMNS), "", _no_download())


def clear_results():
    """(after the built-in example loads) Every result of the old samples leaves the page, and so does a file in
    the upload box (it is not what is loaded)."""
    return (*cleared(), None)


def clear_for_upload(words):
    """(after a visitor's own samples load) As :func:`clear_results`, and the example's test file and its word list
    leave their boxes (they fit the example only)."""
    try:
        is_example = tuple(upload.parse_words(words or "")) == builtin_words(EXAMPLE_WORDS)
    except DataError:
        is_example = False
    return (*cleared(), None, "" if is_example else gr.skip())


def clear_after_paste(words):
    """(after pasted rows load) As :func:`clear_for_upload`, and the upload box is emptied: what is loaded is the
    pasted text, not a file."""
    return (*clear_for_upload(words), None)


def clear_answers():
    """(after a new bank) The answers and the evaluation of the old bank leave the page."""
    return cleared()[5:]


@guarded
def load_words(file):
    """A word-list file (the model's own words, one per line) into the words box. (api: False)"""
    name, text = read_file(file, "word list", "words")
    try:
        words = upload.parse_words(text, name)
    except DataError as e:
        raise UserError(esc(str(e))) from None
    return "\n".join(words) + "\n"


@functools.lru_cache(maxsize=4)
def builtin_words(path: Path) -> tuple[str, ...]:
    """A shipped word list (the example's, the generic one), read once."""
    return tuple(upload.parse_words(path.read_text(encoding="utf-8"), path.name))


def _words_file(words: list[str]) -> str:
    """How the command line names a word list: a shipped file's path when the words are that file's, else the
    name the visitor is asked to save them under."""
    return next((_example_path(f) for f in (EXAMPLE_WORDS, GENERIC_WORDS) if tuple(words) == builtin_words(f)),
                WORDS_FILE)


def _vocabulary(words_text: str | None) -> tuple[list[str], str, str]:
    """(the model's own words, how the command line names their file, where they come from). Empty: the built-in
    generic list (the 18 MASSIVE scenario names)."""
    text = (words_text or "").strip()
    if not text:
        return list(builtin_words(GENERIC_WORDS)), _example_path(GENERIC_WORDS), "the built-in generic words"
    try:
        words = upload.parse_words(text, "The model's own words")
    except DataError as e:
        raise UserError(esc(str(e))) from None
    where = {EXAMPLE_WORDS: "the example's words", GENERIC_WORDS: "the built-in generic words"}
    source = next((w for f, w in where.items() if tuple(words) == builtin_words(f)), "your words")
    return words, _words_file(words), source


# --------------------------------------------------------------------------- outputs

_OUT_DIR = Path(tempfile.mkdtemp(prefix="cm-demo-"))


def _out_file(name: str, content: str) -> str:
    """A fresh file for a download (gradio copies it into its own cache, which delete_cache sweeps)."""
    now = time.time()
    for old in _OUT_DIR.glob("*/*"):  # sweep our own leftovers older than an hour
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > 3600:
                old.unlink()
                old.parent.rmdir()
    d = Path(tempfile.mkdtemp(dir=_OUT_DIR))
    path = d / name
    path.write_text(content, encoding="utf-8")
    return str(path)


def _download(path: str | None):
    """What a download button gets: the file's path (the API returns it as it is). The page turns the button on
    when there is a file (:func:`downloads_ready`) and off when it is cleared (:func:`cleared`)."""
    return path


def downloads_ready(*paths):
    """(page only, after an event that makes files) Each download button on exactly when it has a file."""
    updates = tuple(gr.update(interactive=bool(p)) for p in paths)
    return updates if len(updates) > 1 else updates[0]


def _no_download():
    return gr.DownloadButton(value=None, interactive=False)


def bank_frame(bank: MemoryBank) -> pd.DataFrame:
    """The bank's flat table (:meth:`MemoryBank.rows`) under the page's column names."""
    return pd.DataFrame([[r["response"], r["label"], r["count"], r["p"]] for r in bank.rows()], columns=BANK_COLUMNS)


@functools.lru_cache(maxsize=1)
def _font_chars() -> frozenset[int]:
    """The characters matplotlib's default font can draw."""
    from matplotlib import font_manager, ft2font, rcParams
    path = font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"]))
    return frozenset(ft2font.FT2Font(path).get_charmap())


def drawable(text: str) -> str:
    """``text`` with every character the plot's font lacks (emoji) written as its Unicode name, e.g.
    '🍕 food' -> '(slice of pizza) food'; joiners and variation selectors dropped. No empty boxes in a figure."""
    chars = _font_chars()
    out = []
    for ch in text:
        if ord(ch) in chars:
            out.append(ch)
        elif unicodedata.category(ch) in ("Mn", "Cf") or 0xFE00 <= ord(ch) <= 0xFE0F:
            continue
        else:
            out.append(f"({unicodedata.name(ch, 'symbol').lower()})")
    return "".join(out) or "?"


def heatmap(bank: MemoryBank):
    """Model answer against your label (:func:`cm_core.report.discrepancy_heatmap`), every name drawable."""
    shown = MemoryBank()
    for resp, row in bank.counts.items():
        for lab, c in row.items():
            shown.add(drawable(resp), drawable(lab), c)
    fig = report.discrepancy_heatmap(shown, top=deploy.MAX_LABELS, title="model's answer → your label")
    return fig


def bank_status(bank: MemoryBank, state: dict, seconds: float | None, origin: str) -> str:
    st = bank.stats()
    method = bank.meta.get("base_method", state.get("method"))
    own = method == "own_words"
    lines = [f"**Memory bank {origin}**" + (f" in {seconds:.1f} s" if seconds is not None else "") + ": "
             f"{_n(st['samples'], 'sample')}, {_n(st['entries'], 'model answer')}, "
             f"{_n(len(state['labels']), 'label')}; "
             + ("the model's own words map onto your labels through it; " if own else
                f"the model already agreed with your label on {st['agreement']:.0%} of your samples; ")
             + f"{_n(st['multi_candidate'], 'answer')} map{'s' if st['multi_candidate'] == 1 else ''} to several of "
             "your labels (CM re-asks among those)."]
    if state.get("held"):
        lines.append(f"{_n(len(state['held']), 'held-out row')} {'is' if len(state['held']) == 1 else 'are'} kept "
                     f"for the batch evaluation (download them as {md(HELD_OUT_FILE)} to repeat it with the command "
                     "line).")
    model = bank.meta.get("model")
    if model:
        lines.append(f"Built with {md(model.get('kind'))}:{md(model.get('model'))}, "
                     f"method {md(method or '?')}, temperature {md(bank.meta.get('temperature'))}.")
    return "\n\n".join(lines)


def spreadsheet_csv(frame: pd.DataFrame) -> str:
    """CSV text a spreadsheet opens without running anything (:func:`cm_core.report.spreadsheet_safe`)."""
    return report.spreadsheet_safe(frame).to_csv(index=False)


# --------------------------------------------------------------------------- the command line that repeats a run

def _example_path(path: Path) -> str:
    """A built-in example's path as typed from the repository root (or a Space's root)."""
    root = HERE.parent if (HERE.parent / "cm_core").is_dir() else HERE
    return path.relative_to(root).as_posix()


def _file_arg(name: str, text: str | None = None) -> str:
    """How the command line names an uploaded file: the built-in example's path, else the file's own name."""
    for example in (EXAMPLE_SAMPLES, EXAMPLE_TEST):
        if name == example.name and text is not None and text == example.read_text(encoding="utf-8"):
            return _example_path(example)
    return re.sub(r"[\x00-\x1f\x7f]", "_", name)


def _model_args(backend: str, model: str, base_url: str | None) -> list[str]:
    spec = deploy.model_spec(backend, model)
    return upload.model_args(spec, (base_url or "").strip() or None if spec.startswith("openai:") else None)


def _command_md(argv: list[str], what: str, notes: list[str]) -> str:
    """The line in a code block (its fence longer than any run of backticks in it, so a file name cannot end it)."""
    line = upload.command_line(argv)
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", line)), default=0))
    head = f"**Repeat {what} with the command line** (from the repository root, with your files copied there"
    head += "; " + "; ".join(notes) + ")" if notes else ")"
    return f"{head}:\n\n{fence}bash\n{line}\n{fence}"


def _notes(state: dict, backend: str, api_key: str | None) -> list[str]:
    notes = []
    raw = state.get("raw")
    if raw and raw["name"].startswith("pasted."):
        notes.append(f"save the pasted rows as {md(raw['name'])}")
    elif raw and raw.get("note"):
        notes.append(f"save {md(raw['name'])} comma-separated")
    if state.get("responses_file") == WORDS_FILE:
        notes.append(f"save the model's own words as {WORDS_FILE}, one per line")
    if (backend or "").strip().lower() == "openai":
        notes.append("your API key in OPENAI_API_KEY" if (api_key or "").strip() else
                     "the server's key is not shown: put yours in OPENAI_API_KEY")
    return notes


def _eval_methods(bases: list[str], with_samples: bool) -> list[str]:
    """The methods a batch evaluation runs: each LLM base with CM (the model's own words also with soft CM, and,
    given the samples, with the EM-fitted soft CM, the best form there in our misalignment reports), then the
    classifiers trained on the same samples (with CM too: the evaluation's habit)."""
    out = []
    for b in bases:
        out += [f"{b}+cm", f"{b}+cm_soft", *([f"{b}+cm_em"] if with_samples else [])] if b == "own_words" else [b]
    return out + (list(BASELINES) if with_samples else [])


# --------------------------------------------------------------------------- one evaluation

def _evaluate(ds: Dataset, llm, methods: list[str], *, split: Split, responses: list[str] | None,
              bank: MemoryBank | None, temperature: float, pref_fraction: float, pref_count: int | None,
              progress=None) -> dict:
    """:func:`cm_core.evaluate.run_evaluation` as ``python -m cm_core evaluate`` runs it (``responses``: the model's
    own words, ``--responses FILE``)."""
    return run_evaluation(ds, llm, methods, pref_fraction=pref_fraction, pref_count=pref_count,
                          n_test=deploy.MAX_EVAL, seed=SEED, bank_temperature=temperature,
                          decoding=Decoding(seed=SEED), n_boot=N_BOOT, bank=bank, split=split, progress=progress,
                          responses=responses)


def _winner_sentence(res: dict, where: str, bases: list[str], n_pref: int, prefer: str | None = None) -> str:
    """One sentence: which method wins on these rows and by how much, the classifiers included (on a tie the
    method the page uses, ``prefer``, is named first)."""
    r = res["results"]
    acc = {m: v["accuracy"] for m, v in r.items() if "accuracy" in v}
    llm = {f"{b}+cm": acc[f"{b}+cm"] for b in bases if f"{b}+cm" in acc}
    if not llm:
        return ""
    parts = sorted(llm, key=lambda m: (-llm[m], m != f"{prefer}+cm"))
    best = parts[0]
    name = lambda m: NAMES[m.split("+")[0]] + (" + CM" if "+" in m else "")  # noqa: E731
    text = f"On {where}, {name(best)} got {fmt_pct(llm[best])}"
    if len(parts) > 1:
        text += " vs " + ", ".join(f"{fmt_pct(llm[m])} for {name(m)}" for m in parts[1:])
    clf = {b: acc[b] for b in BASELINES if b in acc}
    if clf:
        top = max(clf, key=lambda b: clf[b])
        text += (f"; {NAMES[top]} trained on the same {_n(n_pref, 'sample')} got {fmt_pct(clf[top])}")
        if clf[top] > llm[best]:
            text += (f", {100 * (clf[top] - llm[best]):.0f} points more: on your data a small classifier beats this "
                     "model")
    return text + "."


# --------------------------------------------------------------------------- building or loading the bank

def _numbers(pref_fraction, temperature=0.7) -> tuple[float, float]:
    try:
        fraction = round(float(pref_fraction), 4)
        temperature = round(float(temperature), 4)
    except (TypeError, ValueError):
        raise UserError("The preference fraction and the temperature must be numbers.") from None
    if not 0 < fraction <= 1:
        raise UserError("The preference fraction must be in (0, 1].")
    if not 0 <= temperature <= 2:
        raise UserError("The temperature must be between 0 and 2.")
    return fraction, temperature


def _split(ds: Dataset, fraction: float) -> tuple[list[Example], list[Example], int | None]:
    wanted = len(ds) if fraction >= 1 else max(1, int(fraction * len(ds)))
    pref_count = deploy.MAX_PREF if wanted > deploy.MAX_PREF else None
    split = upload.preference_split(ds, pref_fraction=fraction, pref_count=pref_count, seed=SEED)
    return split.preference.examples, split.test.examples, pref_count


@deploy.gpu
@guarded
def build_bank(text_col, label_col, backend, model, base_url, api_key, method, pref_fraction, temperature,
               words="", state=None, progress=gr.Progress()):
    """Run the base method(s) on the preference samples and count (model answer -> your label); *auto* builds the
    model's own words and zero-shot, compares their CM on the held-out rows and keeps the better. (api: /build_bank)
    """
    state = dict(state or {})
    ds = _parse(state.get("raw"), text_col, label_col)
    fraction, temperature = _numbers(pref_fraction, temperature)
    method = method or "auto"
    if method not in METHODS:
        raise UserError(f"Unknown base method {esc(method)}; choose one of: {', '.join(METHODS)}.")
    bases = list(COMPARED) if method == "auto" else [method]
    responses, responses_file, responses_from = _vocabulary(words) if "own_words" in bases else (None, None, None)
    pref, held, pref_count = _split(ds, fraction)
    t0 = time.time()
    deploy.wait_for_model(backend, model, progress)
    t_model = time.time()
    banks: dict[str, MemoryBank] = {}
    res = None
    with deploy.backend_for(backend, model, base_url, api_key) as llm:
        texts = [e.text for e in pref]
        for b in bases:
            kw = {"responses": responses} if b == "own_words" else {}
            base = registry.build(b, labels=ds.labels, llm=llm, decoding=Decoding(seed=SEED), **kw).fit(pref)
            for start in range(0, len(texts), CHUNK):  # fills the response cache chunk by chunk: a progress bar
                progress(start / len(texts), desc=f"{NAMES[b]}: asking the model about your samples {start + 1}-"
                                                  f"{min(start + CHUNK, len(texts))} of {len(texts)}")
                base.predict(texts[start:start + CHUNK])
            progress(1.0, desc=f"{NAMES[b]}: counting the memory bank")
            banks[b] = estimate_bank(base, pref, temperature, SEED)
        if held and method == "auto":
            split = Split(ds.subset(pref, "pref"), ds.subset(held, "held-out"), SEED)
            res = _evaluate(ds, llm, _eval_methods(bases, True), split=split, responses=responses, bank=None,
                            temperature=temperature, pref_fraction=fraction, pref_count=pref_count,
                            progress=lambda frac, what: progress(frac, desc=f"held-out rows: {what}"))
    chosen = bases[0] if len(bases) == 1 else "zero_shot"
    if res is not None:
        acc = {b: res["results"][f"{b}+cm"]["accuracy"] for b in bases}
        if acc["own_words"] > acc["zero_shot"]:
            chosen = "own_words"
    for b, bank in banks.items():
        bank.meta.update({"labels": ds.labels, "source": ds.source, "text_column": text_col,
                          "label_column": label_col})
        if b == "own_words":
            bank.meta["responses"] = responses
    state.update({"samples": [[e.text, e.label] for e in pref], "held": [[e.text, e.label] for e in held],
                  "labels": ds.labels, "banks": {b: bank.to_dict() for b, bank in banks.items()},
                  "bank": banks[chosen].to_dict(), "method": chosen, "bases": [chosen] + [b for b in bases
                                                                                       if b != chosen],
                  "chose": method, "columns": [text_col, label_col], "responses": responses,
                  "responses_file": responses_file,
                  "run": {"built": True, "pref_fraction": fraction, "pref_count": pref_count,
                          "temperature": temperature}})
    lines = []
    if res is not None:
        lines.append("**" + _winner_sentence(res, f"your {_n(len(held), 'held-out row')}", bases, len(pref), chosen)
                     + f"** The page uses {NAMES[chosen]} + CM from here on (pick another base method to change "
                     "that).")
    elif method == "auto":
        lines.append("**No rows are held out (preference fraction 1), so the two base methods could not be "
                     f"compared: the page uses {NAMES[chosen]} + CM.** Lower the preference fraction to compare.")
    if "own_words" in bases:
        lines.append(f"The model's own words: {_labels_md(responses, 20)} ({responses_from}).")
    took = time.time() - t_model
    lines.append(bank_status(banks[chosen], state, took, "built"))
    if t_model - t0 > 1:
        lines.append(f"Preparing the model took {t_model - t0:.0f} s before that (loading it; on a new machine its "
                     "one-time conversion).")
    if pref_count is not None:
        lines.append(f"{pref_count} of {len(ds)} rows were used as preference samples (demo limit).")
    held_path = _out_file(HELD_OUT_FILE, upload.examples_csv(held, text_col, label_col)) if held else None
    lines.append(_bank_command(state, backend, model, base_url, api_key))
    bank = banks[chosen]
    return (state, bank_frame(bank), heatmap(bank), _download(_out_file("memory_bank.json", bank.to_json())),
            _download(held_path), "\n\n".join(lines))


def _bank_command(state: dict, backend, model, base_url, api_key) -> str:
    run, (tcol, lcol) = state["run"], state["columns"]
    dataset = _file_arg(state["raw"]["name"], state["raw"]["text"])
    mod = _model_args(backend, model, base_url)
    notes = _notes(state, backend, api_key)
    responses = state.get("responses_file")
    if run["pref_count"] is None and run["pref_fraction"] >= 1:
        argv = upload.estimate_argv(dataset=dataset, text_column=tcol, label_column=lcol, model=mod,
                                    method=state["method"], temperature=run["temperature"], seed=SEED,
                                    responses=responses if state["method"] == "own_words" else None)
        return _command_md(argv, "this bank", notes)
    if not state["held"]:
        return "No rows are held out (their texts are all among the preference samples): no command line to show."
    argv = upload.evaluate_argv(dataset=dataset, test_file=HELD_OUT_FILE, text_column=tcol, label_column=lcol,
                                model=mod, methods=_eval_methods(state["bases"], True),
                                pref_fraction=run["pref_fraction"], pref_count=run["pref_count"],
                                n_test=deploy.MAX_EVAL, temperature=run["temperature"], seed=SEED,
                                responses=responses if "own_words" in state["bases"] else None)
    notes.append(f"{md(HELD_OUT_FILE)} from the download button; results.json holds each bank under banks → "
                 "its base method, and the batch evaluation on the held-out rows")
    return _command_md(argv, "this bank", notes)


@guarded
def upload_bank(file, text_col, label_col, pref_fraction=1.0, words="", state=None):
    """Use a saved bank (this app's JSON or the paper's {response: [labels]}) instead of building one. With samples
    loaded, they are split as a build splits them (the preference fraction): kNN and logistic regression learn from
    the preference samples only, and the held-out rows stay held out. (api: /upload_bank)"""
    name, text = read_file(file, "memory bank", "bank")
    try:
        bank = upload.read_bank(text, name)
    except DataError as e:
        raise UserError(esc(str(e))) from None
    if len(bank) == 0:
        raise UserError(f"{esc(name)} holds an empty memory bank.")
    fraction, _ = _numbers(pref_fraction)
    state = dict(state or {})
    ds = None
    if state.get("raw") and text_col and label_col:
        with contextlib.suppress(UserError):
            ds = _parse(state["raw"], text_col, label_col)
    bank_labels = {lab for row in bank.counts.values() for lab in row}
    labels = bank.meta.get("labels")
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        labels = sorted(bank_labels | set(ds.labels if ds else []))
    labels = sorted(set(labels) | bank_labels)
    if len(labels) < 2:
        raise UserError("The bank names only one label; CM needs at least two.")
    if len(labels) > deploy.MAX_LABELS:
        raise UserError(f"The bank names {len(labels)} labels; this demo takes at most {deploy.MAX_LABELS}.")
    method = bank.meta.get("base_method") if bank.meta.get("base_method") in BASES else "zero_shot"
    responses, responses_file = None, None
    if method == "own_words":
        saved = bank.meta.get("responses")
        if isinstance(saved, list) and len(saved) >= 2 and all(isinstance(w, str) for w in saved):
            responses = [str(w) for w in saved]
            responses_file = _words_file(responses)
        elif (words or "").strip():
            responses, responses_file, _ = _vocabulary(words)
        else:
            responses = sorted(bank.counts)
            responses_file = WORDS_FILE
    pref: list[Example] = []
    held: list[Example] = []
    pref_count = None
    if ds is not None:
        pref, held, pref_count = _split(ds, fraction)
    state.update({"samples": [[e.text, e.label] for e in pref], "held": [[e.text, e.label] for e in held],
                  "labels": labels, "bank": bank.to_dict(), "banks": {method: bank.to_dict()}, "method": method,
                  "bases": [method], "chose": method, "columns": [text_col, label_col] if ds else None,
                  "sample_labels": ds.labels if ds else None, "responses": responses,
                  "responses_file": responses_file,
                  "run": {"built": False, "bank_file": _file_arg(name), "pref_fraction": fraction if ds else 1.0,
                          "pref_count": pref_count, "temperature": bank.meta.get("temperature", 0.7)}})
    status = bank_status(bank, state, None, f"loaded from {md(name)}")
    unseen = sorted(r for r in bank.counts if r not in labels)
    if unseen and method != "own_words":
        status += (f"\n\n{_n(len(unseen), 'bank entry')} {'is' if len(unseen) == 1 else 'are'} not among the "
                   f"candidate labels, so the model never gives those answers: {_labels_md(unseen, 8)}.")
    if not pref:
        status += "\n\nNo preference samples loaded: the kNN / logistic-regression baselines are off."
    else:
        status += (f"\n\nYour samples are split as a build splits them (preference fraction {fraction:g}): kNN and "
                   f"logistic regression learn from the {_n(len(pref), 'preference sample')} only")
        status += (f", and the {_n(len(held), 'held-out row')} stay held out for the batch evaluation." if held
                   else ".")
        n_bank = bank.meta.get("n_samples")
        if held and isinstance(n_bank, int) and n_bank > len(pref):
            status += (f" ⚠️ This bank was estimated on {_n(n_bank, 'sample')}, more than your "
                       f"{len(pref)} preference samples: if some of the held-out rows were among them, the "
                       "evaluation flatters CM.")
    held_path = _out_file(HELD_OUT_FILE, upload.examples_csv(held, text_col, label_col)) if held else None
    return (state, bank_frame(bank), heatmap(bank), _download(_out_file("memory_bank.json", bank.to_json())),
            _download(held_path), status)


def bank_upload_failed(file, state):
    """After a refused bank: the file leaves the box; the status says why and what is still in use."""
    name = md(Path(file).name) if file else "The file"
    why = _failure_text(upload_bank, file, None, None, 1.0, "", None)
    still = " The bank shown above is still in use." if "bank" in (state or {}) else ""
    return gr.File(value=None), f"⚠️ **{name} was not loaded.** {why}{still}"


def _need_bank(state) -> dict:
    if not state or "bank" not in state:
        raise UserError("Build a memory bank first (section 2), or upload a saved one.")
    return state


# --------------------------------------------------------------------------- one query

def _fitted(state: dict, llm):
    """Each base method with a bank in the session, wrapped in CM with that bank (fitted through the registry on
    the session's preference samples), the session's method first; and the embedding baselines when there are
    samples."""
    labels = state["labels"]
    samples = [Example(t, y) for t, y in state.get("samples", [])]
    banks = state.get("banks") or {state.get("method", "zero_shot"): state["bank"]}
    order = [state.get("method", "zero_shot")] + [b for b in banks if b != state.get("method")]
    cms = {}
    for b in order:
        if b not in BASES:
            raise UserError(f"Unknown method {esc(b)}.")
        if registry.needs_samples(b) and not samples:
            raise UserError("Few-shot needs your preference samples; this bank was uploaded without them. "
                            "Load the samples too, or pick another base method.")
        kw = {"responses": state.get("responses")} if b == "own_words" else {}
        bank = MemoryBank.from_dict(banks[b])
        cms[b] = (registry.build(f"{b}+cm", labels=labels, llm=llm, decoding=Decoding(seed=SEED), bank=bank,
                                 **kw).fit(samples), bank)
    baselines = {}
    if samples and len({s.label for s in samples}) >= 2:
        baselines = {name: registry.build(name, labels=labels).fit(samples) for name in BASELINES}
    return cms, baselines


def _explain(base_label: str, info: dict, final: str, own: bool, labels: list[str]) -> str:
    """Which bank entry fired, and (always in the words "CM answered '...'") the label CM chose."""
    action = info.get("action")
    cands = info.get("candidates") or {}
    cand_txt = ", ".join(f"'{k}' ×{v}" for k, v in cands.items())
    said = f"the model said '{base_label}'" + (" (in its own words)" if own else "")
    answered = f"CM answered '{final}'"
    if action == "keep" and not cands:
        tail = " — one of the model's words, not one of your labels" if final not in labels else ""
        return (f"keep: {said}, which never came up on your samples, so the bank has no entry for it and CM keeps "
                f"the model's answer: {answered}{tail}.")
    if action == "keep":
        return f"keep: bank entry '{base_label}' → {cand_txt}; CM keeps the model's answer: {answered}."
    if action == "map":
        only = next(iter(cands))
        if only == base_label:
            return (f"map: bank entry '{base_label}' → {cand_txt}. On your samples this answer always meant "
                    f"'{only}': {answered}.")
        return (f"map: bank entry '{base_label}' → {cand_txt}. When {said}, you always meant '{only}' on your "
                f"samples: {answered}.")
    if action == "choose":
        return (f"choose: bank entry '{base_label}' → {cand_txt}. On your samples '{base_label}' meant several of "
                f"your labels, so CM re-asked the model among those only: {answered} (re-ask scores in the "
                "candidates table).")
    return f"{action}: {answered}."


@deploy.gpu
@guarded
def ask(query, backend, model, base_url, api_key, state):
    """Answer one query with the base method alone, with CM, and the embedding baselines. (api: /ask)"""
    state = _need_bank(state)
    q = " ".join((query or "").split())
    if not q:
        raise UserError("Type a query first.")
    if len(q) > deploy.MAX_QUERY_CHARS:
        raise UserError(f"The query is {len(q)} characters; at most {deploy.MAX_QUERY_CHARS} please.")
    rows = []
    with deploy.backend_for(backend, model, base_url, api_key) as llm:
        cms, baselines = _fitted(state, llm)
        first = None
        for b, (cm, bank) in cms.items():
            base_pred = cm.base.predict([q])[0]
            pred = cm.predict([q])[0]
            if first is None:
                first = (b, cm, bank, base_pred, pred)
            probs, choice = base_pred.probs or {}, pred.info.get("choice_scores") or {}
            rows.append({"method": f"{NAMES[b]} (model alone)", "answer": base_pred.label,
                         "confidence": round(probs.get(base_pred.label, 0.0), 3) if probs else None})
            rows.append({"method": f"{NAMES[b]} + CM", "answer": pred.label,
                         "confidence": round(choice.get(pred.label, 0.0), 3) if choice else None})
    b, cm, bank, base_pred, pred = first
    cands = pred.info.get("candidates") or {}
    cond = bank.conditional(base_pred.label)
    choice = pred.info.get("choice_scores") or {}
    cand_df = pd.DataFrame([[k, v, round(cond.get(k, 0.0), 3), round(choice[k], 3) if k in choice else None]
                            for k, v in cands.items()], columns=CAND_COLUMNS)
    probs = base_pred.probs or {}
    score_df = pd.DataFrame(sorted(([k, round(v, 3)] for k, v in probs.items()), key=lambda r: -r[1]),
                            columns=SCORE_COLUMNS)
    for name, m in baselines.items():
        p = m.predict([q])[0]
        rows.append({"method": f"{NAMES[name]} (your samples)", "answer": p.label,
                     "confidence": round((p.probs or {}).get(p.label, 0.0), 3)})
    if not baselines:
        rows.append({"method": "kNN / logistic regression", "answer": "(need preference samples)", "confidence": None})
    why = _explain(base_pred.label, pred.info, pred.label, b == "own_words", state["labels"])
    return base_pred.label, pred.label, why, cand_df, score_df, pd.DataFrame(rows, columns=ALL_COLUMNS)


# --------------------------------------------------------------------------- batch evaluation

def _read_test(file, text_col, label_col, state) -> tuple[list[Example], str, str, str]:
    """(test rows, where they come from, how the command line names their file, its text column). A test file
    is read with the columns and the label set of the samples, as ``evaluate --test-file`` reads it."""
    if file:
        name, text = read_file(file, "test")
        text, _ = upload.normalize_table(name, text)
        try:
            cols = [str(c) for c in columns_of(text, name)]
        except DataError as e:
            raise UserError(esc(str(e))) from None
        tcol, lcol = state.get("columns") or [None, None]
        if tcol is None:  # a bank uploaded without samples: the chosen columns, else a guess
            tcol, lcol = (text_col, label_col) if text_col in cols and label_col in cols else guess_columns(
                text, name, cols)
        if not (tcol in cols and lcol in cols) or tcol == lcol:
            raise UserError(f"{esc(name)} needs the same text and label columns as your samples "
                            f"({esc(tcol)}, {esc(lcol)}); its columns are: {esc(', '.join(cols))}.")
        try:
            rows = parse_examples(text, source=name, text_column=tcol, label_column=lcol, labels=state["labels"])
        except DataError as e:
            hint = " Every test row's label must be one of your labels." if "not in the label set" in str(e) else ""
            raise UserError(esc(str(e)) + hint) from None
        return rows, name, _file_arg(name, text), tcol
    held = state.get("held") or []
    if not held:
        raise UserError("Upload a labelled test file, or build the bank with a preference fraction below 1 so some "
                        "rows are held out for the evaluation.")
    return [Example(t, y) for t, y in held], "held-out rows", HELD_OUT_FILE, state["columns"][0]


@deploy.gpu
@guarded
def evaluate_batch(test_file, text_col, label_col, backend, model, base_url, api_key, state,
                   progress=gr.Progress()):
    """Accuracy of each base method with its CM and the embedding baselines on labelled rows, with 95% CIs and
    McNemar's p against each CM's base: :func:`cm_core.evaluate.run_evaluation`. (api: /evaluate)"""
    state = _need_bank(state)
    rows, source, test_arg, test_text_col = _read_test(test_file, text_col, label_col, state)
    labels, method, run = state["labels"], state["method"], state["run"]
    bases = state.get("bases") or [method]
    pref = [Example(t, y) for t, y in state.get("samples", [])]
    note = []
    if len(rows) > deploy.MAX_EVAL:
        note.append(f"Only the first {deploy.MAX_EVAL} of {len(rows)} rows were evaluated (demo limit).")
    test = rows[:deploy.MAX_EVAL]
    overlap = len({e.text for e in pref} & {e.text for e in test})
    if overlap:
        note.append(f"{_n(overlap, 'test row')} {'is' if overlap == 1 else 'are'} also preference samples; they "
                    "flatter every method.")
    name = state["raw"]["name"] if state.get("raw") else "bank"
    ds = Dataset(Path(name).stem, pref, labels, name)
    split = Split(ds.subset(pref, "pref"), Dataset(f"{ds.name}:test", test, labels, source), SEED)
    methods = _eval_methods(bases, bool(pref))
    given = None if run["built"] else MemoryBank.from_dict(state["bank"])
    deploy.wait_for_model(backend, model, progress)
    with deploy.backend_for(backend, model, base_url, api_key) as llm:
        res = _evaluate(ds, llm, methods, split=split, responses=state.get("responses"), bank=given,
                        temperature=run["temperature"], pref_fraction=run["pref_fraction"],
                        pref_count=run["pref_count"],
                        progress=lambda frac, what: progress(frac, desc=f"evaluating {what}"))
    table = pd.DataFrame([[r["method"], pct(r["accuracy"]), pct(r["ci_low"]), pct(r["ci_high"]), pct(r["macro_f1"]),
                           fmt_p(r["p_value"]), r["n"]] for r in results_table(res)], columns=EVAL_COLUMNS)
    if run["built"]:
        for b in bases:
            if b in res["banks"] and res["banks"][b]["bank"]["counts"] != state["banks"][b]["counts"]:
                note.append("A bank estimated for this evaluation differs from the one built above (did the model "
                            "change?).")
                break
    bank = MemoryBank.from_dict(res["banks"][method]["bank"])
    actions = [decide(b, bank).action for b in res["predictions"][method]]
    summary = _eval_summary(res, bases, method, source, len(pref), note)
    summary += "\n\n" + _eval_command(state, methods, test_arg, test_text_col, backend, model, base_url, api_key)
    per_row = pd.DataFrame({"text": res["texts"], "gold": res["gold"], **res["predictions"], "cm_action": actions})
    return table, summary, _download(_out_file("cm_per_row.csv", spreadsheet_csv(per_row)))


def _eval_summary(res: dict, bases: list[str], method: str, source: str, n_pref: int, note: list[str]) -> str:
    r = res["results"]
    base, cm = r[method], r[f"{method}+cm"]
    n = base["n"]
    summary = "**" + _winner_sentence(res, f"these {_n(n, 'row')} ({md(source)})", bases, n_pref, method) + "**"
    acts = cm.get("actions", {})
    p_text = fmt_p(cm["p_value"]) or ""
    name = NAMES[method][0].upper() + NAMES[method][1:]
    summary += (f"\n\n{md(name)}: {fmt_pct(base['accuracy'])} alone → {fmt_pct(cm['accuracy'])} with CM "
                f"(McNemar p {'' if p_text.startswith('<') else '= '}{p_text}). "
                f"CM kept the model's answer on {acts.get('keep', 0)}, mapped it on {acts.get('map', 0)} and re-asked "
                f"among candidates on {_n(acts.get('choose', 0), 'row')}.")
    if method == "own_words":
        summary += (" Alone, the model's own words are (almost) never one of your labels: CM's bank is what turns "
                    "them into your labels.")
    if n < 100:
        summary += " With so few rows the confidence intervals are wide: treat differences with care."
    if note:
        summary += "\n\n" + " ".join(md(x) for x in note)
    return summary


def _eval_command(state: dict, methods: list[str], test_arg: str, test_text_col: str, backend, model, base_url,
                  api_key) -> str:
    run = state["run"]
    mod = _model_args(backend, model, base_url)
    notes = _notes(state, backend, api_key)
    responses = state.get("responses_file") if any(m.startswith("own_words") for m in methods) else None
    if not state.get("samples"):  # a bank without samples: the command line answers the rows through it
        if MemoryBank.from_dict(state["bank"]).meta.get("labels") != state["labels"]:
            return ("No command line repeats this evaluation exactly: the uploaded bank does not carry its label "
                    "set, and no preference samples are loaded.")
        argv = upload.predict_argv(bank=run["bank_file"], input_file=test_arg, text_column=test_text_col,
                                   model=mod, method=f"{state['method']}+cm", responses=responses)
        notes.append(f"{md(run['bank_file'])} is the bank you uploaded")
        return _command_md(argv, "CM's answers (the per-row CSV's CM column)", notes)
    tcol, lcol = state["columns"]
    argv = upload.evaluate_argv(dataset=_file_arg(state["raw"]["name"], state["raw"]["text"]), test_file=test_arg,
                                text_column=tcol, label_column=lcol, model=mod, methods=methods,
                                pref_fraction=run["pref_fraction"], pref_count=run["pref_count"],
                                n_test=deploy.MAX_EVAL, temperature=run["temperature"], seed=SEED,
                                bank=None if run["built"] else run["bank_file"], responses=responses)
    if test_arg == HELD_OUT_FILE:
        notes.append(f"{md(HELD_OUT_FILE)} from section 2's download button")
    if not run["built"]:
        notes.append(f"{md(run['bank_file'])} is the bank you uploaded")
        if state.get("sample_labels") != state["labels"]:
            notes.append("the command line takes the label set from --dataset, which lacks some of the bank's "
                         "labels: its numbers can differ")
    return _command_md(argv, "this evaluation", notes)
