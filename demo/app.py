"""Consistent Marginalization demo: answer in *your* labels from a handful of your own examples.

Run locally (offline, embedded SmolLM2-135M on CPU):  ``python demo/app.py``  -> http://127.0.0.1:7860

Design notes
- Per-user data (parsed samples, held-out rows, the memory bank) lives in ``gr.State`` as plain JSON-able data;
  nothing per-user is kept in module globals. Methods are rebuilt per request from that data (cheap).
- The model handle is shared read-only: one instance per local spec in ``_BACKENDS`` (guarded by a lock).
  OpenAI-compatible backends are built per request, because they hold the key; the key is never stored in state,
  a log line or a message.
- The user's own labels are the candidate label set: the LLM answers among them, the bank counts
  (LLM answer -> user's label) on the preference samples, and CM marginalizes through it.
- Every bad input becomes a ``gr.Error`` with a readable message (HTML-escaped: gradio renders it as HTML).

Environment: CM_DEMO_CACHE_DIR (response cache; else CM_CACHE_DIR, else ~/.cache/cm-personalize),
CM_DEMO_RESPONSE_CACHE=0 (keep no prompts/answers on disk),
CM_DEMO_BACKEND (embedded|openai|hf), CM_DEMO_MODEL (model name for openai/hf), OPENAI_API_KEY,
OPENAI_BASE_URL, GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, SPACE_ID (set by Hugging Face Spaces).

Public deployments (SPACE_ID set, or CM_DEMO_PUBLIC=1) refuse what a visitor could abuse: loading Hugging Face
models by id (downloads of GBs into memory shared by everyone; allow with CM_DEMO_ALLOW_HF=1, optionally limited to
CM_DEMO_HF_MODELS=id1,id2) and base URLs that resolve to private, loopback or link-local addresses (the server's
own network; allow with CM_DEMO_ALLOW_PRIVATE_URLS=1). Everywhere, the server's OPENAI_API_KEY is sent only to the
server's own endpoint (OPENAI_BASE_URL or OpenAI), never to a base URL typed by a visitor.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import html
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default; no phoning home

HERE = Path(__file__).resolve().parent
try:  # repository layout: demo/ next to cm_core/; on a Space, cm_core/ is copied next to app.py
    import cm_core  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the app is started
    sys.path.insert(0, str(HERE.parent))

import gradio as gr  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cm_core.backends import DEFAULT_CACHE_DIR, CachedLLM, ResponseCache, make_backend  # noqa: E402
from cm_core.bank import MemoryBank  # noqa: E402
from cm_core.baselines import KNN, LogReg  # noqa: E402
from cm_core.cm import CM  # noqa: E402
from cm_core.data import Example, columns_of, parse_examples, sniff_format  # noqa: E402
from cm_core.errors import CMError, DataError  # noqa: E402
from cm_core.evaluate import mcnemar_p, summarize  # noqa: E402
from cm_core.methods import Decoding  # noqa: E402
from cm_core.registry import build_chooser, build_method  # noqa: E402

try:  # ZeroGPU on Hugging Face Spaces; the app never needs it
    import spaces  # type: ignore

    _gpu = spaces.GPU(duration=120)
except Exception:  # ImportError, or not on a GPU Space
    def _gpu(fn):
        return fn

# --------------------------------------------------------------------------- limits and defaults

MAX_FILE_MB = 5
MAX_FILE_BYTES = MAX_FILE_MB * 1024 * 1024
MAX_PREF = int(os.environ.get("CM_DEMO_MAX_PREF", "300"))  # preference samples per bank
MAX_EVAL = int(os.environ.get("CM_DEMO_MAX_EVAL", "300"))  # rows per batch evaluation
MAX_LABELS = 50
MAX_QUERY_CHARS = 1000
SEED = 40
CHUNK = 8  # rows per progress step
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
BANK_COLUMNS = ["model answer (response)", "your label", "count", "p"]
CAND_COLUMNS = ["candidate", "count in bank", "p(your label | model answer)", "re-ask score"]
SCORE_COLUMNS = ["label", "p(label | query)"]
ALL_COLUMNS = ["method", "answer", "confidence"]
EVAL_COLUMNS = ["method", "accuracy", "95% CI low", "95% CI high", "macro-F1", "p vs baseline (McNemar)", "n"]
TEXT_HINTS = ("text", "input", "query", "utterance", "sentence", "question", "message")
LABEL_HINTS = ("label", "my_label", "labels", "intent", "category", "class", "tag", "scenario")


def cache_dir() -> Path:
    """Response cache for this app: CM_DEMO_CACHE_DIR, else CM_CACHE_DIR, else the library's default."""
    env = os.environ.get("CM_DEMO_CACHE_DIR") or os.environ.get("CM_CACHE_DIR")
    return Path(env) if env else Path(DEFAULT_CACHE_DIR)


def use_response_cache() -> bool:
    """CM_DEMO_RESPONSE_CACHE=0 keeps no prompts or answers on disk (slower: nothing is reused)."""
    return os.environ.get("CM_DEMO_RESPONSE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


# --------------------------------------------------------------------------- errors shown to the user

class UserError(Exception):
    """A problem the user can fix; shown as it is."""


def _esc(value: Any) -> str:
    """User-provided text inside a message: gradio renders messages and Markdown as HTML."""
    return html.escape(str(value), quote=False)


def _md(value: Any) -> str:
    """User text inside Markdown: HTML-escaped and Markdown-inert."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", _esc(value))


def _redact(message: str, secret: str | None) -> str:
    if secret:
        message = message.replace(secret, "[redacted]")
    return message


def guarded(fn):
    """Turn every exception into a clear gr.Error; nothing reaches the user as a traceback or a crash."""

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            secret = sig.bind_partial(*args, **kwargs).arguments.get("api_key")
        except TypeError:
            secret = None
        secret = secret if isinstance(secret, str) and len(secret) >= 4 else None
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(_redact(str(e), secret), title="Please check your input", print_exception=False) from None
        except CMError as e:
            raise gr.Error(_esc(_redact(str(e), secret)), title=type(e).__name__, print_exception=False) from None
        except MemoryError:
            raise gr.Error("Out of memory: try fewer samples or a smaller model.", print_exception=False) from None
        except Exception as e:  # a bug or an unexpected library error: say what, keep the app running
            msg = _esc(_redact(f"{type(e).__name__}: {e}", secret))[:500]
            raise gr.Error(f"Unexpected error ({msg}). The app is still running; please try again.",
                           print_exception=False) from None

    return wrapper


# --------------------------------------------------------------------------- reading uploads

def _read_upload(path: str | None, what: str) -> tuple[str, str]:
    """(file name, UTF-8 text) of an uploaded file, with size and encoding checked here too."""
    if not path:
        raise UserError(f"No {what} file was uploaded.")
    p = Path(path)
    name = p.name
    if not p.is_file():
        raise UserError(f"The uploaded {what} file {_esc(name)} could not be read; please upload it again.")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(f"{_esc(name)} is {size / 1e6:.1f} MB; files over {MAX_FILE_MB} MB are refused.")
    return name, _decode(p.read_bytes(), name)


def _decode(raw: bytes, name: str) -> str:
    if len(raw) > MAX_FILE_BYTES:
        raise UserError(f"{_esc(name)} is {len(raw) / 1e6:.1f} MB; files over {MAX_FILE_MB} MB are refused.")
    if not raw.strip():
        raise UserError(f"{_esc(name)} is empty.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{_esc(name)} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}). "
                        "Save it as UTF-8 (in Excel: CSV UTF-8) and upload again.") from None
    if "\x00" in text:
        raise UserError(f"{_esc(name)} looks like a binary file, not CSV or JSONL text.")
    return text


def _guess_columns(text: str, name: str, cols: list[str]) -> tuple[str | None, str | None]:
    """Text column: a hinted name, else the column with the longest values. Label: a hinted name, else the
    remaining column with the fewest distinct values."""
    low = {c.lower(): c for c in cols}
    text_col = next((low[h] for h in TEXT_HINTS if h in low), None)
    label_col = next((low[h] for h in LABEL_HINTS if h in low and low[h] != text_col), None)
    if text_col and label_col:
        return text_col, label_col
    try:
        fmt = sniff_format(name, text)
        rows = []
        if fmt == "jsonl":
            for line in text.splitlines()[:200]:
                if line.strip():
                    rec = json.loads(line)
                    if isinstance(rec, dict):
                        rows.append(rec)
        else:
            import csv
            import io
            reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
            for i, rec in enumerate(reader):
                if i >= 200:
                    break
                rows.append(rec)
        avg_len = {c: sum(len(str(r.get(c) or "")) for r in rows) / max(1, len(rows)) for c in cols}
        distinct = {c: len({str(r.get(c)) for r in rows}) for c in cols}
    except Exception:
        return text_col or (cols[0] if cols else None), label_col or (cols[1] if len(cols) > 1 else None)
    if text_col is None and cols:
        text_col = max(cols, key=lambda c: avg_len[c])
    if label_col is None:
        rest = [c for c in cols if c != text_col and distinct[c] > 1] or [c for c in cols if c != text_col]
        label_col = min(rest, key=lambda c: distinct[c]) if rest else None
    return text_col, label_col


def _parse(raw: dict, text_col: str | None, label_col: str | None) -> list[Example]:
    if not raw:
        raise UserError("Load preference samples first: upload a CSV/JSONL file, paste text, or click "
                        "<b>Use the built-in example</b>.")
    cols = raw["columns"]
    if not text_col or not label_col:
        raise UserError(f"Pick the text column and the label column (the file has: {_esc(', '.join(cols))}).")
    for what, col in (("text", text_col), ("label", label_col)):
        if col not in cols:
            raise UserError(f"The {what} column {_esc(repr(col))} is not in {_esc(raw['name'])}; its columns are: "
                            f"{_esc(', '.join(cols))}.")
    if text_col == label_col:
        raise UserError("The text column and the label column must be different columns.")
    try:
        examples = parse_examples(raw["text"], source=raw["name"], text_column=text_col, label_column=label_col)
    except DataError as e:
        msg = str(e)
        if "empty label" in msg or "missing label" in msg:
            msg += " Every preference sample needs a label (your label for that text)."
        raise UserError(_esc(msg)) from None
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise UserError(f"Only one distinct label ({_esc(labels[0])}) in column {_esc(repr(label_col))}: "
                        "CM needs at least two of your labels. Is that the right label column?")
    if len(labels) > MAX_LABELS:
        raise UserError(f"Column {_esc(repr(label_col))} has {len(labels)} distinct values; this demo takes at most "
                        f"{MAX_LABELS} labels. Is that the right label column?")
    return examples


def _split(examples: list[Example], fraction: float, seed: int = SEED) -> tuple[list[Example], list[Example]]:
    """Stratified: about ``fraction`` of each label's rows are preference samples, the rest held out (disjoint)."""
    by_label: dict[str, list[Example]] = collections.defaultdict(list)
    for e in examples:
        by_label[e.label].append(e)
    rng = random.Random(seed)
    pref, held = [], []
    for lab in sorted(by_label):
        rows = by_label[lab][:]
        rng.shuffle(rows)
        k = len(rows) if fraction >= 1 else max(1, math.ceil(fraction * len(rows) - 1e-9))
        k = min(k, len(rows))
        pref += rows[:k]
        held += rows[k:]
    rng.shuffle(pref)
    pref_texts = {e.text for e in pref}
    held = [e for e in held if e.text not in pref_texts]
    return pref, held


# --------------------------------------------------------------------------- the shared model handle

_BACKENDS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_BACKENDS_LOCK = threading.Lock()
MAX_LOCAL_MODELS = int(os.environ.get("CM_DEMO_MAX_MODELS", "2"))


def _spec(backend: str, model: str) -> str:
    backend = (backend or "embedded").strip().lower()
    model = (model or "").strip()
    if backend == "embedded":
        return "embedded"
    if backend not in ("openai", "hf"):
        raise UserError(f"Unknown backend {_esc(backend)}; choose embedded, openai or hf.")
    if not model:
        raise UserError(f"The {backend} backend needs a model name, e.g. "
                        + ("gpt-4o-mini" if backend == "openai" else "HuggingFaceTB/SmolLM2-360M-Instruct") + ".")
    if len(model) > 200 or any(c.isspace() for c in model):
        raise UserError("The model name looks wrong (no spaces, at most 200 characters).")
    return f"{backend}:{model}"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_public() -> bool:
    """Served to strangers: a Hugging Face Space (SPACE_ID) or CM_DEMO_PUBLIC=1."""
    return bool(os.environ.get("SPACE_ID")) or _flag("CM_DEMO_PUBLIC")


def check_hf_allowed(model: str) -> None:
    if not is_public():
        return
    if not _flag("CM_DEMO_ALLOW_HF"):
        raise UserError("This public demo does not load Hugging Face models by name (each one is gigabytes of "
                        "download and memory shared by every visitor). Use the embedded model or an "
                        "OpenAI-compatible API, or run the demo on your own machine: python demo/app.py")
    allowed = [m.strip() for m in os.environ.get("CM_DEMO_HF_MODELS", "").split(",") if m.strip()]
    if allowed and model not in allowed:
        raise UserError(f"This demo serves only these Hugging Face models: {_esc(', '.join(allowed))}.")


def check_base_url(url: str) -> None:
    """A typed base URL must be http(s); on a public deployment it must not reach the server's own network."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit
    if not re.match(r"^https?://", url):
        raise UserError("The base URL must start with http:// or https://, e.g. http://127.0.0.1:8000/v1")
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise UserError("The base URL has no host name, e.g. https://api.example.com/v1")
    if not is_public() or _flag("CM_DEMO_ALLOW_PRIVATE_URLS"):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addrs = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError):
        raise UserError(f"Cannot resolve the base URL's host {_esc(host)}.") from None
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%")[0])
        if not ip.is_global:  # private, loopback, link-local (cloud metadata), reserved, ...
            raise UserError(f"This public demo does not connect to {_esc(host)}: it resolves to a private or "
                            "local address. Run the demo on your own machine to use a local server.")


def _shared_model(spec: str, persistent_cache: bool):
    key = (spec, str(cache_dir()), persistent_cache)
    with _BACKENDS_LOCK:  # first user waits while the model loads; later ones get the same handle
        llm = _BACKENDS.get(key)
        if llm is None:
            llm = make_backend(spec, cache_dir=cache_dir(), use_cache=persistent_cache)
            _BACKENDS[key] = llm
            while len(_BACKENDS) > MAX_LOCAL_MODELS:
                _BACKENDS.popitem(last=False)  # dropped from the cache; a request still using it keeps it alive
        else:
            _BACKENDS.move_to_end(key)
        return llm


@contextlib.contextmanager
def backend_for(backend: str, model: str, base_url: str | None, api_key: str | None):
    """Yield an LLM. Local models are shared (one per spec, read-only); an OpenAI client lives for one request,
    since it holds the key. Without the persistent response cache, a request-scoped in-memory one is used."""
    spec = _spec(backend, model)
    persistent = use_response_cache()
    owned = None
    if spec.startswith("openai:"):
        base_url = (base_url or "").strip() or None
        api_key = (api_key or "").strip() or None
        if base_url:
            check_base_url(base_url)
            if api_key is None:
                api_key = "EMPTY"  # never send the server's own OPENAI_API_KEY to a URL a visitor typed
        llm = owned = make_backend(spec, cache_dir=cache_dir(), use_cache=persistent, base_url=base_url,
                                   api_key=api_key, max_retries=2, timeout=60.0)
    else:
        if spec.startswith("hf:"):
            check_hf_allowed(spec[3:])
        llm = _shared_model(spec, persistent)
    if not persistent:
        llm = CachedLLM(llm, ResponseCache(":memory:"))
    try:
        yield llm
    finally:
        if not persistent:
            llm.cache.close()
        if owned is not None:
            owned.close()


def _decoding(llm) -> Decoding:
    """Score mode: the model's answer is its most likely candidate among your labels (calibrated on a content-free
    input). A capable model sees your labels listed in the prompt (and a generation-only API must). The embedded
    135M model does not: on the built-in example it is both more accurate (30% vs 15% zero-shot) and about three
    times faster when each label is scored directly as the reply, without the list."""
    return Decoding(mode="score", calibrate=True, list_labels=getattr(llm, "kind", "") != "embedded", seed=SEED)


def _methods(state: dict, llm, method: str | None = None):
    """Base method (fitted), its CM wrapper with the session's bank, and the embedding baselines (or None)."""
    labels = state["labels"]
    samples = [Example(t, y) for t, y in state.get("samples", [])]
    method = method or state.get("method", "zero_shot")
    if method not in METHODS:
        raise UserError(f"Unknown method {_esc(method)}.")
    if method == "few_shot" and not samples:
        raise UserError("Few-shot needs your preference samples; this bank was uploaded without them. "
                        "Load the samples too, or pick zero-shot.")
    dec = _decoding(llm)
    base = build_method(method, llm, labels, dec)
    base.fit(samples)
    chooser = build_chooser(method, base, llm, labels, dec)
    bank = MemoryBank.from_dict(state["bank"])
    cm = CM(base, chooser, bank=bank)
    cm.bank_ = bank
    baselines = {}
    if samples and len({s.label for s in samples}) >= 2:
        baselines = {"knn": KNN(labels).fit(samples), "logreg": LogReg(labels).fit(samples)}
    return base, cm, baselines


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


def bank_table(bank: MemoryBank) -> pd.DataFrame:
    rows = bank.rows()
    return pd.DataFrame([[r["response"], r["label"], r["count"], r["p"]] for r in rows], columns=BANK_COLUMNS)


def heatmap(bank: MemoryBank, labels: list[str]) -> Figure:
    """Counts of (base response -> your label). The diagonal is where the model already speaks your language."""
    responses = sorted(bank.counts, key=lambda r: (labels.index(r) if r in labels else len(labels), r))
    cols = list(labels) + sorted({lab for r in bank.counts.values() for lab in r} - set(labels))
    data = pd.DataFrame(0, index=responses, columns=cols, dtype=int)
    for resp, row in bank.counts.items():
        for lab, c in row.items():
            data.loc[resp, lab] = c
    w = min(14.0, 2.5 + 0.7 * len(cols))
    h = min(12.0, 2.0 + 0.55 * max(1, len(responses)))
    fig = Figure(figsize=(w, h), dpi=100)
    ax = fig.subplots()
    if data.size:
        sns.heatmap(data, annot=True, fmt="d", cmap="Blues", cbar=False, linewidths=0.5, linecolor="#ddd", ax=ax,
                    annot_kws={"size": 9})
        for i, resp in enumerate(responses):  # outline agreement cells
            if resp in cols:
                ax.add_patch(matplotlib.patches.Rectangle((cols.index(resp), i), 1, 1, fill=False, ec="#2a7", lw=2))
    ax.set_xlabel("your label")
    ax.set_ylabel("model's answer on your sample")
    ax.set_title("Memory bank counts (green: model and you agree; off-diagonal: your words differ)", fontsize=9)
    ax.tick_params(axis="x", labelrotation=35)
    ax.tick_params(axis="y", labelrotation=0)
    for t in ax.get_xticklabels():
        t.set_ha("right")
    fig.tight_layout()
    return fig


def bank_status(bank: MemoryBank, state: dict, seconds: float | None, origin: str) -> str:
    st = bank.stats()
    lines = [f"**Memory bank {origin}**" + (f" in {seconds:.1f} s" if seconds is not None else "") + ": "
             f"{st['samples']} samples, {st['entries']} model answers, {len(state['labels'])} labels; "
             f"the model already agreed with your label on {st['agreement']:.0%} of your samples; "
             f"{st['multi_candidate']} answer(s) map to several of your labels (CM re-asks among those)."]
    if state.get("held"):
        lines.append(f"{len(state['held'])} held-out rows are kept for the batch evaluation.")
    model = bank.meta.get("model")
    if model:
        lines.append(f"Built with {_md(model.get('kind'))}:{_md(model.get('model'))}, "
                     f"method {_md(bank.meta.get('base_method', '?'))}, "
                     f"temperature {_md(bank.meta.get('temperature'))}.")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- event handlers

def _load_raw(name: str, text: str) -> tuple[dict, Any, Any, str, pd.DataFrame]:
    try:
        cols = columns_of(text, name)
    except DataError as e:
        raise UserError(_esc(str(e))) from None
    cols = [str(c) for c in cols if c is not None]
    if not cols:
        raise UserError(f"{_esc(name)} has no columns: it needs a header row (CSV) or JSON objects (JSONL).")
    if len(cols) < 2:
        raise UserError(f"{_esc(name)} has only the column {_esc(cols[0])}; it needs a text column and a label "
                        "column (for CSV: a header row like <code>text,label</code>).")
    text_col, label_col = _guess_columns(text, name, cols)
    raw = {"name": name, "text": text, "columns": cols}
    preview = pd.DataFrame()
    n = "?"
    try:
        ex = parse_examples(text, source=name, text_column=text_col, label_column=label_col)
        preview = pd.DataFrame([{"text": e.text, "label": e.label} for e in ex[:8]])
        n = str(len(ex))
        labs = sorted({e.label for e in ex})
        lab_txt = ", ".join(labs[:12]) + (" …" if len(labs) > 12 else "")
        msg = (f"Loaded **{_md(name)}**: {n} rows, columns {_md(', '.join(cols))}. Using text column "
               f"**{_md(text_col)}** and label column **{_md(label_col)}** ({len(labs)} labels: {_md(lab_txt)}). "
               "Change the columns below if that is wrong, then build the memory bank.")
    except DataError as e:
        msg = (f"Loaded **{_md(name)}** (columns {_md(', '.join(cols))}), but with the guessed columns it does not "
               f"parse: {_md(str(e))}. Pick the right text and label columns.")
    return (raw, gr.Dropdown(choices=cols, value=text_col), gr.Dropdown(choices=cols, value=label_col), msg, preview)


@guarded
def load_samples(file, pasted, state):
    """Upload or paste preference samples: fills the column dropdowns. (api: /load_samples)"""
    if file:
        name, text = _read_upload(file, "samples")
    elif pasted and pasted.strip():
        name = "pasted.jsonl" if pasted.lstrip().startswith("{") else "pasted.csv"
        text = _decode(pasted.encode("utf-8"), "The pasted text")
    else:
        raise UserError("Upload a CSV/JSONL file or paste some rows first.")
    raw, tcol, lcol, msg, preview = _load_raw(name, text)
    state = _fresh_state(state, raw)
    return state, tcol, lcol, msg, preview


@guarded
def load_example(state):
    """The built-in example: one user's slang for eight everyday scenarios. (api: /use_example)"""
    name, text = EXAMPLE_SAMPLES.name, EXAMPLE_SAMPLES.read_text(encoding="utf-8")
    raw, tcol, lcol, msg, preview = _load_raw(name, text)
    state = _fresh_state(state, raw)
    msg += ("\n\nThis user says *wake-up buzz* for alarms, *sky report* for weather, *grub* for food (kitchen timers "
            "included) and *headlines* for news (news podcasts included). A labelled test file is built in for the "
            "batch evaluation.")
    return state, tcol, lcol, msg, preview, str(EXAMPLE_TEST)


def _fresh_state(state: dict | None, raw: dict) -> dict:
    """New samples replace the old ones and the bank built from them (a stale bank would mislead)."""
    return {"raw": raw}


def _preview(state, text_col, label_col):
    """Column dropdowns changed: re-parse for the preview; problems are shown in the status line, not raised."""
    raw = (state or {}).get("raw")
    if not raw or not text_col or not label_col:
        return gr.skip(), gr.skip()
    try:
        ex = _parse(raw, text_col, label_col)
    except UserError as e:
        return f"⚠️ {e}", pd.DataFrame()
    labs = sorted({e.label for e in ex})
    return (f"{len(ex)} rows with text column **{_md(text_col)}** and label column **{_md(label_col)}**: "
            f"{len(labs)} labels ({_md(', '.join(labs[:12]))}{' …' if len(labs) > 12 else ''})."), \
        pd.DataFrame([{"text": e.text, "label": e.label} for e in ex[:8]])


@_gpu
@guarded
def build_bank(text_col, label_col, backend, model, base_url, api_key, method, pref_fraction, temperature, state,
               progress=gr.Progress()):
    """Run the base method on the preference samples and count (model answer -> your label). (api: /build_bank)"""
    state = dict(state or {})
    examples = _parse(state.get("raw"), text_col, label_col)
    try:
        fraction = float(pref_fraction)
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise UserError("The preference fraction and the temperature must be numbers.") from None
    if not 0 < fraction <= 1:
        raise UserError("The preference fraction must be in (0, 1].")
    if not 0 <= temperature <= 2:
        raise UserError("The temperature must be between 0 and 2.")
    method = method or "zero_shot"
    if method not in METHODS:
        raise UserError(f"Unknown base method {_esc(method)}; choose one of: {', '.join(METHODS)}.")
    pref, held = _split(examples, fraction)
    note = ""
    if len(pref) > MAX_PREF:
        note = f" Only the first {MAX_PREF} of {len(pref)} preference samples were used (demo limit)."
        pref = pref[:MAX_PREF]
    labels = sorted({e.label for e in examples})
    t0 = time.time()
    progress(0.0, desc="loading the model")
    with backend_for(backend, model, base_url, api_key) as llm:
        dec = _decoding(llm)
        base = build_method(method, llm, labels, dec)
        base.fit(pref)
        texts = [e.text for e in pref]
        for start in range(0, len(texts), CHUNK):  # fills the response cache chunk by chunk, for the progress bar
            progress(start / len(texts), desc=f"asking the model: sample {start + 1}-"
                                              f"{min(start + CHUNK, len(texts))} of {len(texts)}")
            base.predict(texts[start:start + CHUNK])
        progress(1.0, desc="counting the memory bank")
        cm = CM(base, temperature=temperature, seed=SEED).fit(pref, fit_base=False)
    bank = cm.bank_
    bank.meta.update({"labels": labels, "source": state["raw"]["name"], "text_column": text_col,
                      "label_column": label_col})
    state.update({"samples": [[e.text, e.label] for e in pref], "held": [[e.text, e.label] for e in held],
                  "labels": labels, "bank": bank.to_dict(), "method": method,
                  "columns": [text_col, label_col]})
    seconds = time.time() - t0
    status = bank_status(bank, state, seconds, "built") + note
    path = _out_file("memory_bank.json", bank.to_json())
    return state, bank_table(bank), heatmap(bank, labels), path, status


@guarded
def upload_bank(file, text_col, label_col, state):
    """Use a saved bank (this app's JSON or the paper's {response: [labels]}) instead of building one.
    (api: /upload_bank)"""
    name, text = _read_upload(file, "memory bank")
    bank = MemoryBank.from_json(text)  # BankError -> clear message
    if len(bank) == 0:
        raise UserError(f"{_esc(name)} holds an empty memory bank.")
    state = dict(state or {})
    samples: list[Example] = []
    if state.get("raw") and text_col and label_col:
        with contextlib.suppress(UserError):
            samples = _parse(state["raw"], text_col, label_col)
    bank_labels = {lab for row in bank.counts.values() for lab in row}
    labels = bank.meta.get("labels")
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        labels = sorted(bank_labels | {e.label for e in samples})
    labels = sorted(set(labels) | bank_labels)
    if len(labels) < 2:
        raise UserError("The bank names only one label; CM needs at least two.")
    if len(labels) > MAX_LABELS:
        raise UserError(f"The bank names {len(labels)} labels; this demo takes at most {MAX_LABELS}.")
    method = bank.meta.get("base_method") if bank.meta.get("base_method") in METHODS else "zero_shot"
    state.update({"samples": [[e.text, e.label] for e in samples], "held": [], "labels": labels,
                  "bank": bank.to_dict(), "method": method})
    status = bank_status(bank, state, None, f"loaded from {_md(name)}")
    unseen = sorted(r for r in bank.counts if r not in labels)
    if unseen:
        status += (f"\n\n{len(unseen)} bank entries are not among the candidate labels, so the model never gives "
                   f"those answers: {_md(', '.join(unseen[:8]))}{' …' if len(unseen) > 8 else ''}.")
    if not samples:
        status += "\n\nNo preference samples loaded: the kNN / logistic-regression baselines are off."
    return state, bank_table(bank), heatmap(bank, labels), _out_file("memory_bank.json", bank.to_json()), status


def _need_bank(state) -> dict:
    if not state or "bank" not in state:
        raise UserError("Build a memory bank first (section 2), or upload a saved one.")
    return state


def _explain(base_label: str, info: dict, bank: MemoryBank) -> str:
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


@_gpu
@guarded
def ask(query, backend, model, base_url, api_key, state):
    """Answer one query with the baseline, CM and the embedding baselines. (api: /ask)"""
    state = _need_bank(state)
    q = " ".join((query or "").split())
    if not q:
        raise UserError("Type a query first.")
    if len(q) > MAX_QUERY_CHARS:
        raise UserError(f"The query is {len(q)} characters; at most {MAX_QUERY_CHARS} please.")
    with backend_for(backend, model, base_url, api_key) as llm:
        base, cm, baselines = _methods(state, llm)
        b = base.predict([q])[0]
        c = cm.predict([q])[0]
    bank = cm.bank_
    cands = c.info.get("candidates") or {}
    cond = bank.conditional(b.label)
    choice = c.info.get("choice_scores") or {}
    cand_rows = [{"candidate": k, "count in bank": v, "p(your label | model answer)": round(cond.get(k, 0.0), 3),
                  "re-ask score": round(choice[k], 3) if k in choice else None} for k, v in cands.items()]
    cand_df = pd.DataFrame(cand_rows, columns=CAND_COLUMNS)
    probs = b.probs or {}
    score_df = pd.DataFrame(sorted(({"label": k, "p(label | query)": round(v, 3)} for k, v in probs.items()),
                                   key=lambda r: -r["p(label | query)"]), columns=SCORE_COLUMNS)
    rows = [{"method": f"{base.name} (baseline)", "answer": b.label,
             "confidence": round(probs.get(b.label, 0.0), 3) if probs else None},
            {"method": f"{base.name} + CM", "answer": c.label,
             "confidence": round(choice.get(c.label, 0.0), 3) if choice else None}]
    for name, m in baselines.items():
        p = m.predict([q])[0]
        rows.append({"method": f"{name} (embeddings, your samples)", "answer": p.label,
                     "confidence": round((p.probs or {}).get(p.label, 0.0), 3)})
    if not baselines:
        rows.append({"method": "knn / logreg", "answer": "(need preference samples)", "confidence": None})
    all_df = pd.DataFrame(rows, columns=ALL_COLUMNS)
    return b.label, c.label, _explain(b.label, c.info, bank), cand_df, score_df, all_df


def _read_test(file, text_col, label_col, state) -> tuple[list[Example], str]:
    if file:
        name, text = _read_upload(file, "test")
        try:
            cols = [str(c) for c in columns_of(text, name)]
        except DataError as e:
            raise UserError(_esc(str(e))) from None
        tcol, lcol = (state.get("columns") or [None, None])
        if not (tcol in cols and lcol in cols):
            if text_col in cols and label_col in cols:
                tcol, lcol = text_col, label_col
            else:
                tcol, lcol = _guess_columns(text, name, cols)
        if not tcol or not lcol or tcol == lcol:
            raise UserError(f"Cannot find a text and a label column in {_esc(name)} (columns: "
                            f"{_esc(', '.join(cols))}). Use the same column names as your samples.")
        try:
            return parse_examples(text, source=name, text_column=tcol, label_column=lcol), name
        except DataError as e:
            raise UserError(_esc(str(e))) from None
    held = state.get("held") or []
    if not held:
        raise UserError("Upload a labelled test file, or build the bank with a preference fraction below 1 so some "
                        "rows are held out for the evaluation.")
    return [Example(t, y) for t, y in held], "held-out rows"


@_gpu
@guarded
def evaluate_batch(test_file, text_col, label_col, backend, model, base_url, api_key, state,
                   progress=gr.Progress()):
    """Accuracy of baseline vs CM (and kNN / logreg) on labelled rows, with 95% CIs and McNemar's p.
    (api: /evaluate)"""
    state = _need_bank(state)
    rows, source = _read_test(test_file, text_col, label_col, state)
    note = []
    if len(rows) > MAX_EVAL:
        note.append(f"Only the first {MAX_EVAL} of {len(rows)} rows were evaluated (demo limit).")
        rows = rows[:MAX_EVAL]
    sample_texts = {t for t, _ in state.get("samples", [])}
    overlap = sum(1 for r in rows if r.text in sample_texts)
    if overlap:
        note.append(f"{overlap} test rows are also preference samples; they flatter every method.")
    unknown = sum(1 for r in rows if r.label not in state["labels"])
    if unknown:
        note.append(f"{unknown} test rows have a label that is not among your samples' labels; every method gets "
                    "them wrong.")
    texts, gold = [r.text for r in rows], [r.label for r in rows]
    preds: dict[str, list] = {"baseline": [], "cm": []}
    actions = []
    with backend_for(backend, model, base_url, api_key) as llm:
        base, cm, baselines = _methods(state, llm)
        for start in range(0, len(texts), CHUNK):
            progress(start / len(texts), desc=f"rows {start + 1}-{min(start + CHUNK, len(texts))} of {len(texts)}")
            chunk = texts[start:start + CHUNK]
            preds["baseline"] += [p.label for p in base.predict(chunk)]
            cps = cm.predict(chunk)
            preds["cm"] += [p.label for p in cps]
            actions += [p.info.get("action") for p in cps]
    for name, m in baselines.items():
        preds[name] = [p.label for p in m.predict(texts)]
    progress(1.0, desc="bootstrap confidence intervals")
    names = {"baseline": f"{base.name} (baseline)", "cm": f"{base.name} + CM",
             "knn": "kNN (embeddings, your samples)", "logreg": "logistic regression (embeddings, your samples)"}
    table = []
    for key, pred in preds.items():
        s = summarize(gold, pred, n_boot=1000, seed=0)
        table.append({"method": names[key], "accuracy": round(s["accuracy"], 3), "95% CI low": round(s["ci95"][0], 3),
                      "95% CI high": round(s["ci95"][1], 3), "macro-F1": round(s["macro_f1"], 3),
                      "p vs baseline (McNemar)": None if key == "baseline" else
                      round(mcnemar_p(gold, preds["baseline"], pred), 4), "n": s["n"]})
    df = pd.DataFrame(table, columns=EVAL_COLUMNS)
    acc = {r["method"]: r["accuracy"] for r in table}
    p_cm = table[1]["p vs baseline (McNemar)"]
    counts = collections.Counter(actions)
    summary = (f"**{len(rows)} rows from {_md(source)}.** Baseline {acc[names['baseline']]:.1%} → CM "
               f"{acc[names['cm']]:.1%} (McNemar p = {p_cm:.3g}). CM kept the model's answer on {counts['keep']}, "
               f"mapped it on {counts['map']} and re-asked among candidates on {counts['choose']} rows.")
    if baselines:
        summary += (f" For comparison, classifiers trained on the same samples: kNN {acc[names['knn']]:.1%}, "
                    f"logistic regression {acc[names['logreg']]:.1%}.")
    if len(rows) < 100:
        summary += " With so few rows the confidence intervals are wide: treat differences with care."
    if note:
        summary += "\n\n" + " ".join(_md(n) for n in note)
    per_row = pd.DataFrame({"text": texts, "gold": gold, "baseline": preds["baseline"], "cm": preds["cm"],
                            "cm_action": actions, **{k: v for k, v in preds.items() if k in ("knn", "logreg")}})
    path = _out_file("cm_per_row.csv", per_row.to_csv(index=False))
    return df, summary, path


def use_example_test():
    """(api: /example_test) The built-in labelled test file, as an upload."""
    return str(EXAMPLE_TEST)


# --------------------------------------------------------------------------- layout

INTRO = """# Consistent Marginalization: an LLM that answers in *your* labels

Give a handful of your own examples (a text and the label **you** would give it). The model is asked to choose among
**your labels**; on your samples we count which of your labels each of its answers really meant (the *memory bank*).
At question time CM maps the model's answer through that bank, or re-asks among the few labels it could mean.
No training, no weights changed: the bank is a small table you can download.

The default model is tiny and offline (SmolLM2-135M on CPU), so expect modest accuracy: the kNN and logistic-regression
rows show what a classifier trained on the same samples gets. Under *Model settings* you can pick an
OpenAI-compatible API or another local model for a realistic run.
"""

HOW_TO = """**Format:** CSV/TSV with a header row, or JSONL (one JSON object per line). One column holds the text,
another your label. Up to 5 MB, UTF-8. Example: `utterance,my_label` / `wake me at six,wake-up buzz`."""


def build_demo() -> gr.Blocks:
    default_backend = os.environ.get("CM_DEMO_BACKEND", "embedded")
    if default_backend not in ("embedded", "openai", "hf"):
        default_backend = "embedded"
    with gr.Blocks(title="CM: answer in your labels", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as demo:
        state = gr.State(None)
        gr.Markdown(INTRO)

        with gr.Accordion("Model settings", open=False):
            with gr.Row():
                backend = gr.Radio(["embedded", "openai", "hf"], value=default_backend, label="Backend",
                                   info="embedded: SmolLM2-135M on CPU, offline. openai: any OpenAI-compatible "
                                        "server. hf: a local transformers model id or path.")
                model = gr.Textbox(value=os.environ.get("CM_DEMO_MODEL", ""), label="Model",
                                   placeholder="gpt-4o-mini  or  HuggingFaceTB/SmolLM2-360M-Instruct",
                                   info="ignored for embedded")
            with gr.Row():
                base_url = gr.Textbox(label="Base URL (OpenAI-compatible, optional)",
                                      placeholder="http://127.0.0.1:8000/v1")
                api_key = gr.Textbox(label="API key (optional: else the server's OPENAI_API_KEY)", type="password",
                                     placeholder="sk-…  used for your requests only, never stored")
        gr.Markdown("## 1 · Your preference samples")
        with gr.Row():
            with gr.Column():
                samples_file = gr.File(label="Upload samples (CSV, TSV or JSONL)",
                                       file_types=[".csv", ".tsv", ".jsonl", ".json", ".txt"], elem_id="samples-file")
                example_btn = gr.Button("Use the built-in example", elem_id="example-btn")
            with gr.Column():
                pasted = gr.Textbox(label="…or paste rows here", lines=5, max_lines=12,
                                    placeholder="text,label\nwake me at six,wake-up buzz\nis it raining,sky report")
                paste_btn = gr.Button("Load pasted rows", size="sm")
        gr.Markdown(HOW_TO)
        with gr.Row():
            text_col = gr.Dropdown([], label="Text column", allow_custom_value=True, interactive=True,
                                   elem_id="text-col")
            label_col = gr.Dropdown([], label="Label column (your labels)", allow_custom_value=True, interactive=True,
                                    elem_id="label-col")
        data_status = gr.Markdown("No samples loaded yet.", elem_id="data-status")
        preview = gr.Dataframe(pd.DataFrame(columns=["text", "label"]), label="First rows", interactive=False,
                               max_height=260, wrap=True)

        gr.Markdown("## 2 · Memory bank")
        with gr.Row():
            method = gr.Dropdown([(v, k) for k, v in METHODS.items()], value="zero_shot", label="Base method",
                                 info="how the model answers before CM", elem_id="method")
            pref_fraction = gr.Slider(0.1, 1.0, value=0.8, step=0.05, label="Preference fraction",
                                      info="share of your rows used as preference samples; the rest is held out "
                                           "for the batch evaluation", elem_id="pref-fraction")
            temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature",
                                    info="sampling temperature of the model's answers on your samples (the "
                                         "paper: 0.7)", elem_id="temperature")
        with gr.Row():
            build_btn = gr.Button("Build memory bank", variant="primary", elem_id="build-btn")
            bank_upload = gr.File(label="…or upload a saved bank (this app's JSON or the paper's format)",
                                  file_types=[".json"], elem_id="bank-file", height=110)
        bank_status_md = gr.Markdown("", elem_id="bank-status")
        with gr.Row():
            bank_df = gr.Dataframe(pd.DataFrame(columns=BANK_COLUMNS), label="Bank: model answer → your label "
                                   "(count, p)", interactive=False, max_height=380)
            bank_plot = gr.Plot(label="Discrepancy heatmap")
        bank_dl = gr.DownloadButton("Download bank (JSON)", elem_id="bank-download")

        gr.Markdown("## 3 · Ask")
        with gr.Row():
            query = gr.Textbox(label="Query", placeholder="e.g. set a timer for the potatoes", scale=4,
                               elem_id="query", max_length=MAX_QUERY_CHARS)
            ask_btn = gr.Button("Ask", variant="primary", scale=1, elem_id="ask-btn")
        gr.Examples(EXAMPLE_QUERIES, inputs=[query], label="Example queries (for the built-in example)")
        with gr.Row():
            base_ans = gr.Textbox(label="Baseline answer (model alone)", interactive=False, elem_id="baseline-answer")
            cm_ans = gr.Textbox(label="CM answer (through your bank)", interactive=False, elem_id="cm-answer")
        why = gr.Textbox(label="Which bank entry fired", interactive=False, lines=2, elem_id="why")
        with gr.Row():
            cand_df = gr.Dataframe(pd.DataFrame(columns=CAND_COLUMNS), label="Bank candidates for the model's answer",
                                   interactive=False)
            score_df = gr.Dataframe(pd.DataFrame(columns=SCORE_COLUMNS), label="Model's p(label | query) over your "
                                    "labels", interactive=False, max_height=300)
        all_df = gr.Dataframe(pd.DataFrame(columns=ALL_COLUMNS), interactive=False,
                              label="All methods on this query (kNN / logistic regression: classifiers trained on "
                                    "the same samples, for an honest comparison)")

        gr.Markdown("## 4 · Batch evaluation")
        with gr.Row():
            test_file = gr.File(label="Labelled test file (same columns as your samples); empty = held-out rows",
                                file_types=[".csv", ".tsv", ".jsonl", ".json", ".txt"], elem_id="test-file")
            with gr.Column():
                example_test_btn = gr.Button("Use the built-in example's test file", size="sm")
                eval_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-btn")
        eval_md = gr.Markdown("", elem_id="eval-status")
        eval_df = gr.Dataframe(pd.DataFrame(columns=EVAL_COLUMNS), label="Accuracy with 95% bootstrap CIs",
                               interactive=False)
        eval_dl = gr.DownloadButton("Download per-row CSV", elem_id="eval-download")

        gr.Markdown("<small>Consistent Marginalization (CM): a training-free way to personalize an LLM's labels. "
                    "Your files and bank stay in your browser session; the API key is used for your requests only."
                    "</small>")

        # ---------------------------------------------------------------- events
        load_out = [state, text_col, label_col, data_status, preview]
        samples_file.upload(load_samples, [samples_file, pasted, state], load_out, api_name="load_samples")
        paste_btn.click(load_samples, [samples_file, pasted, state], load_out, api_name=False)
        example_btn.click(load_example, [state], load_out + [test_file], api_name="use_example")
        for dd in (text_col, label_col):
            dd.input(_preview, [state, text_col, label_col], [data_status, preview], api_name=False,
                     concurrency_limit=None)
        bank_out = [state, bank_df, bank_plot, bank_dl, bank_status_md]
        build_btn.click(build_bank, [text_col, label_col, backend, model, base_url, api_key, method, pref_fraction,
                                     temperature, state], bank_out, api_name="build_bank")
        bank_upload.upload(upload_bank, [bank_upload, text_col, label_col, state], bank_out, api_name="upload_bank")
        ask_out = [base_ans, cm_ans, why, cand_df, score_df, all_df]
        ask_btn.click(ask, [query, backend, model, base_url, api_key, state], ask_out, api_name="ask")
        query.submit(ask, [query, backend, model, base_url, api_key, state], ask_out, api_name=False)
        example_test_btn.click(use_example_test, None, [test_file], api_name="example_test")
        eval_btn.click(evaluate_batch, [test_file, text_col, label_col, backend, model, base_url, api_key, state],
                       [eval_df, eval_md, eval_dl], api_name="evaluate")
    # Several sessions at once: the model itself serializes forward passes (per chunk), so a slow bank build
    # does not hold back another user's single query for long.
    demo.queue(default_concurrency_limit=int(os.environ.get("CM_DEMO_CONCURRENCY", "4")), max_size=64)
    return demo


def launch_kwargs() -> dict:
    on_space = bool(os.environ.get("SPACE_ID"))
    return {"server_name": os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_space else "127.0.0.1"),
            "server_port": int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
            "max_file_size": f"{MAX_FILE_MB}mb", "show_error": False}


def set_torch_threads(n: int | str | None = None) -> int | None:
    """CM_DEMO_TORCH_THREADS: on a CPU shared with other busy processes, 1 thread is several times faster than
    torch's default (its threads spin-wait for each other). Returns the previous count, or None if unchanged."""
    n = n if n is not None else os.environ.get("CM_DEMO_TORCH_THREADS")
    if not n:
        return None
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    return old


demo = build_demo()

if __name__ == "__main__":
    set_torch_threads()
    demo.launch(**launch_kwargs())
