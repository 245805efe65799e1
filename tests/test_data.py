"""Data loading, user files, errors that name file and line, splits, and the hub loader (monkeypatched)."""
from __future__ import annotations

import json
import sys
import types

import pytest

from cm_core import data
from cm_core.data import (Dataset, Example, columns_of, load_dataset, load_file, load_hub, parse_examples,
                          sniff_format, split_dataset)
from cm_core.errors import DataError

# rows in the file / distinct labels, as published with the shared datasets
SHARED = {"banking77": (3080, 77), "clinc": (4500, 150), "massive_scenario": (2974, 18),
          "mtop_intent": (4386, 102), "stackexchange": (4156, 121)}


def _raw_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- shared datasets

@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_dataset_loads(name, data_dir):
    n_rows, n_labels = SHARED[name]
    raw = _raw_rows(data_dir / name / "small.jsonl")
    assert len(raw) == n_rows
    ds = load_dataset(name)
    assert ds.name == name
    assert ds.source == f"{name}/small.jsonl"
    assert len(ds.labels) == n_labels
    assert ds.labels == sorted({r["label"] for r in raw})
    # exact duplicate rows (same text and label, after whitespace normalization) are dropped, nothing else
    distinct = {(" ".join(r["input"].split()), " ".join(r["label"].split())) for r in raw}
    assert len(ds) == len(distinct)
    assert len(ds) <= n_rows
    assert all(e.text and e.label in ds.labels for e in ds.examples)
    assert ds.texts == [e.text for e in ds.examples] and ds.targets == [e.label for e in ds.examples]


def test_load_dataset_by_path_and_unknown_name(data_dir, tmp_path):
    path = data_dir / "massive_scenario" / "small.jsonl"
    by_path = load_dataset(str(path))
    assert by_path.name == "massive_scenario"  # a small.jsonl is named after its folder
    assert by_path.texts == load_dataset("massive_scenario").texts
    with pytest.raises(DataError, match="no such file or dataset 'not_a_dataset'"):
        load_dataset("not_a_dataset")


def test_datasets_ship_in_the_repository(monkeypatch):
    """A fresh clone reads the paper's datasets from its own data/ folder, offline, with nothing beside it."""
    from conftest import REPO
    monkeypatch.delenv("CM_DATA_DIR", raising=False)
    assert data.data_dir() == REPO / "data"
    for name, (n_rows, n_labels) in SHARED.items():
        ds = load_dataset(name)
        assert ds.source == f"{name}/small.jsonl"  # no machine path in results
        assert len(ds.labels) == n_labels
    large = load_dataset("banking77", split="large")
    assert large.name == "banking77" and large.source == "banking77/large.jsonl" and len(large.labels) == 77
    with pytest.raises(DataError, match="no large split"):
        load_dataset("stackexchange", split="large")
    assert "licence" in (REPO / "data" / "README.md").read_text().lower()


def test_data_dir_follows_env(monkeypatch, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "small.jsonl").write_text('{"task": "t", "input": "hi there", "label": "greet"}\n')
    monkeypatch.setenv("CM_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    ds = load_dataset("mine")
    assert ds.name == "mine" and ds.examples == [Example("hi there", "greet")]


# --------------------------------------------------------------------------- user files

def test_csv_with_named_columns(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text('id,utterance,intent,notes\n'
                 '1,"turn on the lights, please",lights,"has, commas"\n'
                 '2,"  what is   the\tweather ",weather,\n'
                 '3,"he said ""hello""",greeting,x\n', encoding="utf-8")
    ds = load_file(p, text_column="utterance", label_column="intent")
    assert ds.name == "mine"
    assert ds.examples == [Example("turn on the lights, please", "lights"),
                           Example("what is the weather", "weather"),  # whitespace collapsed
                           Example('he said "hello"', "greeting")]
    assert ds.labels == ["greeting", "lights", "weather"]
    assert columns_of(p.read_text(), str(p)) == ["id", "utterance", "intent", "notes"]


def test_tsv_and_jsonl_with_named_columns(tmp_path):
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("query\tcat\nbook a flight to rome\ttravel\nplay some jazz\tmusic\n", encoding="utf-8")
    ds = load_file(tsv, text_column="query", label_column="cat")
    assert ds.examples == [Example("book a flight to rome", "travel"), Example("play some jazz", "music")]

    jl = tmp_path / "mine.jsonl"
    jl.write_text('{"sentence": "play some jazz", "tag": "music", "extra": 1}\n\n'
                  '{"sentence": "set an alarm", "tag": "alarm"}\n', encoding="utf-8")
    ds = load_file(jl, label_column="tag")  # text column found by name ("sentence")
    assert ds.examples == [Example("play some jazz", "music"), Example("set an alarm", "alarm")]


def test_format_sniffing():
    assert sniff_format("x.CSV", "") == "csv"
    assert sniff_format("x.ndjson", "") == "jsonl"
    assert sniff_format("upload", '{"input": "a"}') == "jsonl"
    assert sniff_format("upload", "text\tlabel\na\tb") == "tsv"
    assert sniff_format("upload", "text,label\na,b") == "csv"


def test_parse_examples_from_text_with_labels_and_unlabelled():
    text = "text,label\nhello,greet\nbye,farewell\n"
    assert parse_examples(text, text_column="text", labels=["greet", "farewell"]) == [
        Example("hello", "greet"), Example("bye", "farewell")]
    unl = parse_examples("text\nq one\nq two\n", text_column="text", label_column=None, fmt="csv")
    assert unl == [Example("q one", ""), Example("q two", "")]
    # numbers are text too (a CSV of ids); blank rows are skipped
    assert parse_examples('{"input": 42, "label": 7}\n\n', fmt="jsonl") == [Example("42", "7")]


def test_duplicates_dropped_unless_asked(tmp_path):
    text = "input,label\na b,x\na  b,x\na b,y\nc,x\n"
    kept = parse_examples(text, fmt="csv")
    assert kept == [Example("a b", "x"), Example("a b", "y"), Example("c", "x")]
    assert len(parse_examples(text, fmt="csv", drop_duplicates=False)) == 4


# --------------------------------------------------------------------------- errors name file and line

def _err(path, **kw) -> DataError:
    with pytest.raises(DataError) as ei:
        load_file(path, **kw)
    return ei.value


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"input": "a", "label": "x"}\n{"input": "b", "label": "y"}\n{"input": "c", "label": \n')
    e = _err(p)
    assert e.source == str(p) and e.line == 3
    assert str(p) in str(e) and "line 3" in str(e) and "malformed JSON" in str(e)


def test_json_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text('{"input": "a", "label": "x"}\n["b", "y"]\n')
    e = _err(p, text_column="input")
    assert e.line == 2 and "JSON object" in str(e)


def test_missing_column_names_columns(tmp_path):
    p = tmp_path / "cols.csv"
    p.write_text("text,category\nhello,greet\n")
    e = _err(p, text_column="text", label_column="intent")
    assert e.line == 2 and str(p) in str(e)
    assert "'intent'" in str(e) and "category" in str(e)
    # no recognizable text column at all
    q = tmp_path / "weird.csv"
    q.write_text("foo,label\nhello,greet\n")
    assert "text column" in str(_err(q))


def test_empty_text_and_empty_label(tmp_path):
    p = tmp_path / "empty_text.csv"
    p.write_text("input,label\nfine,x\n   ,y\n")
    e = _err(p)
    assert e.line == 3 and "empty text" in str(e)
    q = tmp_path / "empty_label.jsonl"
    q.write_text('{"input": "fine", "label": "x"}\n{"input": "ok", "label": ""}\n')
    e = _err(q)
    assert e.line == 2 and "empty label" in str(e)
    r = tmp_path / "null.jsonl"
    r.write_text('{"input": null, "label": "x"}\n')
    assert "missing text" in str(_err(r)) and _err(r).line == 1


def test_non_text_values_are_refused(tmp_path):
    p = tmp_path / "types.jsonl"
    p.write_text('{"input": ["a"], "label": "x"}\n')
    e = _err(p)
    assert e.line == 1 and "must be text" in str(e)


def test_label_outside_label_set(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("input,label\nhello,greet\nbye,farewell\nwhat,unknown\n")
    e = _err(p, labels=["greet", "farewell"])
    assert e.line == 4 and "'unknown'" in str(e) and "not in the label set" in str(e)
    ok = load_file(p, labels=["greet", "farewell", "unknown", "spare"])
    assert ok.labels == ["farewell", "greet", "spare", "unknown"]  # a given label set is kept, sorted


def test_non_utf8_bytes(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("input,label\ncafe,x\ncaf\u00e9,y\n".encode("latin-1"))
    e = _err(p)
    assert e.line == 3 and "UTF-8" in str(e) and str(p) in str(e)


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffinput,label\ncaf\u00e9,x\n".encode("utf-8"))
    assert load_file(p).examples == [Example("caf\u00e9", "x")]


def test_oversize_file(tmp_path, monkeypatch):
    p = tmp_path / "big.jsonl"
    p.write_text('{"input": "a", "label": "x"}\n' * 10)
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 100)
    e = _err(p)
    assert "limit" in str(e) and str(p) in str(e)
    with pytest.raises(DataError, match="limit"):
        data._decode(b"x" * 101, "upload.csv")  # uploads are checked on the bytes too


def test_oversize_text(tmp_path):
    p = tmp_path / "long.csv"
    p.write_text("input,label\n" + "word " * 1000 + ",x\n")
    e = _err(p)
    assert e.line == 2 and "over the" in str(e)


def test_empty_and_header_only_files(tmp_path):
    for content in ("", "\n\n", "input,label\n"):
        p = tmp_path / "empty.csv"
        p.write_text(content)
        e = _err(p, text_column="input")
        assert str(p) in str(e)
        assert "no examples" in str(e) or "header" in str(e)
    q = tmp_path / "empty.jsonl"
    q.write_text("")
    assert str(q) in str(_err(q, text_column="input"))


def test_row_with_too_many_cells(tmp_path):
    p = tmp_path / "cells.csv"
    p.write_text("input,label\nhello,greet\nbye,farewell,extra\n")
    e = _err(p)
    assert e.line == 3 and "more cells" in str(e)


def test_missing_file(tmp_path):
    e = _err(tmp_path / "nope.csv")
    assert "not found" in str(e) and "nope.csv" in str(e)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
    e = DataError("bad", source="f.csv", line=7)
    assert str(e) == "f.csv, line 7: bad"


# --------------------------------------------------------------------------- splits

def _toy(n_labels=5, per_label=20, name="toy") -> Dataset:
    return Dataset(name, [Example(f"query {lab} number {i}", f"label{lab}") for lab in range(n_labels)
                          for i in range(per_label)])


def test_split_is_seeded_and_reproducible():
    ds = _toy()
    a, b = split_dataset(ds, pref_count=10, seed=7), split_dataset(ds, pref_count=10, seed=7)
    assert a.preference.examples == b.preference.examples and a.test.examples == b.test.examples
    c = split_dataset(ds, pref_count=10, seed=8)
    assert (c.preference.examples, c.test.examples) != (a.preference.examples, a.test.examples)
    assert a.seed == 7
    assert a.preference.labels == ds.labels and a.test.labels == ds.labels  # label set is the dataset's


def test_split_sizes():
    ds = _toy(per_label=20)  # 100 rows
    s = split_dataset(ds, pref_fraction=0.1, seed=1)
    assert len(s.test) == 50 and len(s.preference) == 10
    s = split_dataset(ds, pref_count=33, seed=1)
    assert len(s.preference) == 33
    s = split_dataset(ds, pref_count=5, n_test=12, seed=1)
    assert len(s.test) == 12 and len(s.preference) == 5
    s = split_dataset(ds, pref_count=5, test_fraction=0.2, seed=1)
    assert len(s.test) == 20
    # the preference pool does not depend on n_test: the first test rows are the same
    full = split_dataset(ds, pref_count=5, seed=3)
    cut = split_dataset(ds, pref_count=5, n_test=10, seed=3)
    assert cut.test.examples == full.test.examples[:10]


@pytest.mark.parametrize("name", sorted(SHARED))
def test_split_disjoint_by_text_on_shared_data(name, data_dir):
    ds = load_dataset(name)
    for seed in (0, 40):
        for stratified in (False, True):
            s = split_dataset(ds, pref_fraction=0.05, seed=seed, stratified=stratified)
            assert not {e.text for e in s.preference.examples} & {e.text for e in s.test.examples}
            assert len(s.preference) == int(0.05 * len(ds))


def test_split_disjoint_when_texts_repeat_with_other_labels():
    # the same text annotated twice with different labels must not sit on both sides
    ex = [Example(f"text {i % 40}", f"lab{i % 3}") for i in range(120)]  # every text under 3 labels
    ds = Dataset("dups", ex)
    assert len(parse_examples("\n".join(json.dumps({"input": e.text, "label": e.label}) for e in ex),
                              fmt="jsonl")) == 120
    for seed in range(20):
        s = split_dataset(ds, pref_count=10, n_test=20, seed=seed)
        assert len(s.preference) == 10
        assert not {e.text for e in s.preference.examples} & {e.text for e in s.test.examples}


def test_stratified_covers_more_labels(data_dir):
    ds = load_dataset("banking77")
    plain = split_dataset(ds, pref_count=77, seed=40)
    strat = split_dataset(ds, pref_count=77, seed=40, stratified=True)
    n_plain = len({e.label for e in plain.preference.examples})
    n_strat = len({e.label for e in strat.preference.examples})
    assert n_strat == 77 > n_plain
    assert strat.test.examples == plain.test.examples  # stratifying changes only the preference draw


@pytest.mark.parametrize("kw, match", [
    (dict(pref_fraction=0.0), "pref_fraction"),
    (dict(pref_fraction=1.5), "pref_fraction"),
    (dict(pref_fraction=-0.1), "pref_fraction"),
    (dict(pref_fraction=None), "pref_fraction"),
    (dict(pref_count=0), "pref_count"),
    (dict(pref_count=-3), "pref_count"),
    (dict(pref_count=51), "only 50 rows"),
    (dict(pref_count=5, n_test=0), "n_test"),
])
def test_split_errors(kw, match):
    with pytest.raises(DataError, match=match):
        split_dataset(_toy(), seed=0, **kw)


def test_split_needs_two_rows():
    with pytest.raises(DataError, match="at least 2"):
        split_dataset(Dataset("one", [Example("a", "x")]), pref_count=1)


# --------------------------------------------------------------------------- the hub (no network)

class _ClassLabel:
    def __init__(self, names):
        self.names = list(names)

    def int2str(self, i):
        return self.names[i]


class _FakeHubDataset:
    def __init__(self, rows, features):
        self.rows, self.features = rows, features

    def __iter__(self):
        return iter(self.rows)


@pytest.fixture
def fake_datasets(monkeypatch):
    """Replace `datasets.load_dataset`; returns the list of calls made to it."""
    try:
        import datasets as hf
    except ImportError:  # the loader imports it lazily; a stand-in module is as good
        hf = types.ModuleType("datasets")
        monkeypatch.setitem(sys.modules, "datasets", hf)
    calls = []

    def install(fn):
        def wrapped(*args, **kw):
            calls.append((args, kw))
            return fn(*args, **kw)
        monkeypatch.setattr(hf, "load_dataset", wrapped, raising=False)
        return calls
    return install


def test_load_hub_offline_says_so(fake_datasets):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'mteb/banking77' on the Hub")
    calls = fake_datasets(offline)
    with pytest.raises(DataError) as ei:
        load_hub("banking77")
    msg = str(ei.value)
    assert "offline" in msg.lower() and "ConnectionError" in msg and "mteb/banking77" in msg
    assert "--dataset" in msg or "CM_DATA_DIR" in msg  # tells the user what to do instead
    assert calls and calls[0][0][0] == "mteb/banking77"


def test_load_hub_int_labels_mapped_with_underscores(fake_datasets):
    names = ["play_music", "set_alarm", "weather_query"]
    rows = [{"text": "play   some jazz", "label": 0}, {"text": "wake me at 7", "label": 1},
            {"text": "rain today?", "label": 2}, {"text": "   ", "label": 0}, {"text": "blast it", "label": 0}]
    calls = fake_datasets(lambda *a, **k: _FakeHubDataset(rows, {"label": _ClassLabel(names)}))
    ds = load_hub("massive_scenario")
    assert calls[0][0][:2] == ("mteb/amazon_massive_scenario", "en") and calls[0][1]["split"] == "test"
    assert ds.examples == [Example("play some jazz", "play music"), Example("wake me at 7", "set alarm"),
                           Example("rain today?", "weather query"), Example("blast it", "play music")]
    assert ds.labels == ["play music", "set alarm", "weather query"]
    assert ds.source == "hf:mteb/amazon_massive_scenario"
    assert len(load_hub("massive_scenario", limit=2)) == 2


def test_load_hub_clustering_format_and_lowercase(fake_datasets):
    rows = [{"sentences": ["a b", "c d", "e f"], "labels": ["math_se", "bio_se", "math_se"]},
            {"sentences": ["g h"], "labels": ["Chem_SE"]}]
    fake_datasets(lambda *a, **k: _FakeHubDataset(rows, {}))
    ds = load_hub("stackexchange")
    assert [(e.text, e.label) for e in ds.examples] == [("a b", "math se"), ("c d", "bio se"), ("e f", "math se"),
                                                        ("g h", "Chem SE")]
    assert len(load_hub("stackexchange", limit=2)) == 2
    rows2 = [{"text": "Set an ALARM", "label_text": "CREATE_ALARM"}]
    fake_datasets(lambda *a, **k: _FakeHubDataset(rows2, {}))
    assert load_hub("mtop_intent").examples == [Example("Set an ALARM", "create alarm")]


def test_load_hub_unknown_and_empty(fake_datasets):
    with pytest.raises(DataError, match="unknown dataset"):
        load_hub("imagenet")
    fake_datasets(lambda *a, **k: _FakeHubDataset([], {}))
    with pytest.raises(DataError, match="no rows"):
        load_hub("clinc")

