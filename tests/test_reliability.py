"""Reliability: hostile inputs get a clear error naming file, line and problem; a failing OpenAI-compatible backend
(429, 5xx, timeouts, truncated or odd replies, answers outside the candidates) either recovers through retries or
fails with one clear BackendError; an evaluation killed midway (SIGKILL) resumes from the response cache and gives
the same results as an uninterrupted run.

Everything runs against the fake server in tests/fake_openai.py (127.0.0.1); no LLM is loaded.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cm_core import prompts
from cm_core.backends import make_backend
from cm_core.backends.base import Failed, GenRequest
from cm_core.backends.openai_backend import OpenAIChatLLM
from cm_core.bank import MemoryBank
from cm_core.cli import main
from cm_core.data import MAX_TEXT_CHARS, Dataset, Example, load_file, parse_examples
from cm_core.errors import BackendError, BankError, DataError
from cm_core.evaluate import accuracy, run_evaluation
from cm_core.methods import clean_answer

from conftest import REPO
from fake_openai import FAULTS, OFF_SET_ANSWER, parse_prompt

pytestmark = pytest.mark.timeout(300)

KEY = "sk-reliability-" + "Rz8" * 8
FUZZ = settings(max_examples=int(os.environ.get("CM_FUZZ_EXAMPLES", "100")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# =========================================================================== 1. hostile inputs

def _write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


LONG = "word " * (MAX_TEXT_CHARS // 4)
HOSTILE_FILES = [  # (file name, content, load_file kwargs, substrings the message must contain)
    ("bad.jsonl", '{"input": "a", "label": "x"}\n{"input": "b", "label": \n', {}, ["line 2", "malformed JSON"]),
    ("list.jsonl", '{"input": "a", "label": "x"}\n["b", "y"]\n', {}, ["line 2", "expected a JSON object"]),
    ("bigint.jsonl", '{"input": "a", "label": "x"}\n{"input": 1' + "0" * 5000 + ', "label": "x"}\n', {},
     ["line 2", "malformed JSON", "integer"]),
    ("deep.jsonl", '{"input": ' + "[" * 100_000 + "]" * 100_000 + ', "label": "x"}\n', {},
     ["line 1", "nested too deeply"]),
    ("nolabel.jsonl", '{"input": "a", "label": "x"}\n{"input": "b"}\n', {}, ["line 2", "no column 'label'"]),
    ("cols.csv", "utterance,label\na,x\n", {}, ["cannot tell the text column", "utterance"]),
    ("cols2.csv", "text,tag\na,x\n", {}, ["line 2", "no column 'label'", "tag"]),
    ("dupcol.csv", "text,label,text\na,x,b\n", {}, ["line 1", "'text' appears 2 times"]),
    ("wide.csv", "text,label\na,x\nb,y,z\n", {}, ["line 3", "more cells than the header"]),
    ("short.csv", "text,label\na,x\nb\n", {}, ["line 3", "missing label"]),
    ("emptytext.csv", "text,label\na,x\n   ,y\n", {}, ["line 3", "empty text"]),
    ("emptylabel.tsv", "text\tlabel\na\tx\nb\t \n", {}, ["line 3", "empty label"]),
    ("outside.csv", "text,label\na,x\nb,zzz\n", {"labels": ["x", "y"]}, ["line 3", "'zzz' is not in the label set"]),
    ("long.csv", f"text,label\na,x\n{LONG},y\n", {}, ["line 3", f"over the {MAX_TEXT_CHARS} limit"]),
    ("latin1.csv", "text,label\na,x\ncafé,y\n".encode("latin-1"), {}, ["line 3", "not UTF-8"]),
    ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", {}, ["not UTF-8"]),
    ("bigfield.csv", 'text,label\n"' + "a" * 200_000 + '",x\n', {}, ["malformed CSV", "field limit"]),
    ("headeronly.csv", "text,label\n", {}, ["no examples found"]),
    ("empty.jsonl", "\n\n", {}, ["no examples found"]),
    ("object.jsonl", '{"input": {"nested": 1}, "label": "x"}\n', {}, ["line 1", "must be text, got dict"]),
]


@pytest.mark.parametrize("name,content,kw,needles", HOSTILE_FILES, ids=[c[0] for c in HOSTILE_FILES])
def test_hostile_file_gets_a_clear_error(tmp_path, name, content, kw, needles):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as ei:
        load_file(path, **kw)
    msg = str(ei.value)
    assert msg.startswith(str(path)), msg  # names the file first
    for n in needles:
        assert n in msg, msg
    assert len(msg) < 400 and "\n" not in msg  # one readable line, not a dump of the input


def test_duplicate_rows_are_dropped_not_double_counted(tmp_path):
    path = _write(tmp_path, "dup.csv", "text,label\na,x\na,x\n a ,x\nb,y\na,y\n")
    assert [(e.text, e.label) for e in load_file(path).examples] == [("a", "x"), ("b", "y"), ("a", "y")]


def test_file_over_the_size_limit(tmp_path, monkeypatch):
    import cm_core.data as data
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 1000)
    path = _write(tmp_path, "big.csv", "text,label\n" + "a,x\n" * 400)
    with pytest.raises(DataError, match=r"big\.csv: file is 0\.0 MB, over the 0 MB limit"):
        load_file(path)


def test_valid_jsonl_with_unicode_line_separators_inside_strings(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+0085 and \\x1c-\\x1e unescaped: still one record per line."""
    rows = [{"input": "first\u2028line", "label": "x"}, {"input": "next\x85line", "label": "y"},
            {"input": "group\x1dsep", "label": "x"}]
    path = _write(tmp_path, "u.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    assert [e.label for e in load_file(path).examples] == ["x", "y", "x"]
    bad = _write(tmp_path, "u2.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{oops\n")
    with pytest.raises(DataError, match="line 4: malformed JSON"):
        load_file(bad)
    for eol in ("\r\n", "\r"):  # Windows and old Mac line ends
        path = _write(tmp_path, "eol.jsonl", eol.join(json.dumps(r, ensure_ascii=False) for r in rows) + eol)
        assert len(load_file(path).examples) == 3


HOSTILE_BANKS = [  # (content, substrings)
    ("{not json", ["line 1", "malformed JSON"]),
    ('{\n"a": ["x"],\n"b": \n}', ["line 4", "malformed JSON"]),
    ("[1, 2]", ["must be a JSON object, got list"]),
    (json.dumps({"format": "cm-memory-bank", "version": 2, "counts": {}}), ["version 2 is not supported"]),
    (json.dumps({"format": "something-else", "version": 1}), ["unknown memory bank format"]),
    (json.dumps({"format": "cm-memory-bank", "version": 1, "counts": []}), ["must be JSON objects"]),
    (json.dumps({"format": "cm-memory-bank", "version": 1, "counts": {"a": {"x": -1}}}),
     ["must be a positive integer"]),
    (json.dumps({"format": "cm-memory-bank", "version": 1, "counts": {"a": {"x": 1.5}}}),
     ["must be a positive integer"]),
    (json.dumps({"format": "cm-memory-bank", "version": 1, "counts": {"a": {}}}), ["must map labels to counts"]),
    (json.dumps({"a": [1, 2]}), ["non-empty list of label strings"]),
    ('{"a": 1' + "0" * 5000 + "}", ["malformed JSON", "integer"]),
    ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
]


@pytest.mark.parametrize("content,needles", HOSTILE_BANKS, ids=range(len(HOSTILE_BANKS)))
def test_hostile_bank_gets_a_clear_error(tmp_path, content, needles):
    path = _write(tmp_path, "bank.json", content)
    for src in (path, content):  # a file and a string
        with pytest.raises(BankError) as ei:
            MemoryBank.from_json(src)
        msg = str(ei.value)
        if isinstance(src, Path):
            assert msg.startswith(str(path)), msg
        for n in needles:
            assert n in msg, msg


def test_bank_file_not_utf8_or_too_big(tmp_path, monkeypatch):
    import cm_core.bank as bank_mod
    with pytest.raises(BankError, match="not UTF-8"):
        MemoryBank.from_json(_write(tmp_path, "latin.json", '{"café": ["x"]}'.encode("latin-1")))
    monkeypatch.setattr(bank_mod, "MAX_BANK_BYTES", 100)
    with pytest.raises(BankError, match="over the"):
        MemoryBank.from_json(_write(tmp_path, "big.json", json.dumps({f"r{i}": ["x"] for i in range(50)})))


# --------------------------------------------------------------------------- property-based

@FUZZ
@given(raw=st.binary(max_size=600), suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".txt", ""]))
def test_random_bytes_to_load_file(tmp_path, raw, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(raw)
    try:
        ds = load_file(path)
    except DataError as e:
        assert str(e).startswith(str(path))
        return
    assert ds.examples and all(e.text and e.label and len(e.text) <= MAX_TEXT_CHARS for e in ds.examples)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_random_bytes_to_bank_file(tmp_path, raw):
    path = tmp_path / "fuzz.json"
    path.write_bytes(raw)
    try:
        bank = MemoryBank.from_json(path)
    except BankError as e:
        assert str(e).startswith(str(path))
        return
    assert MemoryBank.from_json(bank.to_json()).counts == bank.counts


CELL = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12) | \
    st.sampled_from(["", " ", "a,b", 'say "hi"', "two\nlines", "tab\there", "\u2028", "x" * 30])


@FUZZ
@given(header=st.lists(st.sampled_from(["text", "label", "id", "", "Text", "label ", "x,y", 'q"'])
                       | st.text(max_size=6), min_size=1, max_size=5),
       rows=st.lists(st.lists(CELL, max_size=6), max_size=8),
       delimiter=st.sampled_from([",", "\t"]))
def test_random_csv_with_random_columns(header, rows, delimiter):
    """Either the rows come back exactly as the csv module reads them (cleaned, deduplicated), or a DataError names
    the file (and, for a row-level problem, a line of the file)."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    text = buf.getvalue()
    source = "fuzz.tsv" if delimiter == "\t" else "fuzz.csv"
    try:
        got = parse_examples(text, source=source, text_column="text", label_column="label")
    except DataError as e:
        assert e.source == source and str(e).startswith(source)
        assert e.line is None or 1 <= e.line <= text.count("\n") + 1
        return
    # Reference: what the csv module itself reads, cleaned the documented way (whitespace collapsed).
    assert header.count("text") == 1 and header.count("label") == 1
    want, seen = [], set()
    for rec in csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter):
        if all(v in (None, "") for v in rec.values()):
            continue
        pair = (" ".join(rec["text"].split()), " ".join(rec["label"].split()))
        if pair not in seen:
            seen.add(pair)
            want.append(pair)
    assert [(e.text, e.label) for e in got] == want


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=8)), min_size=1, max_size=8))
def test_jsonl_written_by_json_dumps_always_reads_back(pairs):
    """Any rows json.dumps writes (non-ASCII kept) read back, or fail only on empty text/label."""
    text = "\n".join(json.dumps({"input": t, "label": y}, ensure_ascii=False) for t, y in pairs) + "\n"
    clean = [(" ".join(t.split()), " ".join(y.split())) for t, y in pairs]
    try:
        got = parse_examples(text, source="rt.jsonl")
    except DataError as e:
        assert "empty" in str(e) and any(not t or not y for t, y in clean), str(e)
        bad = next(i for i, (t, y) in enumerate(clean, start=1) if not t or not y)
        assert e.line == bad
        return
    assert [(e.text, e.label) for e in got] == list(dict.fromkeys(clean))


# =========================================================================== 2. backend faults

LABELS = ["podcasts", "sky report", "tunes", "wake-up buzz"]
MODEL_WORDS = {"tunes": "audio", "podcasts": "audio", "sky report": "weather", "wake-up buzz": "wake-up buzz"}


def _user_data(n: int = 10) -> Dataset:
    rows = []
    for i in range(n):
        rows += [Example(f"play song number {i}", "tunes"), Example(f"next episode of show {i}", "podcasts"),
                 Example(f"forecast for day {i}", "sky report"), Example(f"alarm at {i} am", "wake-up buzz")]
    return Dataset("user-slang", rows)


def _responder(ds: Dataset):
    """The 'model' says its own words (lumping tunes and podcasts); asked among a few candidates, it picks right."""
    gold = {e.text: e.label for e in ds.examples}

    def respond(query, listed):
        if listed and len(listed) < len(LABELS) and gold.get(query) in listed:
            return gold[query]
        return MODEL_WORDS[gold[query]] if query in gold else "no idea"
    return respond


def _req(q: str, n: int = 2) -> GenRequest:
    return GenRequest.of(prompts.zero_shot(q, LABELS), n=n)


SERVER_FAULTS = ["429", "500", "503", "timeout", "truncated", "cut", "bad_shape", "html", "trickle"]
CONTENT_FAULTS = ["no_choices", "empty", "null_content"]  # a 200 reply without text: retried like a fault
RETRYABLE = SERVER_FAULTS + CONTENT_FAULTS
assert set(RETRYABLE) | {"off_set"} == set(FAULTS)  # every fault the server can inject


@pytest.mark.parametrize("fault", RETRYABLE)
def test_a_transient_fault_is_retried(fake_openai, fault):
    server = fake_openai({"q": "tunes"}, faults=[fault], hang=2.0, trickle=0.05)
    llm = OpenAIChatLLM("fake", base_url=server.base_url, api_key=KEY, timeout=0.5, max_retries=2, deadline=5)
    t0 = time.time()
    assert llm.generate([_req("q")]) == [["tunes", "tunes"]]
    assert server.fault_log == [(0, fault)] and len(server.requests) == 2
    assert llm.stats.retries == 1 and llm.stats.failed == 0
    assert time.time() - t0 < 5


@pytest.mark.parametrize("fault,needle", [("429", "HTTP 429"), ("500", "HTTP 500"), ("503", "HTTP 503"),
                                          ("timeout", "timeout"), ("trickle", "timeout"), ("cut", "cannot connect"),
                                          ("truncated", "unusable reply"), ("bad_shape", "not a chat completion"),
                                          ("html", "(not JSON)")])
def test_a_persistent_server_fault_is_one_clear_backend_error(fake_openai, fault, needle):
    """Every request of the call failed at the server level (here the only one): the server looks down, so the
    call raises one clear BackendError naming the backend and the URL."""
    server = fake_openai({"q": "tunes"}, faults=lambda i, body: fault, hang=1.0, trickle=0.05)
    llm = OpenAIChatLLM("fake", base_url=server.base_url, api_key=KEY, timeout=0.3, max_retries=1)
    with pytest.raises(BackendError) as ei:
        llm.generate([_req("q", n=1)])
    msg = str(ei.value)
    assert msg.startswith("openai:fake: ") and needle in msg and "\n" not in msg, msg
    assert server.base_url in msg
    assert KEY not in msg and "Traceback" not in msg
    assert ei.value.__cause__ is None and (ei.value.__context__ is None or ei.value.__suppress_context__)
    assert 1 <= len(server.requests) <= 2  # bounded: max_retries retries (or the deadline)


@pytest.mark.parametrize("fault,needle", [("no_choices", "no choices"), ("empty", "content empty"),
                                          ("null_content", "content null")])
def test_a_persistent_reply_without_text_is_a_failed_answer(fake_openai, fault, needle):
    """A reply without text is the query's problem, not the server's: after the retries the request is answered
    with Failed (an empty answer that counts as wrong), named in one line; nothing is raised."""
    server = fake_openai({"q": "tunes"}, faults=lambda i, body: fault)
    llm = OpenAIChatLLM("fake", base_url=server.base_url, api_key=KEY, max_retries=2)
    [[got]] = llm.generate([_req("q", n=1)])
    assert isinstance(got, Failed) and got == "" and got.kind == "content"
    assert got.reason.startswith("openai:fake: ") and needle in got.reason and "(3 attempts)" in got.reason
    assert len(server.requests) == 3 and llm.stats.failed == 1 and llm.stats.retries == 2


def test_persistent_fault_in_an_evaluation_fails_cleanly_and_keeps_finished_answers(fake_openai, tmp_path):
    """The server starts failing after 10 requests: run_evaluation raises BackendError once a call's requests all
    fail (no partial results file), the 10 answers that arrived are in the cache (each saved as it arrived), and
    once the server recovers the run completes without asking for them again."""
    ds = _user_data()
    server = fake_openai(_responder(ds), faults=lambda i, body: "500" if i >= 10 else None)
    llm = make_backend("openai:fake", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path, max_retries=1)
    kw = dict(pref_count=8, n_test=16, seed=40, stratified=True, n_boot=50)
    with pytest.raises(BackendError, match="HTTP 500"):
        run_evaluation(ds, llm, ["zero_shot"], **kw)
    saved = len(llm.cache)
    assert saved == 10
    server.faults = None
    before = len(server.requests)
    res = run_evaluation(ds, llm, ["zero_shot"], **kw)
    assert res["results"]["zero_shot+cm"]["accuracy"] == 1.0
    assert len(server.requests) - before == len(llm.cache) - saved  # finished answers were not asked again
    llm.close()


def test_evaluation_under_transient_faults_equals_a_clean_run(fake_openai, tmp_path):
    """About a third of distinct requests fail once, with every retryable fault in turn (replies without text
    included): the results equal a clean run's exactly."""
    ds = _user_data()
    clean = fake_openai(_responder(ds))
    ref_llm = make_backend("openai:fake", base_url=clean.base_url, api_key=KEY, cache_dir=tmp_path / "clean")
    kw = dict(pref_count=16, n_test=20, seed=40, stratified=True, n_boot=50)
    ref = run_evaluation(ds, ref_llm, ["zero_shot"], **kw)
    ref_llm.close()

    seen: dict[str, int] = {}
    cycle = [f for f in RETRYABLE if f not in ("timeout", "trickle")] + ["timeout", "trickle"]

    def faults(i, body):
        key = json.dumps(body, sort_keys=True)
        first = key not in seen
        seen.setdefault(key, len(seen))
        k = seen[key]
        return cycle[(k // 3) % len(cycle)] if first and k % 3 == 0 else None

    flaky = fake_openai(_responder(ds), faults=faults, hang=1.5, trickle=0.01)
    llm = make_backend("openai:fake", base_url=flaky.base_url, api_key=KEY, cache_dir=tmp_path / "flaky",
                       timeout=0.5, max_retries=3, deadline=10)
    res = run_evaluation(ds, llm, ["zero_shot"], **kw)
    llm.close()
    injected = {f for _, f in flaky.fault_log}
    assert injected == set(cycle), injected  # every retryable fault was injected at least once
    assert res["predictions"] == ref["predictions"] and res["gold"] == ref["gold"]
    for name in ref["results"]:
        assert res["results"][name]["accuracy"] == ref["results"][name]["accuracy"]
    assert {k: b["bank"]["counts"] for k, b in res["banks"].items()} == \
        {k: b["bank"]["counts"] for k, b in ref["banks"].items()}
    assert len(flaky.requests) > len(clean.requests)  # the retries did happen
    assert res["run"]["llm_calls"]["failed"] == 0 and res["run"]["llm_calls"]["retries"] > 0
    print(f"\ntransient faults: {len(flaky.fault_log)} injected ({len(injected)} kinds) over {len(flaky.requests)} "
          f"requests ({len(clean.requests)} without faults); results identical to the clean run")


def _broken(ds: Dataset) -> set[str]:
    return {e.text for e in ds.examples if int(e.text.split()[-1 if e.label != "wake-up buzz" else -2]) % 3 == 0}


def test_answers_outside_the_candidates_count_as_wrong(fake_openai, tmp_path):
    """Some queries always get a fluent answer that is no label: the run finishes, those predictions are
    unmatched and count as wrong, CM still works for the rest."""
    ds = _user_data()
    broken = _broken(ds)

    def faults(i, body):
        return "off_set" if parse_prompt(body["messages"])[0] in broken else None

    server = fake_openai(_responder(ds), faults=faults)
    llm = make_backend("openai:fake", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path)
    res = run_evaluation(ds, llm, ["zero_shot+cm", "zero_shot+cm_paper", "zero_shot+cm_soft"], pref_count=16,
                         n_test=20, seed=40, stratified=True, n_boot=50)
    llm.close()
    assert server.fault_log
    gold, texts = res["gold"], res["texts"]
    hit = [i for i, t in enumerate(texts) if t in broken]
    assert hit, "the test split should contain some broken queries"
    odd = clean_answer(OFF_SET_ANSWER)
    assert odd not in LABELS
    base = res["predictions"]["zero_shot"]
    assert [base[i] for i in hit] == [odd] * len(hit)  # unmatched: kept as said...
    assert res["results"]["zero_shot"]["accuracy"] == pytest.approx(  # ...and counted wrong
        sum(base[i] == gold[i] for i in range(len(gold)) if i not in hit) / len(gold))
    for name, preds in res["predictions"].items():  # every variant finished, its scores recomputable
        assert len(preds) == len(gold)
        assert res["results"][name]["accuracy"] == pytest.approx(accuracy(gold, preds))
    assert res["results"]["zero_shot+cm"]["accuracy"] > res["results"]["zero_shot"]["accuracy"]
    assert res["run"]["llm_calls"]["failed"] == 0  # an answer outside the labels is an answer, not a failure


@pytest.mark.parametrize("fault", CONTENT_FAULTS)
def test_replies_without_text_are_failures_never_cached_nor_banked(fake_openai, tmp_path, fault):
    """Some queries always get a reply without text (a content filter, a refusal, a reasoning-only model): each
    is retried, then counted as a failed query and a wrong answer; no such reply is cached or enters a memory
    bank; CM still works for the rest; and once the server answers them, a re-run repairs exactly those."""
    ds = _user_data()
    broken = _broken(ds)
    on = {"faults": True}

    def faults(i, body):
        return fault if on["faults"] and parse_prompt(body["messages"])[0] in broken else None

    server = fake_openai(_responder(ds), faults=faults)
    llm = make_backend("openai:fake", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path, max_retries=1)
    methods = ["zero_shot+cm", "zero_shot+cm_paper", "zero_shot+cm_soft"]
    kw = dict(pref_count=16, n_test=20, seed=40, stratified=True, n_boot=50)
    res = run_evaluation(ds, llm, methods, **kw)
    gold, texts = res["gold"], res["texts"]
    hit = [i for i, t in enumerate(texts) if t in broken]
    assert hit, "the test split should contain some broken queries"
    base = res["predictions"]["zero_shot"]
    assert [base[i] for i in hit] == [""] * len(hit)  # failed: the empty answer, counted wrong
    assert res["results"]["zero_shot"]["accuracy"] == pytest.approx(
        sum(base[i] == gold[i] for i in range(len(gold)) if i not in hit) / len(gold))
    calls = res["run"]["llm_calls"]
    assert calls["failed"] >= len(hit) and calls["retries"] >= calls["failed"]  # each was retried first
    assert res["run"]["failed_queries"]["total"] == calls["failed"]
    assert res["run"]["failed_queries"]["zero_shot"] == len(hit)
    for b in res["banks"].values():  # no failed answer entered the bank
        assert "" not in b["bank"]["counts"]
        assert sum(map(sum, (r.values() for r in b["bank"]["counts"].values()))) < 16
    rows = sqlite3.connect(str(tmp_path / "responses.sqlite")).execute("SELECT value FROM responses").fetchall()
    assert rows and all("" not in json.loads(v) for (v,) in rows)  # nothing failed was cached
    assert len(rows) == len(server.requests) - len(server.fault_log)
    assert res["results"]["zero_shot+cm"]["accuracy"] > res["results"]["zero_shot"]["accuracy"]

    on["faults"] = False  # the server now answers them: the same run again asks only the failed queries
    before = len(server.requests)
    again = run_evaluation(ds, llm, methods, **kw)
    llm.close()
    assert again["run"]["llm_calls"]["failed"] == calls["failed"]  # stats accumulate over the backend's life
    assert again["run"]["failed_queries"]["total"] == 0
    assert all(p != "" for p in again["predictions"]["zero_shot"])
    assert again["results"]["zero_shot"]["accuracy"] > res["results"]["zero_shot"]["accuracy"]
    assert len(server.requests) - before >= len(hit)


# --------------------------------------------------------------------------- killed midway, resumed

def _tiny_jsonl(path: Path, ds: Dataset) -> Path:
    path.write_text("".join(json.dumps({"input": e.text, "label": e.label}) + "\n" for e in ds.examples),
                    encoding="utf-8")
    return path


def _cli_args(data: Path, server, cache: Path, out: Path) -> list[str]:
    return ["evaluate", "--dataset", str(data), "--model", "openai:fake", "--base-url", server.base_url,
            "--methods", "zero_shot", "--n-test", "24", "--pref-count", "16", "--stratified", "--cache-dir",
            str(cache), "--output", str(out)]


def _cli(tmp_path: Path, data: Path, server, cache: Path, out: Path) -> subprocess.Popen:
    """``python -m cm_core evaluate`` in a child process; the key comes from the environment."""
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "CM_CACHE_DIR": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "cm_core", *_cli_args(data, server, cache, out)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out, err


def _comparable(res: dict) -> dict:
    """A results JSON without what legitimately differs between runs (timings, cache-hit counts)."""
    res = json.loads(json.dumps(res))
    res.pop("run")
    for r in [*res["results"].values(), *res["banks"].values()]:
        r.pop("time_s", None)
    return res


def _cached_rows(cache: Path) -> int:
    db = sqlite3.connect(str(cache / "responses.sqlite"))
    try:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    finally:
        db.close()


def test_evaluation_killed_midway_resumes_from_the_cache(fake_openai, tmp_path, monkeypatch, capsys):
    ds = _user_data(12)
    data = _tiny_jsonl(tmp_path / "slang.jsonl", ds)
    server = fake_openai(_responder(ds), delay=0.3)

    # Reference: the same command, uninterrupted, with its own cache (in this process, to save a start-up).
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert main(_cli_args(data, server, tmp_path / "cache_ref", tmp_path / "ref.json")) == 0
    capsys.readouterr()
    total = len(server.requests)
    ref = json.loads((tmp_path / "ref.json").read_text(encoding="utf-8"))
    assert total > 24 and ref["results"]["zero_shot+cm"]["accuracy"] == 1.0

    # The same run, SIGKILLed about half way. Answers are saved one by one as they arrive, so what is lost is at
    # most what was in flight: --concurrency (8) requests, and a reply or two not yet written.
    cache, out = tmp_path / "cache", tmp_path / "res.json"
    start = len(server.requests)
    proc = _cli(tmp_path, data, server, cache, out)
    deadline = time.time() + 120
    while len(server.requests) - start < total // 2:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    killed_requests = len(server.requests) - start
    committed = _cached_rows(cache)
    assert 0 < committed < total
    assert killed_requests - committed <= 8 + 2, (killed_requests, committed)

    # Re-run to completion: only the missing answers are asked for, and the results are the reference's.
    start = len(server.requests)
    _, err = _finish(_cli(tmp_path, data, server, cache, out))
    resumed_requests = len(server.requests) - start
    res = json.loads(out.read_text(encoding="utf-8"))
    assert resumed_requests == total - committed < total
    assert res["run"]["llm_calls"]["cache_hits"] >= committed
    assert _comparable(res) == _comparable(ref)
    assert res["predictions"] == ref["predictions"]
    assert {k: v["accuracy"] for k, v in res["results"].items()} == \
        {k: v["accuracy"] for k, v in ref["results"].items()}
    assert KEY not in err
    print(f"\nkill/resume: uninterrupted run {total} requests; killed after {killed_requests} "
          f"({committed} committed); resumed run {resumed_requests} requests; results identical")
