"""The OpenAI-compatible path under faults that used to stall or silently corrupt a run, against the fake server
(tests/fake_openai.py, 127.0.0.1): bounded time per attempt and per request, a sliding window instead of batch
barriers, a progress bar with retries and failures, the CLI's count of failed queries and its threshold, flags
and datasets checked before any backend is built, the backend closed on every exit path, one warning per backend.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from cm_core import prompts
from cm_core.backends import Failed, make_backend
from cm_core.backends.base import GenRequest
from cm_core.backends.openai_backend import OpenAIChatLLM, check_base_url
from cm_core.cli import main
from cm_core.data import Dataset
from cm_core.errors import BackendError, CMError
from cm_core.evaluate import run_evaluation

from fake_openai import parse_prompt

pytestmark = pytest.mark.timeout(120)

KEY = "sk-faults-" + "Qw7" * 8
LABELS = ["podcasts", "sky report", "tunes", "wake-up buzz"]


from test_reliability import _user_data  # noqa: E402  (the same user data as the fault tests there)


def _req(q: str, n: int = 1) -> GenRequest:
    return GenRequest.of(prompts.zero_shot(q, LABELS), n=n)


def _responder(ds: Dataset):
    gold = {e.text: e.label for e in ds.examples}
    return lambda query, listed: gold.get(query, "no idea")


def _jsonl(path: Path, ds: Dataset) -> Path:
    path.write_text("".join(json.dumps({"input": e.text, "label": e.label}) + "\n" for e in ds.examples),
                    encoding="utf-8")
    return path


def _evaluate_args(data: Path, url: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["evaluate", "--dataset", str(data), "--model", "openai:fake", "--base-url", url, "--methods",
            "zero_shot", "--n-test", "12", "--pref-count", "8", "--stratified", "--cache-dir", str(tmp_path / "c"),
            "--output", str(tmp_path / "r.json"), *extra]


# --------------------------------------------------------------------------- time bounds

def test_a_reply_trickled_byte_by_byte_cannot_outlast_the_timeout(fake_openai):
    """The timeout bounds an attempt as a whole, not each read: a body sent a byte every 50 ms (about 15 s in
    all) fails its attempt at 0.5 s, and the retry gets the answer."""
    server = fake_openai({"q": "tunes"}, faults=["trickle"], trickle=0.05)
    llm = OpenAIChatLLM("fake", base_url=server.base_url, api_key=KEY, timeout=0.5, max_retries=1, deadline=10)
    t0 = time.time()
    assert llm.generate([_req("q")]) == [["tunes"]]
    assert time.time() - t0 < 3 and len(server.requests) == 2 and llm.stats.retries == 1


def test_a_server_that_never_answers_fails_within_the_deadline_naming_url_and_limits(fake_openai):
    server = fake_openai({"q": "tunes"}, faults=lambda i, body: "timeout", hang=60)
    llm = OpenAIChatLLM("fake", base_url=server.base_url, api_key=KEY, timeout=0.4, max_retries=10, deadline=1.5,
                        concurrency=4)
    t0 = time.time()
    with pytest.raises(BackendError) as ei:
        llm.generate([_req(f"q{i}") for i in range(6)])
    took = time.time() - t0
    msg = str(ei.value)
    assert took < 4, took  # the deadline, not 11 attempts x 0.4 s plus back-off
    assert server.base_url in msg and "1.5 s deadline" in msg and "0.4 s" in msg and "\n" not in msg, msg
    assert "in a row failed" in msg  # a server that looks down stops the call
    llm.close()


def test_one_hung_request_delays_only_itself(fake_openai):
    """A sliding window, not batches: with one request hanging, the 23 others are all answered meanwhile, and the
    whole call takes about one timeout plus a retry, not one per batch."""
    hung = "query 3"
    server = fake_openai(lambda q, listed: q.replace("query", "answer"), delay=0.05, hang=30,
                         faults=lambda i, body: "timeout" if parse_prompt(body["messages"])[0] == hung and i < 5
                         else None)
    llm = OpenAIChatLLM("fake", base_url=server.base_url, api_key=KEY, timeout=1.0, max_retries=2, deadline=10,
                        concurrency=4)
    order: list[int] = []
    t0 = time.time()
    results = {}
    for i, res in llm.generate_stream([_req(f"query {i}") for i in range(24)]):
        order.append(i)
        results[i] = res
        if i != 3:
            assert time.time() - t0 < 1.0, "a request waited for the hung one"
    assert time.time() - t0 < 3
    assert order[-1] == 3 and len(order) == 24  # the hung request came last; nobody waited for it
    assert results == {i: [f"answer {i}"] for i in range(24)}
    assert server.max_in_flight <= 4 and llm.stats.retries == 1
    llm.close()


# --------------------------------------------------------------------------- failures, the breaker, progress

def test_failures_and_retries_are_counted_and_shown(fake_openai, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    seen: set[str] = set()

    def faults(i, body):
        q = parse_prompt(body["messages"])[0]
        if q == "query 0":
            return "null_content"  # every time: a failed query
        if q == "query 3" and q not in seen:
            seen.add(q)
            return "500"  # once: a retry
        return None

    server = fake_openai(lambda q, listed: "tunes", faults=faults)
    llm = OpenAIChatLLM("fake", base_url=server.base_url, api_key=KEY, max_retries=1, concurrency=2)
    out = llm.generate([_req(f"query {i}") for i in range(6)])
    assert isinstance(out[0][0], Failed) and out[1:] == [["tunes"]] * 5
    assert llm.stats.failed == 1 and llm.stats.retries == 2  # query 0 once, the 500 once
    err = capsys.readouterr().err
    assert "retries=2 failed=1" in err and "openai:fake" in err  # the progress bar's postfix
    llm.close()


def test_fatal_statuses_stop_at_once(fake_openai):
    server = fake_openai(status=404)
    llm = OpenAIChatLLM("fake", base_url=server.base_url, api_key=KEY, max_retries=3, concurrency=2)
    with pytest.raises(BackendError, match=r"HTTP 404 .*check --base-url"):
        llm.generate([_req(f"q{i}") for i in range(10)])
    asked = [parse_prompt(b["messages"])[0] for b in server.requests if b]
    assert len(asked) == len(set(asked)) <= 4  # no retries; the rest cancelled (a window or two were under way)
    llm.close()


def test_base_urls_are_checked_before_anything_is_sent():
    for bad in ["not-a-url", "ftp://host/v1", "http://", "127.0.0.1:8000/v1", "http://host:99999/v1"]:
        with pytest.raises(CMError, match="URL"):
            check_base_url(bad)
        with pytest.raises(CMError, match="URL"):
            OpenAIChatLLM("fake", base_url=bad, api_key=KEY)
    for good in ["http://127.0.0.1:8000/v1", "https://api.openai.com/v1", "http://localhost:11434/v1/"]:
        assert check_base_url(good) == good


def test_the_no_logprobs_warning_is_said_once_per_backend(fake_openai, tmp_path, caplog):
    ds = _user_data()
    server = fake_openai(_responder(ds))
    caplog.set_level(logging.WARNING)
    for _ in range(2):  # a new backend says it again, once
        llm = make_backend("openai:fake", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path)
        run_evaluation(ds, llm, ["zero_shot", "zero_shot+cm_paper"], pref_count=8, n_test=8, seed=40, n_boot=20)
        llm.close()
    said = [r for r in caplog.records if "gives no log-probabilities" in r.getMessage()]
    assert len(said) == 2, [r.getMessage() for r in said]


# --------------------------------------------------------------------------- the command line

@pytest.fixture
def cli_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("TQDM_DISABLE", "1")


def test_cli_counts_failed_queries_and_exits_non_zero_past_the_threshold(fake_openai, tmp_path, capsys, cli_env):
    ds = _user_data()
    data = _jsonl(tmp_path / "d.jsonl", ds)
    broken = {e.text for e in ds.examples if re.search(r"\b[12]\b", e.text)}  # 8 of the 40 queries
    server = fake_openai(_responder(ds), faults=lambda i, body: "null_content" if parse_prompt(
        body["messages"])[0] in broken else None)
    args = _evaluate_args(data, server.base_url, tmp_path, "--max-retries", "1", "--timeout", "5")
    assert main(args) == 2  # default --max-failed-fraction 0: any failure is an error...
    out, err = capsys.readouterr()
    res = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))  # ...after the results were written
    total = res["run"]["failed_queries"]["total"]
    assert total >= 1 and res["run"]["llm_calls"]["failed"] == total
    assert f"error: {total} of " in err and "over --max-failed-fraction 0" in err and err.count("\n") >= 1
    assert f"failed LLM queries (each counts as a wrong answer): {total}" in out
    assert KEY not in out + err
    assert sorted(os.listdir(tmp_path / "c")) == ["responses.sqlite"]  # closed: no -wal / -shm left

    # tolerated: exit 0 with a warning; the failed queries are asked again (they were never cached)
    before = len(server.requests)
    assert main([*args, "--max-failed-fraction", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert "warning: " in err and "failed" in err
    asked_again = len(server.requests) - before
    assert asked_again == 2 * json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))[
        "run"]["failed_queries"]["total"]  # each failed query: its attempt and one retry, nothing else


@pytest.mark.parametrize("flags,needle", [
    (["--base-url", "not-a-url"], "--base-url 'not-a-url' is not an http:// or https:// URL"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--max-retries", "-1"], "--max-retries must be 0 or more"),
    (["--deadline", "-5"], "--deadline must be positive"),
    (["--max-failed-fraction", "1.5"], "--max-failed-fraction must be between 0 and 1"),
    (["--concurrency", "0"], "--concurrency must be at least 1"),
])
def test_bad_flags_fail_before_any_backend_is_built(tmp_path, capsys, cli_env, flags, needle):
    data = _jsonl(tmp_path / "d.jsonl", _user_data())
    args = _evaluate_args(data, "http://127.0.0.1:9/v1", tmp_path)
    for i in range(0, len(flags), 2):  # the flag given last wins in argparse
        args += flags[i:i + 2]
    t0 = time.time()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert time.time() - t0 < 2  # no retries against a URL that cannot work
    assert not (tmp_path / "c").exists()  # no cache file, no backend


@pytest.mark.parametrize("rows,extra,needle", [
    ([("a", "x"), ("b", "x"), ("c", "x"), ("d", "x")], [], "1 label ('x'); an evaluation needs at least 2"),
    ([("a", "x"), ("b", "y"), ("c", "x"), ("d", "y")], ["--pref-count", "1"], "the test split has 2 rows"),
    ([(f"t{i}", "xy"[i % 2]) for i in range(40)], ["--pref-count", "1"], "1 preference sample"),
])
def test_a_dataset_too_small_for_the_split_is_refused_before_any_backend(tmp_path, capsys, cli_env, rows, extra,
                                                                         needle):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    args = ["evaluate", "--dataset", str(data), "--model", "openai:fake", "--base-url", "http://127.0.0.1:9/v1",
            "--methods", "zero_shot", "--cache-dir", str(tmp_path / "c"), "--output", str(tmp_path / "r.json"),
            *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "r.json").exists()


def test_a_failed_run_closes_the_backend(fake_openai, tmp_path, capsys, cli_env):
    """A run that dies on a fatal fault still closes the cache: no -wal / -shm files are left behind."""
    data = _jsonl(tmp_path / "d.jsonl", _user_data())
    server = fake_openai(status=401)
    assert main(_evaluate_args(data, server.base_url, tmp_path)) == 2
    assert "HTTP 401" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "c")) == ["responses.sqlite"]
    with sqlite3.connect(str(tmp_path / "c" / "responses.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0
