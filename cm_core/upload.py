"""A user's own labelled file, as an app takes it in and as the command line reproduces what was done with it.

- :func:`read_upload` / :func:`decode_upload`: the bytes of an uploaded file (or pasted text) as UTF-8 text, with
  a size limit and clear messages (empty, not UTF-8, binary), all :class:`~cm_core.errors.DataError`, worded for
  what the file should be (samples, a memory bank, a word list);
- :func:`normalize_table`: a semicolon- or pipe-separated table as comma CSV; :func:`looks_like_bank` (a saved
  bank uploaded where samples go); :func:`table_advice`: what to do about a file that does not parse;
- :func:`read_bank`: a memory bank from uploaded JSON text, with a message that says what the file is instead;
- :func:`parse_words`: the model's own words (a vocabulary, one per line, as ``--responses FILE``) for ``own_words``;
- :func:`preference_split`: the preference samples that ``python -m cm_core evaluate --test-file T`` draws from
  ``--dataset`` (all rows in file order with ``--pref-fraction 1``, else :func:`~cm_core.data.split_dataset`
  with ``test_fraction=0``), and the rows left over, held out for an evaluation;
- :func:`examples_csv`: examples written back as a CSV file with the user's column names (what a held-out set
  becomes, so that the command line can read it as ``--test-file``);
- :func:`evaluate_argv`, :func:`estimate_argv`, :func:`predict_argv`, :func:`command_line`: the command line
  that repeats a run on the same files with the same split, seed, methods and temperature (an app shows it
  beside its results; ``cm_core.cli.main(argv)`` runs it).
"""
from __future__ import annotations

import csv
import io
import json
import shlex
from pathlib import Path
from typing import Sequence

from .bank import BANK_FORMAT, MemoryBank
from .data import Dataset, Example, Split, split_dataset
from .errors import BankError, DataError

SEED = 40  # the command line's default seed


# --------------------------------------------------------------------------- reading an upload

KINDS = {  # what an upload should be -> (how to name it, what a good one is)
    "table": ("CSV, TSV or JSONL text", "Save it as UTF-8 (in Excel: CSV UTF-8) and upload again."),
    "bank": ("a memory bank", "A memory bank is a JSON text file: the one 'Download bank (JSON)' gives, or "
                              "the paper's {answer: [labels]}."),
    "words": ("a word list", "A word list is plain text, one word or short phrase per line."),
}


def decode_upload(raw: bytes, name: str, max_bytes: int, kind: str = "table") -> str:
    """UTF-8 text of an uploaded file (a BOM is dropped); refuses files over ``max_bytes``, empty ones, other
    encodings (naming the line of the first bad byte) and binary files. ``kind`` ("table", "bank", "words"): what
    the file should be, so that the message's advice fits (a binary bank is not an Excel export)."""
    what, advice = KINDS[kind]
    if len(raw) > max_bytes:
        raise DataError(f"{name} is {len(raw) / 1e6:.1f} MB; files over {_mb(max_bytes)} are refused. Upload a "
                        "smaller file (fewer rows).")
    if not raw.strip():
        raise DataError(f"{name} is empty." + (" Upload a file with a header row and one row per sample, e.g. "
                                               "text,label / wake me at six,wake-up buzz." if kind == "table"
                                               else f" {advice}"))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        if kind != "table":
            raise DataError(f"{name} is not {what}: it is not UTF-8 text (byte 0x{raw[e.start]:02x} on line "
                            f"{line}). {advice}") from None
        raise DataError(f"{name} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}). {advice}") from None
    if "\x00" in text:
        raise DataError(f"{name} looks like a binary file, not {what}. " + (
            "Upload CSV, TSV or JSONL text." if kind == "table" else advice))
    return text


def read_upload(path: str | Path, max_bytes: int, kind: str = "table") -> tuple[str, str]:
    """(file name, UTF-8 text) of an uploaded file; the size is checked before the file is read."""
    p = Path(path)
    name = p.name
    if not p.is_file():
        raise DataError(f"The uploaded file {name} could not be read; please upload it again.")
    size = p.stat().st_size
    if size > max_bytes:
        raise DataError(f"{name} is {size / 1e6:.1f} MB; files over {_mb(max_bytes)} are refused. Upload a smaller "
                        "file (fewer rows).")
    return name, decode_upload(p.read_bytes(), name, max_bytes, kind)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


# --------------------------------------------------------------------------- what an uploaded table is

OTHER_DELIMITERS = (";", "|")  # Excel in many locales writes ';'


def normalize_table(name: str, text: str) -> tuple[str, str | None]:
    """(text, note). A CSV separated by ';' or '|' (its header has neither a comma nor a tab) comes back as comma
    CSV, which :func:`~cm_core.data.parse_examples` reads, with a note saying so; anything else as it is."""
    low = name.lower()
    if low.endswith((".jsonl", ".json", ".ndjson", ".tsv")):
        return text, None
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if first.lstrip().startswith(("{", "[")) or "," in first or "\t" in first:
        return text, None
    for delim in OTHER_DELIMITERS:
        if delim in first:
            try:
                rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delim))
            except csv.Error:
                return text, None
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            word = "semicolons" if delim == ";" else "'|'"
            return buf.getvalue(), (f"{name} is separated by {word}; it was read as such (the command line reads "
                                    "comma-separated files: save a comma-separated copy to use it there)")
    return text, None


def looks_like_bank(text: str) -> bool:
    """Whether uploaded text is a saved memory bank (this app's JSON or the paper's {answer: [labels]}) rather
    than samples: one JSON object whose values are label lists, or one that says it is a bank."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return False
    if not isinstance(obj, dict) or not obj:
        return False
    if obj.get("format") == BANK_FORMAT:
        return True
    return all(isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in obj.values())


def table_advice(e: DataError) -> tuple[str, bool]:
    """(what to do, whether another choice of columns could help) for a file that does not parse."""
    p = (e.problem or str(e)).lower()
    if p.startswith("no column") or "appears" in p and "header" in p:
        return "Pick the right text and label columns below.", True
    if "label" in p and ("empty" in p or "missing" in p):
        return "Every sample needs your label: fill it in on that line, or delete the row.", False
    if "text" in p and ("empty" in p or "missing" in p):
        return "Every sample needs a text: fill it in on that line, or delete the row.", False
    if "no examples found" in p:
        return "The file has a header row but no rows under it: add one row per sample.", False
    if "malformed json" in p or "expected a json object" in p:
        return ('Fix that line: a JSONL file holds one JSON object per line, e.g. {"text": "wake me at six", '
                '"label": "wake-up buzz"}.'), False
    if "more cells than the header" in p or "malformed csv" in p:
        return "Fix that line: put a cell that contains a comma in double quotes.", False
    if "characters, over" in p:
        return "Shorten that text (or split it into several samples).", False
    if "must be text" in p:
        return "Each cell must be text (JSONL: a string, not a list or an object).", False
    return "Fix the file and upload it again.", False


# --------------------------------------------------------------------------- a saved memory bank

def read_bank(text: str, name: str) -> MemoryBank:
    """The memory bank in an uploaded JSON text; a :class:`~cm_core.errors.BankError` that says what the file is
    instead (samples, another JSON, a wrong shape). The text is parsed as JSON only: never read as a path."""
    def refuse(problem: str) -> BankError:
        return BankError(f"{name} is not a memory bank: {problem}")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and all(ln.lstrip().startswith("{") and ln.rstrip().endswith("}") for ln in lines[:5]):
            raise refuse("it looks like samples (one JSON object per line). Upload samples in section 1; a bank "
                          "is the JSON file that 'Download bank (JSON)' gives.")
        if not first.lstrip().startswith(("{", "[")) and ("," in first or "\t" in first or ";" in first):
            raise refuse("it looks like a table of samples (CSV). Upload samples in section 1; a bank is the JSON "
                          "file that 'Download bank (JSON)' gives.")
        where = f" on line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise refuse(f"it is not valid JSON ({why}{where}). A bank is the JSON file that 'Download bank "
                      "(JSON)' gives, or the paper's {answer: [labels]}.")
    if not isinstance(obj, dict):
        raise refuse(f"it holds a JSON {type(obj).__name__}, not an object. A bank is the JSON object that "
                     "'Download bank (JSON)' gives, or the paper's {answer: [labels]}.")
    if "format" in obj or "version" in obj or "counts" in obj:
        if obj.get("format") != BANK_FORMAT:
            said = (f'its "format" is {json.dumps(obj.get("format"))[:40]}' if "format" in obj
                    else 'it has no "format" entry')
            raise refuse(f'{said}, while a bank this app saved says "format": "{BANK_FORMAT}" (and the paper\'s '
                         "format is {answer: [labels]}, with nothing else in it).")
    elif not all(isinstance(v, (list, str)) for v in obj.values()):
        raise refuse("this JSON object is neither this app's bank (\"format\": \"cm-memory-bank\") nor the paper's "
                     "{answer: [labels]}.")
    return MemoryBank.from_dict(obj, source=name)


# --------------------------------------------------------------------------- the model's own words

MAX_WORDS = 100
MAX_WORD_CHARS = 60


def parse_words(text: str, name: str = "the word list") -> list[str]:
    """The model's own words for ``own_words``, read as ``--responses FILE`` reads them
    (:func:`~cm_core.data.read_lines`): one per line, blank lines skipped, spaces collapsed; duplicates dropped
    (the method drops them too). At least two, at most 100."""
    words = list(dict.fromkeys(" ".join(ln.split()) for ln in text.splitlines() if ln.strip()))
    if len(words) < 2:
        raise DataError(f"{name} has {len(words)} word{'' if len(words) == 1 else 's'}; the model needs at least two "
                        "of its own words to choose from (one per line).")
    if len(words) > MAX_WORDS:
        raise DataError(f"{name} has {len(words)} words; at most {MAX_WORDS} please.")
    long = next((w for w in words if len(w) > MAX_WORD_CHARS), None)
    if long is not None:
        raise DataError(f"{name}: {long[:40]!r}… is over {MAX_WORD_CHARS} characters; the model's words are short "
                        "names, one per line.")
    return words


# --------------------------------------------------------------------------- preference samples and held-out rows

def preference_split(ds: Dataset, *, pref_fraction: float = 1.0, pref_count: int | None = None,
                     seed: int = SEED) -> Split:
    """The preference samples ``evaluate --dataset D --test-file T`` takes from D (``--pref-fraction`` /
    ``--pref-count``, ``--seed``), and as the test part the rest of D: the rows whose text is not a preference
    sample's, in file order. ``pref_fraction`` 1 without a count keeps every row, in file order."""
    if pref_count is None and pref_fraction >= 1:
        pref = list(ds.examples)
    else:
        pref = split_dataset(ds, pref_fraction=pref_fraction, pref_count=pref_count, seed=seed,
                             test_fraction=0.0).preference.examples
    texts = {e.text for e in pref}
    held = [e for e in ds.examples if e.text not in texts]
    return Split(ds.subset(pref, "pref"), ds.subset(held, "held-out"), seed)


def examples_csv(examples: Sequence[Example], text_column: str = "text", label_column: str = "label") -> str:
    """CSV text of ``examples`` under the given column names; :func:`~cm_core.data.parse_examples` reads the same
    examples back."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([text_column, label_column])
    w.writerows([e.text, e.label] for e in examples)
    return buf.getvalue()


# --------------------------------------------------------------------------- the command line that repeats a run

def model_args(spec: str, base_url: str | None = None) -> list[str]:
    """``--model SPEC [--base-url URL]``; an API key never appears (the command line reads OPENAI_API_KEY)."""
    return ["--model", spec] + (["--base-url", base_url] if base_url else [])


def _split_args(pref_fraction: float, pref_count: int | None) -> list[str]:
    if pref_count is not None:
        return ["--pref-count", str(pref_count)]
    return ["--pref-fraction", _num(pref_fraction)]


def _num(x: float) -> str:
    """A float as the shortest text that reads back as the same float (the run and the line must agree)."""
    return repr(float(x))


def _columns(text_column: str, label_column: str) -> list[str]:
    return ["--text-column", text_column, "--label-column", label_column]


def evaluate_argv(*, dataset: str, test_file: str, text_column: str, label_column: str, model: list[str],
                  methods: Sequence[str], pref_fraction: float = 1.0, pref_count: int | None = None,
                  n_test: int, temperature: float, seed: int = SEED, bank: str | None = None,
                  responses: str | None = None, output: str = "results.json") -> list[str]:
    """``evaluate`` on the preference samples :func:`preference_split` takes from ``dataset`` and the test rows
    of ``test_file`` (at most ``n_test``), optionally with a saved bank instead of an estimated one."""
    return (["evaluate", "--dataset", dataset, "--test-file", test_file, *_columns(text_column, label_column),
             *model, "--methods", ",".join(methods), *_split_args(pref_fraction, pref_count),
             "--n-test", str(n_test), "--seed", str(seed), "--temperature", _num(temperature)]
            + (["--bank", bank] if bank else []) + _responses(responses) + ["--output", output])


def estimate_argv(*, dataset: str, text_column: str, label_column: str, model: list[str], method: str,
                  temperature: float, seed: int = SEED, responses: str | None = None,
                  output: str = "memory_bank.json") -> list[str]:
    """``estimate`` on every row of ``dataset`` (``--all-samples``): the bank of ``preference_split`` with
    ``pref_fraction`` 1."""
    return ["estimate", "--dataset", dataset, *_columns(text_column, label_column), *model, "--all-samples",
            "--method", method, "--seed", str(seed), "--temperature", _num(temperature), *_responses(responses),
            "--output", output]


def predict_argv(*, bank: str, input_file: str, text_column: str, model: list[str], method: str,
                 responses: str | None = None, output: str = "predictions.jsonl") -> list[str]:
    """``predict``: each query's answer through a saved bank (the label set stored in the bank)."""
    return ["predict", "--bank", bank, "--input", input_file, "--text-column", text_column, *model,
            "--method", method, *_responses(responses), "--output", output]


def _responses(path: str | None) -> list[str]:
    """``--responses FILE``: the model's own words, one per line (``own_words``)."""
    return ["--responses", path] if path else []


def command_line(argv: Sequence[str]) -> str:
    """The shell line for ``argv`` (``python -m cm_core ...``), every argument quoted as the shell needs."""
    return shlex.join(["python", "-m", "cm_core", *argv])
