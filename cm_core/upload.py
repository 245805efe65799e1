"""A user's own labelled file, as an app takes it in and as the command line reproduces what was done with it.

- :func:`read_upload` / :func:`decode_upload`: the bytes of an uploaded file (or pasted text) as UTF-8 text, with
  a size limit and clear messages (empty, not UTF-8, binary), all :class:`~cm_core.errors.DataError`;
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
import shlex
from pathlib import Path
from typing import Sequence

from .data import Dataset, Example, Split, split_dataset
from .errors import DataError

SEED = 40  # the command line's default seed


# --------------------------------------------------------------------------- reading an upload

def decode_upload(raw: bytes, name: str, max_bytes: int) -> str:
    """UTF-8 text of an uploaded file (a BOM is dropped); refuses files over ``max_bytes``, empty ones, other
    encodings (naming the line of the first bad byte) and binary files."""
    if len(raw) > max_bytes:
        raise DataError(f"{name} is {len(raw) / 1e6:.1f} MB; files over {_mb(max_bytes)} are refused.")
    if not raw.strip():
        raise DataError(f"{name} is empty.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{name} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}). Save it as UTF-8 "
                        "(in Excel: CSV UTF-8) and upload again.") from None
    if "\x00" in text:
        raise DataError(f"{name} looks like a binary file, not CSV or JSONL text.")
    return text


def read_upload(path: str | Path, max_bytes: int) -> tuple[str, str]:
    """(file name, UTF-8 text) of an uploaded file; the size is checked before the file is read."""
    p = Path(path)
    name = p.name
    if not p.is_file():
        raise DataError(f"The uploaded file {name} could not be read; please upload it again.")
    size = p.stat().st_size
    if size > max_bytes:
        raise DataError(f"{name} is {size / 1e6:.1f} MB; files over {_mb(max_bytes)} are refused.")
    return name, decode_upload(p.read_bytes(), name, max_bytes)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


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
                  output: str = "results.json") -> list[str]:
    """``evaluate`` on the preference samples :func:`preference_split` takes from ``dataset`` and the test rows
    of ``test_file`` (at most ``n_test``), optionally with a saved bank instead of an estimated one."""
    return (["evaluate", "--dataset", dataset, "--test-file", test_file, *_columns(text_column, label_column),
             *model, "--methods", ",".join(methods), *_split_args(pref_fraction, pref_count),
             "--n-test", str(n_test), "--seed", str(seed), "--temperature", _num(temperature)]
            + (["--bank", bank] if bank else []) + ["--output", output])


def estimate_argv(*, dataset: str, text_column: str, label_column: str, model: list[str], method: str,
                  temperature: float, seed: int = SEED, output: str = "memory_bank.json") -> list[str]:
    """``estimate`` on every row of ``dataset`` (``--all-samples``): the bank of ``preference_split`` with
    ``pref_fraction`` 1."""
    return ["estimate", "--dataset", dataset, *_columns(text_column, label_column), *model, "--all-samples",
            "--method", method, "--seed", str(seed), "--temperature", _num(temperature), "--output", output]


def predict_argv(*, bank: str, input_file: str, text_column: str, model: list[str], method: str,
                 output: str = "predictions.jsonl") -> list[str]:
    """``predict``: each query's answer through a saved bank (the label set stored in the bank)."""
    return ["predict", "--bank", bank, "--input", input_file, "--text-column", text_column, *model,
            "--method", method, "--output", output]


def command_line(argv: Sequence[str]) -> str:
    """The shell line for ``argv`` (``python -m cm_core ...``), every argument quoted as the shell needs."""
    return shlex.join(["python", "-m", "cm_core", *argv])
