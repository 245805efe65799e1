"""The memory bank: counts, conditional p(Y'|Y), stats, JSON round trip, the paper's format, and bad input."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm_core.bank import BANK_FORMAT, BANK_VERSION, MemoryBank
from cm_core.errors import BankError, DataError

PAIRS = [("weather", "sky report"), ("weather", "sky report"), ("weather", "outside"),
         ("alarm", "wake-up buzz"), ("music", "tunes"), ("music", "tunes"), ("music", "radio"), ("music", "radio"),
         ("music", "podcast"), ("news", "news")]


@pytest.fixture
def bank() -> MemoryBank:
    return MemoryBank.from_pairs(PAIRS, meta={"model": "fake"})


def test_counts_and_lookup(bank):
    assert bank.counts["weather"] == {"sky report": 2, "outside": 1}
    assert bank.counts["music"] == {"tunes": 2, "radio": 2, "podcast": 1}
    assert len(bank) == 4 and "alarm" in bank and "cooking" not in bank
    assert bank.n_samples == len(PAIRS)
    bank.add("alarm", "wake-up buzz", count=3)
    assert bank.counts["alarm"] == {"wake-up buzz": 4}


def test_candidates_most_frequent_first_ties_alphabetical(bank):
    assert list(bank.candidates("weather")) == ["sky report", "outside"]
    assert list(bank.candidates("music").items()) == [("radio", 2), ("tunes", 2), ("podcast", 1)]
    assert bank.candidates("never seen") == {}


def test_conditional_probabilities(bank):
    for resp in bank.counts:
        cond = bank.conditional(resp)
        assert math.isclose(sum(cond.values()), 1.0)
        assert list(cond) == list(bank.candidates(resp))
    assert bank.conditional("weather") == pytest.approx({"sky report": 2 / 3, "outside": 1 / 3})
    assert bank.conditional("music") == pytest.approx({"radio": 0.4, "tunes": 0.4, "podcast": 0.2})
    assert bank.conditional("never seen") == {}


def test_stats(bank):
    s = bank.stats()
    assert s == {"entries": 4, "samples": 10, "single_candidate": 2, "multi_candidate": 2, "distinct_labels": 7,
                 "agreement": pytest.approx(0.1)}  # only news -> news agrees
    assert MemoryBank().stats()["agreement"] == 0.0


def test_rows_table(bank):
    rows = bank.rows()
    assert len(rows) == sum(len(r) for r in bank.counts.values())
    assert [r["response"] for r in rows] == sorted(r["response"] for r in rows)
    music = [(r["label"], r["count"], r["p"]) for r in rows if r["response"] == "music"]
    assert music == [("radio", 2, 0.4), ("tunes", 2, 0.4), ("podcast", 1, 0.2)]


def test_json_round_trip_string_and_file(bank, tmp_path):
    text = bank.to_json()
    obj = json.loads(text)
    assert obj["format"] == BANK_FORMAT and obj["version"] == BANK_VERSION and obj["meta"] == {"model": "fake"}
    again = MemoryBank.from_json(text)
    assert again.counts == bank.counts and again.meta == bank.meta
    path = tmp_path / "bank.json"
    bank.to_json(path)
    assert path.read_text(encoding="utf-8") == text
    for src in (path, str(path)):
        loaded = MemoryBank.from_json(src)
        assert loaded.counts == bank.counts and loaded.stats() == bank.stats()


def test_non_ascii_round_trip(tmp_path):
    b = MemoryBank.from_pairs([("météo", "ciel ☀"), ("天气", "天気")])
    p = tmp_path / "b.json"
    b.to_json(p)
    assert "☀" in p.read_text(encoding="utf-8")
    assert MemoryBank.from_json(p).counts == b.counts


@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8)), max_size=30))
@settings(max_examples=60, deadline=None)
def test_round_trip_property(pairs):
    b = MemoryBank.from_pairs(pairs)
    again = MemoryBank.from_json(b.to_json())
    assert again.counts == b.counts
    assert again.n_samples == len(pairs)
    for resp in again.counts:
        assert math.isclose(sum(again.conditional(resp).values()), 1.0)


def test_import_paper_format(tmp_path):
    paper = {"weather": ["sky report", "outside"], "alarm": ["wake-up buzz"], "music": "tunes",
             "news": ["headlines", "headlines"]}
    b = MemoryBank.from_json(json.dumps(paper))
    assert b.counts == {"weather": {"sky report": 1, "outside": 1}, "alarm": {"wake-up buzz": 1},
                        "music": {"tunes": 1}, "news": {"headlines": 1}}  # distinct labels count once
    assert b.meta["imported_from"] == "paper-format"
    p = tmp_path / "paper.json"
    p.write_text(json.dumps(paper))
    assert MemoryBank.from_json(p).counts == b.counts
    # once imported it saves in our versioned format
    assert json.loads(b.to_json())["format"] == BANK_FORMAT


@pytest.mark.parametrize("obj, match", [
    ({"format": BANK_FORMAT, "version": 2, "counts": {}}, "version 2 is not supported"),
    ({"format": BANK_FORMAT, "counts": {}}, "version None"),
    ({"format": "something-else", "version": 1}, "unknown memory bank format"),
    ({"format": BANK_FORMAT, "version": 1, "counts": []}, "must be JSON objects"),
    ({"format": BANK_FORMAT, "version": 1, "counts": {}, "meta": "x"}, "must be JSON objects"),
    ({"format": BANK_FORMAT, "version": 1, "counts": {"a": ["b"]}}, "must map labels to counts"),
    ({"format": BANK_FORMAT, "version": 1, "counts": {"a": {}}}, "must map labels to counts"),
    ({"format": BANK_FORMAT, "version": 1, "counts": {"a": {"b": 0}}}, "positive integer"),
    ({"format": BANK_FORMAT, "version": 1, "counts": {"a": {"b": -2}}}, "positive integer"),
    ({"format": BANK_FORMAT, "version": 1, "counts": {"a": {"b": 1.5}}}, "positive integer"),
    ({"format": BANK_FORMAT, "version": 1, "counts": {"a": {"b": True}}}, "positive integer"),
    ({"format": BANK_FORMAT, "version": 1, "counts": {"a": {"b": "3"}}}, "positive integer"),
    ({"weather": []}, "non-empty list"),
    ({"weather": ["ok", 3]}, "non-empty list"),
    ({"weather": {"sky": 1}}, "non-empty list"),
    ({"weather": [""]}, "non-empty list"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_bank_errors(obj, match):
    with pytest.raises(BankError, match=match):
        MemoryBank.from_json(json.dumps(obj))


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{\n  "format": "cm-memory-bank",\n  "version": 1,\n  "counts": {,}\n}\n')
    with pytest.raises(BankError) as ei:
        MemoryBank.from_json(p)
    assert ei.value.line == 4 and str(p) in str(ei.value) and "malformed JSON" in str(ei.value)
    with pytest.raises(BankError, match="malformed JSON"):
        MemoryBank.from_json("{not json")
    assert issubclass(BankError, DataError)  # the CLI and demo show it like any data error


def test_missing_bank_file(tmp_path):
    with pytest.raises(BankError, match="not found"):
        MemoryBank.from_json(tmp_path / "none.json")


def test_non_utf8_bank_file(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes('{"météo": ["ciel"]}'.encode("latin-1"))
    with pytest.raises(BankError, match="UTF-8"):
        MemoryBank.from_json(p)
