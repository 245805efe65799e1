"""Datasets: ClusterLLM jsonl, a user's own CSV/JSONL, and the public datasets on the Hugging Face hub.

Every loader returns a :class:`Dataset` (examples + label set) or raises :class:`DataError`
naming the file, line and problem. Splitting guarantees preference samples never overlap the test set.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .errors import DataError

MAX_FILE_BYTES = 20 * 1024 * 1024  # uploads and files larger than this are refused
MAX_TEXT_CHARS = 4000  # one query longer than this is refused (it would not fit a small model's context)
PAPER_DATASETS = ("banking77", "clinc", "massive_scenario", "mtop_intent", "stackexchange")  # shipped in data/


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass
class Dataset:
    """Examples plus the label set (sorted, as the paper shows candidates)."""

    name: str
    examples: list[Example]
    labels: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if not self.labels:
            self.labels = sorted({e.label for e in self.examples})

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    @property
    def targets(self) -> list[str]:
        return [e.label for e in self.examples]

    def subset(self, examples: list[Example], suffix: str) -> "Dataset":
        return Dataset(f"{self.name}:{suffix}", examples, list(self.labels), self.source)


# --------------------------------------------------------------------------- parsing helpers

def _decode(raw: bytes, source: str) -> str:
    if len(raw) > MAX_FILE_BYTES:
        raise DataError(f"file is {len(raw) / 1e6:.1f} MB, over the {MAX_FILE_BYTES / 1e6:.0f} MB limit", source=source)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8",
                        source=source, line=line) from None


def _read_bytes(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", source=str(path))
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"file is {size / 1e6:.1f} MB, over the {MAX_FILE_BYTES / 1e6:.0f} MB limit", source=str(path))
    return p.read_bytes()


def _clean_field(value, what: str, source: str, line: int) -> str:
    if value is None:
        raise DataError(f"missing {what}", source=source, line=line)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{what} must be text, got {type(value).__name__}", source=source, line=line)
    text = " ".join(str(value).split())
    if not text:
        raise DataError(f"empty {what}", source=source, line=line)
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(f"{what} is {len(text)} characters, over the {MAX_TEXT_CHARS} limit", source=source, line=line)
    return text


def _json_problem(e: Exception) -> str:
    """What json.loads choked on: its message, a number too long for int(), or nesting deeper than the stack."""
    if isinstance(e, json.JSONDecodeError):
        return e.msg
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(":")[0]  # ValueError: "Exceeds the limit (4300 digits) for integer string conversion"


def _records_jsonl(text: str, source: str) -> Iterable[tuple[int, dict]]:
    # Lines end at \n, \r\n or \r (JSON escapes those inside strings), not where str.splitlines() also splits:
    # U+2028, U+0085, \x1c-\x1e, which json.dumps(..., ensure_ascii=False) writes unescaped inside strings.
    for i, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise DataError(f"malformed JSON ({_json_problem(e)})", source=source, line=i) from None
        if not isinstance(rec, dict):
            raise DataError(f"expected a JSON object, got {type(rec).__name__}", source=source, line=i)
        yield i, rec


def _records_csv(text: str, source: str, delimiter: str) -> Iterable[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise DataError("no header row", source=source, line=1)
        for rec in reader:
            if None in rec:  # more cells than header columns
                raise DataError("row has more cells than the header", source=source, line=reader.line_num)
            if all(v in (None, "") for v in rec.values()):
                continue
            yield reader.line_num, rec
    except csv.Error as e:
        raise DataError(f"malformed CSV ({e})", source=source, line=reader.line_num) from None


def sniff_format(name: str, text: str) -> str:
    """'jsonl', 'csv' or 'tsv' from the file name, else from the first non-empty line."""
    low = name.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"), (".tsv", "tsv"), (".csv", "csv")):
        if low.endswith(ext):
            return fmt
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    return "tsv" if "\t" in first and "," not in first else "csv"


def columns_of(text: str, source: str = "<text>", fmt: str | None = None) -> list[str]:
    """Column names a user can pick from (header of a CSV, keys of the first JSONL object)."""
    fmt = fmt or sniff_format(source, text)
    if fmt == "jsonl":
        for _, rec in _records_jsonl(text, source):
            return list(rec.keys())
        return []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    try:
        return next(reader, [])
    except csv.Error as e:
        raise DataError(f"malformed CSV ({e})", source=source, line=1) from None


def parse_examples(text: str, *, source: str = "<text>", text_column: str = "input", label_column: str | None = "label",
                   fmt: str | None = None, labels: Sequence[str] | None = None,
                   drop_duplicates: bool = True) -> list[Example]:
    """Parse CSV/TSV/JSONL text into examples.

    label_column=None reads unlabelled queries (label ""). With ``labels`` given, a label outside that set is an
    error naming the line. Exact duplicate rows are dropped (they would double-count in the memory bank).
    """
    fmt = fmt or sniff_format(source, text)
    if fmt != "jsonl":  # csv.DictReader silently keeps the last of two same-named columns
        header = columns_of(text, source, fmt)
        for col in (text_column, label_column):
            if col is not None and header.count(col) > 1:
                raise DataError(f"column {col!r} appears {header.count(col)} times in the header", source=source,
                                line=1)
    records = _records_jsonl(text, source) if fmt == "jsonl" else _records_csv(text, source, "\t" if fmt == "tsv" else ",")
    allowed = set(labels) if labels is not None else None
    out, seen = [], set()
    for line, rec in records:
        for col in (text_column, label_column):
            if col is not None and col not in rec:
                raise DataError(f"no column {col!r}; columns are {sorted(rec)}", source=source, line=line)
        t = _clean_field(rec[text_column], f"text ({text_column!r})", source, line)
        y = _clean_field(rec[label_column], f"label ({label_column!r})", source, line) if label_column else ""
        if allowed is not None and label_column and y not in allowed:
            raise DataError(f"label {y!r} is not in the label set ({len(allowed)} labels)", source=source, line=line)
        if drop_duplicates and (t, y) in seen:
            continue
        seen.add((t, y))
        out.append(Example(t, y))
    if not out:
        raise DataError("no examples found (empty file?)", source=source)
    return out


def load_file(path: str | os.PathLike, *, text_column: str | None = None, label_column: str | None = None,
              name: str | None = None, labels: Sequence[str] | None = None) -> Dataset:
    """Load a ClusterLLM jsonl ({"task","input","label"}) or a user CSV/TSV/JSONL with named columns."""
    source = str(path)
    text = _decode(_read_bytes(path), source)
    fmt = sniff_format(source, text)
    if text_column is None:
        cols = columns_of(text, source, fmt)
        if not cols:
            raise DataError("no examples found (empty file?)", source=source)
        text_column = next((c for c in ("input", "text", "query", "sentence") if c in cols), None)
        if text_column is None:
            raise DataError(f"cannot tell the text column; columns are {cols}. Pass text_column=", source=source)
    if label_column is None:
        label_column = "label"
    examples = parse_examples(text, source=source, text_column=text_column, label_column=label_column, fmt=fmt,
                              labels=labels)
    if name is None:  # ClusterLLM files are <dataset>/{small,large}.jsonl: name them after the folder
        name = Path(path).parent.name if Path(path).name in ("small.jsonl", "large.jsonl") else Path(path).stem
    return Dataset(name, examples, sorted(labels) if labels else [], source)


def read_lines(path: str | os.PathLike, what: str = "lines") -> list[str]:
    """The non-empty lines of a UTF-8 text file (queries to answer, a model's vocabulary), whitespace collapsed."""
    source = str(path)
    lines = [" ".join(ln.split()) for ln in _decode(_read_bytes(path), source).splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DataError(f"no {what} (empty file?)", source=source)
    for i, ln in enumerate(lines, 1):
        if len(ln) > MAX_TEXT_CHARS:
            raise DataError(f"a line is {len(ln)} characters, over the {MAX_TEXT_CHARS} limit", source=source, line=i)
    return lines


TEXT_HINTS = ("text", "input", "query", "utterance", "sentence", "question", "message")
LABEL_HINTS = ("label", "my_label", "labels", "intent", "category", "class", "tag", "scenario")


def guess_columns(text: str, source: str = "<text>", columns: Sequence[str] | None = None, *,
                  max_rows: int = 200) -> tuple[str | None, str | None]:
    """(text column, label column) of a user's CSV/TSV/JSONL: a column with a usual name (:data:`TEXT_HINTS`,
    :data:`LABEL_HINTS`, case-insensitive), else for the text the column with the longest values and for the
    label the remaining column with the fewest distinct values (over the first ``max_rows`` rows). None where
    there is nothing to pick; never raises on malformed rows (it falls back to the first two columns)."""
    cols = [str(c) for c in (columns if columns is not None else _columns_or_empty(text, source)) if c is not None]
    low = {c.lower(): c for c in cols}
    text_col = next((low[h] for h in TEXT_HINTS if h in low), None)
    label_col = next((low[h] for h in LABEL_HINTS if h in low and low[h] != text_col), None)
    if text_col and label_col:
        return text_col, label_col
    try:
        fmt = sniff_format(source, text)
        records = _records_jsonl(text, source) if fmt == "jsonl" else _records_csv(
            text, source, "\t" if fmt == "tsv" else ",")
        rows = [rec for _, (_line, rec) in zip(range(max_rows), records)]
    except DataError:
        rows = []
    if not rows:
        return text_col or (cols[0] if cols else None), label_col or (cols[1] if len(cols) > 1 else None)
    avg_len = {c: sum(len(str(r.get(c) or "")) for r in rows) / len(rows) for c in cols}
    distinct = {c: len({str(r.get(c)) for r in rows}) for c in cols}
    if text_col is None and cols:
        text_col = max(cols, key=lambda c: avg_len[c])
    if label_col is None:
        rest = [c for c in cols if c != text_col and distinct[c] > 1] or [c for c in cols if c != text_col]
        label_col = min(rest, key=lambda c: distinct[c]) if rest else None
    return text_col, label_col


def _columns_or_empty(text: str, source: str) -> list[str]:
    try:
        return columns_of(text, source)
    except DataError:
        return []


# --------------------------------------------------------------------------- public datasets

# Hub copies of the paper's datasets. label_map turns the hub's label into ClusterLLM's wording.
HUB_DATASETS = {
    "banking77": dict(path="mteb/banking77", config=None, split="test", text="text", label="label_text"),
    "clinc": dict(path="clinc/clinc_oos", config="plus", split="test", text="text", label="intent"),
    "massive_scenario": dict(path="mteb/amazon_massive_scenario", config="en", split="test", text="text",
                             label="label"),
    "mtop_intent": dict(path="mteb/mtop_intent", config="en", split="test", text="text", label="label_text"),
    "stackexchange": dict(path="mteb/stackexchange-clustering", config=None, split="test", text="sentences",
                          label="labels"),
}


def _hub_label(value, feature) -> str:
    if isinstance(value, int) and feature is not None and hasattr(feature, "int2str"):
        value = feature.int2str(value)
    return str(value).replace("_", " ").strip()


def load_hub(name: str, *, split: str | None = None, limit: int | None = None) -> Dataset:
    """Load a paper dataset from the Hugging Face hub (needs network or a warm `datasets` cache)."""
    if name not in HUB_DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(HUB_DATASETS)}")
    spec = HUB_DATASETS[name]
    try:
        import datasets as hf_datasets
        ds = hf_datasets.load_dataset(spec["path"], spec["config"], split=split or spec["split"])
    except Exception as e:  # datasets raises many types when offline (ConnectionError, OfflineModeIsEnabled, ...)
        raise DataError(
            f"could not load {spec['path']} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Are you offline? Use a local file instead: --dataset path/to/data.jsonl, or set CM_DATA_DIR to a folder "
            "holding <name>/small.jsonl", source=name) from None
    feature = getattr(ds, "features", {}).get(spec["label"]) if hasattr(ds, "features") else None
    examples = []
    for row in ds:
        texts, labs = row[spec["text"]], row[spec["label"]]
        if isinstance(texts, list):  # clustering format: lists of sentences and labels per row
            pairs = zip(texts, labs)
        else:
            pairs = [(texts, labs)]
        for t, y in pairs:
            t = " ".join(str(t).split())
            if t:
                examples.append(Example(t, _hub_label(y, feature)))
            if limit and len(examples) >= limit:
                break
        if limit and len(examples) >= limit:
            break
    if name == "mtop_intent":
        examples = [Example(e.text, e.label.lower()) for e in examples]
    if not examples:
        raise DataError("the hub dataset has no rows", source=name)
    return Dataset(name, examples, source=f"hf:{spec['path']}")


def data_dir() -> Path:
    """Where the paper's datasets are read: CM_DATA_DIR when set, else the repository's own data/ folder."""
    env = os.environ.get("CM_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def load_dataset(name_or_path: str, *, split: str = "small", **kwargs) -> Dataset:
    """A file path, a paper dataset by name (``<data_dir>/<name>/<split>.jsonl``, split "small" or "large"), or
    else a public dataset from the Hugging Face hub (online only)."""
    if os.path.exists(name_or_path):
        return load_file(name_or_path, **kwargs)
    if split not in ("small", "large"):
        raise DataError(f"split must be 'small' or 'large', got {split!r}")
    local = data_dir() / name_or_path / f"{split}.jsonl"
    if local.is_file():
        ds = load_file(local, name=name_or_path, **kwargs)
        ds.source = f"{name_or_path}/{split}.jsonl"  # not the machine's path: results and reports are shared
        return ds
    if name_or_path in PAPER_DATASETS:
        if split == "large":
            raise DataError(f"{name_or_path} has no large split in {data_dir()} (stackexchange's was never "
                            "published)", source=name_or_path)
        return load_hub(name_or_path)
    raise DataError(f"no such file or dataset {name_or_path!r}; give a file path or one of {', '.join(HUB_DATASETS)}")


# --------------------------------------------------------------------------- splits

@dataclass
class Split:
    preference: Dataset
    test: Dataset
    seed: int


def _balanced_order(examples: list[Example], rng: random.Random) -> list[Example]:
    """Round-robin over labels (each shuffled), so the first k rows cover as many labels as possible."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_label[e.label].append(e)
    labels = sorted(by_label)
    rng.shuffle(labels)
    for lab in labels:
        rng.shuffle(by_label[lab])
    out, depth = [], 0
    while len(out) < len(examples):
        for lab in labels:
            if depth < len(by_label[lab]):
                out.append(by_label[lab][depth])
        depth += 1
    return out


def split_dataset(ds: Dataset, *, pref_fraction: float | None = 0.05, pref_count: int | None = None,
                  n_test: int | None = None, seed: int = 40, stratified: bool = False,
                  test_fraction: float = 0.5) -> Split:
    """Paper-style split: test = ``test_fraction`` of the rows (seeded), preference samples from the rest.

    The count of preference samples is ``pref_count`` or ``int(pref_fraction * len(ds))``. Preference rows
    whose text also occurs in the test set are skipped, so the two are disjoint by text, always.
    """
    if len(ds) < 2:
        raise DataError(f"dataset {ds.name} has {len(ds)} rows; need at least 2 to split")
    if not 0 <= test_fraction < 1:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = random.Random(seed)
    idx = list(range(len(ds)))
    rng.shuffle(idx)
    n_half = int(round(test_fraction * len(ds)))
    if test_fraction > 0:
        n_half = max(1, n_half)
    test_rows = [ds.examples[i] for i in idx[:n_half]]
    rest = [ds.examples[i] for i in idx[n_half:]]
    if n_test is not None:
        if n_test <= 0:
            raise DataError(f"n_test must be positive, got {n_test}")
        test_rows = test_rows[:n_test]
    test_texts = {e.text for e in test_rows}
    rest = [e for e in rest if e.text not in test_texts]
    if pref_count is None:
        if pref_fraction is None or not 0 < pref_fraction <= 1:
            raise DataError(f"pref_fraction must be in (0, 1], got {pref_fraction}")
        pref_count = max(1, int(pref_fraction * len(ds)))
    if pref_count <= 0:
        raise DataError(f"pref_count must be positive, got {pref_count}")
    if pref_count > len(rest):
        raise DataError(f"asked for {pref_count} preference samples but only {len(rest)} rows are outside the test set")
    pool = _balanced_order(rest, rng) if stratified else rest
    pref = pool[:pref_count]
    return Split(ds.subset(pref, "pref"), ds.subset(test_rows, "test"), seed)
