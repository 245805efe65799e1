"""The demo's event handlers: each takes the page's inputs and the session's state, calls the library and formats
what the page shows. No parsing, splitting or scoring of their own: uploads and columns come from
:mod:`cm_core.upload` / :mod:`cm_core.data`, methods from :func:`cm_core.registry.build`, the bank from
:func:`cm_core.cm.estimate_bank`, the batch evaluation from :func:`cm_core.evaluate.run_evaluation` and the heatmap
from :mod:`cm_core.report`. Next to a bank and an evaluation the page shows the ``python -m cm_core`` line that
repeats it on the same files with the same split, seed, methods and temperature (:mod:`cm_core.upload`).

Per-user data (parsed samples, the split, the memory bank) lives in the ``gr.State`` a handler receives and
returns, as plain JSON-able data; nothing per-user is kept in module globals, and the API key is never put there.
"""
from __future__ import annotations

import contextlib
import re
import tempfile
import time
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
EXAMPLE_QUERIES = [
    "wake me up at half past six",
    "set a timer for the potatoes",
    "play the evening news podcast",
    "will it rain on my walk home",
    "turn the heating down a little",
    "when does the next bus to the airport leave",
]
METHODS = {"zero_shot": "zero-shot (the LLM picks one of your labels)",
           "few_shot": "few-shot (5 most similar of your samples in the prompt)"}
BASELINES = ("knn", "logreg")  # classifiers trained on the same samples, for an honest comparison
BANK_COLUMNS = ["model answer (response)", "your label", "count", "p"]
CAND_COLUMNS = ["candidate", "count in bank", "p(your label | model answer)", "re-ask score"]
SCORE_COLUMNS = ["label", "p(label | query)"]
ALL_COLUMNS = ["method", "answer", "confidence"]
EVAL_COLUMNS = ["method", "accuracy", "95% CI low", "95% CI high", "macro-F1", "p vs its base (McNemar)", "n"]
HELD_OUT_FILE = "held_out.csv"


# --------------------------------------------------------------------------- reading the user's files

def read_file(path: str | None, what: str) -> tuple[str, str]:
    """(file name, UTF-8 text) of an uploaded file, size and encoding checked (:func:`cm_core.upload.read_upload`)."""
    if not path:
        raise UserError(f"No {what} file was uploaded.")
    return upload.read_upload(path, deploy.MAX_FILE_BYTES)


def _load_raw(name: str, text: str) -> tuple[dict, Any, Any, str, pd.DataFrame]:
    cols = [str(c) for c in columns_of(text, name) if c is not None]
    if not cols:
        raise UserError(f"{esc(name)} has no columns: it needs a header row (CSV) or JSON objects (JSONL).")
    if len(cols) < 2:
        raise UserError(f"{esc(name)} has only the column {esc(cols[0])}; it needs a text column and a label "
                        "column (for CSV: a header row like <code>text,label</code>).")
    text_col, label_col = guess_columns(text, name, cols)
    raw = {"name": name, "text": text, "columns": cols}
    preview = pd.DataFrame()
    try:
        ex = parse_examples(text, source=name, text_column=text_col, label_column=label_col)
        preview = _preview_frame(ex)
        labs = sorted({e.label for e in ex})
        msg = (f"Loaded **{md(name)}**: {len(ex)} rows, columns {md(', '.join(cols))}. Using text column "
               f"**{md(text_col)}** and label column **{md(label_col)}** ({len(labs)} labels: {_labels_md(labs)}). "
               "Change the columns below if that is wrong, then build the memory bank.")
    except DataError as e:
        msg = (f"Loaded **{md(name)}** (columns {md(', '.join(cols))}), but with the guessed columns it does not "
               f"parse: {md(str(e))}. Pick the right text and label columns.")
    return raw, gr.Dropdown(choices=cols, value=text_col), gr.Dropdown(choices=cols, value=label_col), msg, preview


def _labels_md(labels: list[str], n: int = 12) -> str:
    return md(", ".join(labels[:n])) + (" …" if len(labels) > n else "")


def _preview_frame(examples: list[Example]) -> pd.DataFrame:
    return pd.DataFrame([{"text": e.text, "label": e.label} for e in examples[:8]])


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
    """New samples replace the old ones and the bank built from them (a stale bank would mislead)."""
    return {"raw": raw}


@guarded
def load_samples(file, pasted, state):
    """Upload or paste preference samples: fills the column dropdowns. (api: /load_samples)"""
    if file:
        name, text = read_file(file, "samples")
    elif pasted and pasted.strip():
        name = "pasted.jsonl" if pasted.lstrip().startswith("{") else "pasted.csv"
        text = upload.decode_upload(pasted.encode("utf-8"), "The pasted text", deploy.MAX_FILE_BYTES)
    else:
        raise UserError("Upload a CSV/JSONL file or paste some rows first.")
    raw, tcol, lcol, msg, preview = _load_raw(name, text)
    return _fresh_state(raw), tcol, lcol, msg, preview


@guarded
def load_example(state):
    """The built-in example: one user's slang for eight everyday scenarios. (api: /use_example)"""
    raw, tcol, lcol, msg, preview = _load_raw(EXAMPLE_SAMPLES.name, EXAMPLE_SAMPLES.read_text(encoding="utf-8"))
    msg += ("\n\nThis user says *wake-up buzz* for alarms, *sky report* for weather, *grub* for food (kitchen timers "
            "included) and *headlines* for news (news podcasts included). A labelled test file is built in for the "
            "batch evaluation.")
    return _fresh_state(raw), tcol, lcol, msg, preview, str(EXAMPLE_TEST)


def preview_columns(state, text_col, label_col):
    """Column dropdowns changed: re-parse for the preview; problems are shown in the status line, not raised."""
    raw = (state or {}).get("raw")
    if not raw or not text_col or not label_col:
        return gr.skip(), gr.skip()
    try:
        ds = _parse(raw, text_col, label_col)
    except UserError as e:
        return f"⚠️ {e}", pd.DataFrame()
    return (f"{len(ds)} rows with text column **{md(text_col)}** and label column **{md(label_col)}**: "
            f"{len(ds.labels)} labels ({_labels_md(ds.labels)})."), _preview_frame(ds.examples)


def use_example_test():
    """(api: /example_test) The built-in labelled test file, as an upload."""
    return str(EXAMPLE_TEST)


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


def bank_frame(bank: MemoryBank) -> pd.DataFrame:
    """The bank's flat table (:meth:`MemoryBank.rows`) under the page's column names."""
    return pd.DataFrame([[r["response"], r["label"], r["count"], r["p"]] for r in bank.rows()], columns=BANK_COLUMNS)


def heatmap(bank: MemoryBank):
    """Model answer against your label (:func:`cm_core.report.discrepancy_heatmap`)."""
    return report.discrepancy_heatmap(bank, top=deploy.MAX_LABELS, title="model answer vs your label (outlined: "
                                      "the two agree)")


def bank_status(bank: MemoryBank, state: dict, seconds: float | None, origin: str) -> str:
    st = bank.stats()
    lines = [f"**Memory bank {origin}**" + (f" in {seconds:.1f} s" if seconds is not None else "") + ": "
             f"{st['samples']} samples, {st['entries']} model answers, {len(state['labels'])} labels; "
             f"the model already agreed with your label on {st['agreement']:.0%} of your samples; "
             f"{st['multi_candidate']} answer(s) map to several of your labels (CM re-asks among those)."]
    if state.get("held"):
        lines.append(f"{len(state['held'])} held-out rows are kept for the batch evaluation (download them as "
                     f"{md(HELD_OUT_FILE)} to repeat it with the command line).")
    model = bank.meta.get("model")
    if model:
        lines.append(f"Built with {md(model.get('kind'))}:{md(model.get('model'))}, "
                     f"method {md(bank.meta.get('base_method', '?'))}, "
                     f"temperature {md(bank.meta.get('temperature'))}.")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- the command line that repeats a run

def _example_path(path: Path) -> str:
    """The built-in example's path as typed from the repository root (or a Space's root)."""
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
    if state.get("raw") and state["raw"]["name"].startswith("pasted."):
        notes.append(f"save the pasted rows as {md(state['raw']['name'])}")
    if (backend or "").strip().lower() == "openai":
        notes.append("your API key in OPENAI_API_KEY" if (api_key or "").strip() else
                     "the server's key is not shown: put yours in OPENAI_API_KEY")
    return notes


# --------------------------------------------------------------------------- building or loading the bank

@deploy.gpu
@guarded
def build_bank(text_col, label_col, backend, model, base_url, api_key, method, pref_fraction, temperature, state,
               progress=gr.Progress()):
    """Run the base method on the preference samples and count (model answer -> your label). (api: /build_bank)"""
    state = dict(state or {})
    ds = _parse(state.get("raw"), text_col, label_col)
    try:
        fraction = round(float(pref_fraction), 4)
        temperature = round(float(temperature), 4)
    except (TypeError, ValueError):
        raise UserError("The preference fraction and the temperature must be numbers.") from None
    if not 0 < fraction <= 1:
        raise UserError("The preference fraction must be in (0, 1].")
    if not 0 <= temperature <= 2:
        raise UserError("The temperature must be between 0 and 2.")
    method = method or "zero_shot"
    if method not in METHODS:
        raise UserError(f"Unknown base method {esc(method)}; choose one of: {', '.join(METHODS)}.")
    wanted = len(ds) if fraction >= 1 else max(1, int(fraction * len(ds)))
    pref_count = deploy.MAX_PREF if wanted > deploy.MAX_PREF else None
    split = upload.preference_split(ds, pref_fraction=fraction, pref_count=pref_count, seed=SEED)
    pref, held = split.preference.examples, split.test.examples
    t0 = time.time()
    progress(0.0, desc="loading the model")
    with deploy.backend_for(backend, model, base_url, api_key) as llm:
        base = registry.build(method, labels=ds.labels, llm=llm, decoding=Decoding(seed=SEED)).fit(pref)
        texts = [e.text for e in pref]
        for start in range(0, len(texts), CHUNK):  # fills the response cache chunk by chunk, for the progress bar
            progress(start / len(texts), desc=f"asking the model: sample {start + 1}-"
                                              f"{min(start + CHUNK, len(texts))} of {len(texts)}")
            base.predict(texts[start:start + CHUNK])
        progress(1.0, desc="counting the memory bank")
        bank = estimate_bank(base, pref, temperature, SEED)
    bank.meta.update({"labels": ds.labels, "source": ds.source, "text_column": text_col, "label_column": label_col})
    state.update({"samples": [[e.text, e.label] for e in pref], "held": [[e.text, e.label] for e in held],
                  "labels": ds.labels, "bank": bank.to_dict(), "method": method, "columns": [text_col, label_col],
                  "run": {"built": True, "pref_fraction": fraction, "pref_count": pref_count,
                          "temperature": temperature}})
    status = bank_status(bank, state, time.time() - t0, "built")
    if pref_count is not None:
        status += f"\n\n{pref_count} of {len(ds)} rows were used as preference samples (demo limit)."
    held_path = _out_file(HELD_OUT_FILE, upload.examples_csv(held, text_col, label_col)) if held else None
    status += "\n\n" + _bank_command(state, backend, model, base_url, api_key)
    return state, bank_frame(bank), heatmap(bank), _out_file("memory_bank.json", bank.to_json()), held_path, status


def _bank_command(state: dict, backend, model, base_url, api_key) -> str:
    run, (tcol, lcol) = state["run"], state["columns"]
    dataset = _file_arg(state["raw"]["name"], state["raw"]["text"])
    mod = _model_args(backend, model, base_url)
    notes = _notes(state, backend, api_key)
    if run["pref_count"] is None and run["pref_fraction"] >= 1:
        argv = upload.estimate_argv(dataset=dataset, text_column=tcol, label_column=lcol, model=mod,
                                    method=state["method"], temperature=run["temperature"], seed=SEED)
        return _command_md(argv, "this bank", notes)
    if not state["held"]:
        return "No rows are held out (their texts are all among the preference samples): no command line to show."
    argv = upload.evaluate_argv(dataset=dataset, test_file=HELD_OUT_FILE, text_column=tcol, label_column=lcol,
                                model=mod, methods=[state["method"], *BASELINES], pref_fraction=run["pref_fraction"],
                                pref_count=run["pref_count"], n_test=deploy.MAX_EVAL,
                                temperature=run["temperature"], seed=SEED)
    notes.append(f"{md(HELD_OUT_FILE)} from the download button; results.json holds this bank under banks → "
                 f"{md(state['method'])} and the batch evaluation on the held-out rows")
    return _command_md(argv, "this bank", notes)


@guarded
def upload_bank(file, text_col, label_col, state):
    """Use a saved bank (this app's JSON or the paper's {response: [labels]}) instead of building one.
    (api: /upload_bank)"""
    name, text = read_file(file, "memory bank")
    bank = MemoryBank.from_json(text)  # BankError -> clear message
    if len(bank) == 0:
        raise UserError(f"{esc(name)} holds an empty memory bank.")
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
    method = bank.meta.get("base_method") if bank.meta.get("base_method") in METHODS else "zero_shot"
    pref: list[Example] = []
    pref_count = None
    if ds is not None:
        pref_count = deploy.MAX_PREF if len(ds) > deploy.MAX_PREF else None
        pref = upload.preference_split(ds, pref_fraction=1.0, pref_count=pref_count, seed=SEED).preference.examples
    state.update({"samples": [[e.text, e.label] for e in pref], "held": [], "labels": labels,
                  "bank": bank.to_dict(), "method": method, "columns": [text_col, label_col] if ds else None,
                  "sample_labels": ds.labels if ds else None,
                  "run": {"built": False, "bank_file": _file_arg(name), "pref_fraction": 1.0, "pref_count": pref_count,
                          "temperature": bank.meta.get("temperature", 0.7)}})
    status = bank_status(bank, state, None, f"loaded from {md(name)}")
    unseen = sorted(r for r in bank.counts if r not in labels)
    if unseen:
        status += (f"\n\n{len(unseen)} bank entries are not among the candidate labels, so the model never gives "
                   f"those answers: {_labels_md(unseen, 8)}.")
    if not pref:
        status += "\n\nNo preference samples loaded: the kNN / logistic-regression baselines are off."
    return state, bank_frame(bank), heatmap(bank), _out_file("memory_bank.json", bank.to_json()), None, status


def _need_bank(state) -> dict:
    if not state or "bank" not in state:
        raise UserError("Build a memory bank first (section 2), or upload a saved one.")
    return state


# --------------------------------------------------------------------------- one query

def _fitted(state: dict, llm):
    """The session's base method, its CM with the session's bank (both fitted through the registry, on the
    session's preference samples), and the embedding baselines when there are samples."""
    labels = state["labels"]
    samples = [Example(t, y) for t, y in state.get("samples", [])]
    method = state.get("method", "zero_shot")
    if method not in METHODS:
        raise UserError(f"Unknown method {esc(method)}.")
    if registry.needs_samples(method) and not samples:
        raise UserError("Few-shot needs your preference samples; this bank was uploaded without them. "
                        "Load the samples too, or pick zero-shot.")
    bank = MemoryBank.from_dict(state["bank"])
    cm = registry.build(f"{method}+cm", labels=labels, llm=llm, decoding=Decoding(seed=SEED), bank=bank).fit(samples)
    baselines = {}
    if samples and len({s.label for s in samples}) >= 2:
        baselines = {name: registry.build(name, labels=labels).fit(samples) for name in BASELINES}
    return cm, bank, baselines


def _explain(base_label: str, info: dict) -> str:
    action = info.get("action")
    cands = info.get("candidates") or {}
    cand_txt = ", ".join(f"{k} ×{v}" for k, v in cands.items())
    if action == "keep" and not cands:
        return (f"keep: the model answered '{base_label}', which never came up on your samples, so the bank has no "
                "entry for it and CM keeps the model's answer.")
    if action == "keep":
        return f"keep: bank entry '{base_label}' → {cand_txt}; the answer is kept."
    if action == "map":
        only = next(iter(cands))
        if only == base_label:
            return f"map: bank entry '{base_label}' → {cand_txt}. On your samples this answer always meant '{only}'."
        return (f"map: bank entry '{base_label}' → {cand_txt}. When the model says '{base_label}' you always meant "
                f"'{only}', so CM maps it.")
    if action == "choose":
        return (f"choose: bank entry '{base_label}' → {cand_txt}. This answer meant several of your labels, so CM "
                "asked the model again, among those candidates only (scores below).")
    return str(action)


@deploy.gpu
@guarded
def ask(query, backend, model, base_url, api_key, state):
    """Answer one query with the baseline, CM and the embedding baselines. (api: /ask)"""
    state = _need_bank(state)
    q = " ".join((query or "").split())
    if not q:
        raise UserError("Type a query first.")
    if len(q) > deploy.MAX_QUERY_CHARS:
        raise UserError(f"The query is {len(q)} characters; at most {deploy.MAX_QUERY_CHARS} please.")
    with deploy.backend_for(backend, model, base_url, api_key) as llm:
        cm, bank, baselines = _fitted(state, llm)
        b = cm.base.predict([q])[0]
        c = cm.predict([q])[0]
    cands = c.info.get("candidates") or {}
    cond = bank.conditional(b.label)
    choice = c.info.get("choice_scores") or {}
    cand_df = pd.DataFrame([[k, v, round(cond.get(k, 0.0), 3), round(choice[k], 3) if k in choice else None]
                            for k, v in cands.items()], columns=CAND_COLUMNS)
    probs = b.probs or {}
    score_df = pd.DataFrame(sorted(({"label": k, "p(label | query)": round(v, 3)} for k, v in probs.items()),
                                   key=lambda r: -r["p(label | query)"]), columns=SCORE_COLUMNS)
    rows = [{"method": f"{cm.base.name} (baseline)", "answer": b.label,
             "confidence": round(probs.get(b.label, 0.0), 3) if probs else None},
            {"method": f"{cm.base.name} + CM", "answer": c.label,
             "confidence": round(choice.get(c.label, 0.0), 3) if choice else None}]
    for name, m in baselines.items():
        p = m.predict([q])[0]
        rows.append({"method": f"{name} (embeddings, your samples)", "answer": p.label,
                     "confidence": round((p.probs or {}).get(p.label, 0.0), 3)})
    if not baselines:
        rows.append({"method": "knn / logreg", "answer": "(need preference samples)", "confidence": None})
    return b.label, c.label, _explain(b.label, c.info), cand_df, score_df, pd.DataFrame(rows, columns=ALL_COLUMNS)


# --------------------------------------------------------------------------- batch evaluation

def _read_test(file, text_col, label_col, state) -> tuple[list[Example], str, str, str]:
    """(test rows, where they come from, how the command line names their file, its text column). A test file
    is read with the columns and the label set of the samples, as ``evaluate --test-file`` reads it."""
    if file:
        name, text = read_file(file, "test")
        cols = [str(c) for c in columns_of(text, name)]
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
    """Accuracy of the base method, its CM and the embedding baselines (each with CM) on labelled rows, with 95%
    CIs and McNemar's p against each CM's base: :func:`cm_core.evaluate.run_evaluation`. (api: /evaluate)"""
    state = _need_bank(state)
    rows, source, test_arg, test_text_col = _read_test(test_file, text_col, label_col, state)
    labels, method, run = state["labels"], state["method"], state["run"]
    pref = [Example(t, y) for t, y in state.get("samples", [])]
    note = []
    if len(rows) > deploy.MAX_EVAL:
        note.append(f"Only the first {deploy.MAX_EVAL} of {len(rows)} rows were evaluated (demo limit).")
    test = rows[:deploy.MAX_EVAL]
    overlap = len({e.text for e in pref} & {e.text for e in test})
    if overlap:
        note.append(f"{overlap} test rows are also preference samples; they flatter every method.")
    name = state["raw"]["name"] if state.get("raw") else "bank"
    ds = Dataset(Path(name).stem, pref, labels, name)
    split = Split(ds.subset(pref, "pref"), Dataset(f"{ds.name}:test", test, labels, source), SEED)
    methods = [method, *BASELINES] if pref else [method]
    given = None if run["built"] else MemoryBank.from_dict(state["bank"])
    with deploy.backend_for(backend, model, base_url, api_key) as llm:
        res = run_evaluation(ds, llm, methods, pref_fraction=run["pref_fraction"], pref_count=run["pref_count"],
                             n_test=deploy.MAX_EVAL, seed=SEED, bank_temperature=run["temperature"],
                             decoding=Decoding(seed=SEED), n_boot=N_BOOT, bank=given, split=split,
                             progress=lambda frac, what: progress(frac, desc=f"evaluating {what}"))
    table = pd.DataFrame([[r["method"], round(r["accuracy"], 3), round(r["ci_low"], 3), round(r["ci_high"], 3),
                           round(r["macro_f1"], 3), None if r["p_value"] is None else round(r["p_value"], 4), r["n"]]
                          for r in results_table(res)], columns=EVAL_COLUMNS)
    bank = MemoryBank.from_dict(res["banks"][method]["bank"])
    if run["built"] and bank.counts != state["bank"]["counts"]:
        note.append("The bank estimated for this evaluation differs from the one shown above (did the model "
                    "change?).")
    actions = [decide(b, bank).action for b in res["predictions"][method]]
    summary = _eval_summary(res, method, source, note)
    summary += "\n\n" + _eval_command(state, methods, test_arg, test_text_col, backend, model, base_url, api_key)
    per_row = pd.DataFrame({"text": res["texts"], "gold": res["gold"], **res["predictions"], "cm_action": actions})
    return table, summary, _out_file("cm_per_row.csv", per_row.to_csv(index=False))


def _eval_summary(res: dict, method: str, source: str, note: list[str]) -> str:
    r = res["results"]
    base, cm = r[method], r[f"{method}+cm"]
    acts = cm.get("actions", {})
    summary = (f"**{base['n']} rows from {md(source)}.** {md(method)} {base['accuracy']:.1%} → with CM "
               f"{cm['accuracy']:.1%} (McNemar p = {cm['p_value']:.3g}). CM kept the model's answer on "
               f"{acts.get('keep', 0)}, mapped it on {acts.get('map', 0)} and re-asked among candidates on "
               f"{acts.get('choose', 0)} rows.")
    if all(b in r for b in BASELINES):
        summary += (" For comparison, classifiers trained on the same samples: kNN "
                    f"{r['knn']['accuracy']:.1%} (with CM {r['knn+cm']['accuracy']:.1%}), logistic regression "
                    f"{r['logreg']['accuracy']:.1%} (with CM {r['logreg+cm']['accuracy']:.1%}).")
    if base["n"] < 100:
        summary += " With so few rows the confidence intervals are wide: treat differences with care."
    if note:
        summary += "\n\n" + " ".join(md(n) for n in note)
    return summary


def _eval_command(state: dict, methods: list[str], test_arg: str, test_text_col: str, backend, model, base_url,
                  api_key) -> str:
    run = state["run"]
    mod = _model_args(backend, model, base_url)
    notes = _notes(state, backend, api_key)
    if not state.get("samples"):  # a bank without samples: the command line answers the rows through it
        if MemoryBank.from_dict(state["bank"]).meta.get("labels") != state["labels"]:
            return ("No command line repeats this evaluation exactly: the uploaded bank does not carry its label "
                    "set, and no preference samples are loaded.")
        argv = upload.predict_argv(bank=run["bank_file"], input_file=test_arg, text_column=test_text_col,
                                   model=mod, method=f"{state['method']}+cm")
        notes.append(f"{md(run['bank_file'])} is the bank you uploaded")
        return _command_md(argv, "CM's answers (the per-row CSV's cm column)", notes)
    tcol, lcol = state["columns"]
    argv = upload.evaluate_argv(dataset=_file_arg(state["raw"]["name"], state["raw"]["text"]), test_file=test_arg,
                                text_column=tcol, label_column=lcol, model=mod, methods=methods,
                                pref_fraction=run["pref_fraction"], pref_count=run["pref_count"],
                                n_test=deploy.MAX_EVAL, temperature=run["temperature"], seed=SEED,
                                bank=None if run["built"] else run["bank_file"])
    if test_arg == HELD_OUT_FILE:
        notes.append(f"{md(HELD_OUT_FILE)} from section 2's download button")
    if not run["built"]:
        notes.append(f"{md(run['bank_file'])} is the bank you uploaded")
        if state.get("sample_labels") != state["labels"]:
            notes.append("the command line takes the label set from --dataset, which lacks some of the bank's "
                         "labels: its numbers can differ")
    return _command_md(argv, "this evaluation", notes)
