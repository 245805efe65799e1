"""The OpenAI-compatible backend against a local fake server (127.0.0.1 only): generation, the evaluation's
fallback from scoring to constrained generation, and errors that are clear and never contain the key."""
from __future__ import annotations

import json
import socket

import pytest

from cm_core import prompts
from cm_core.backends import make_backend
from cm_core.backends.base import Failed, GenRequest
from cm_core.backends.openai_backend import OpenAIChatLLM
from cm_core.data import Dataset, Example
from cm_core.errors import BackendError
from cm_core.evaluate import run_evaluation

from fake_openai import parse_prompt

LABELS = ["podcasts", "sky report", "tunes", "wake-up buzz"]


def _req(query: str, labels=LABELS, **kw) -> GenRequest:
    return GenRequest.of(prompts.zero_shot(query, labels), **kw)


def _llm(server, key="sk-test-0123456789abcdef", **kw) -> OpenAIChatLLM:
    kw.setdefault("max_retries", 0)
    return OpenAIChatLLM("fake-model", base_url=server.base_url, api_key=key, **kw)


# --------------------------------------------------------------------------- generation

def test_generate_returns_n_texts_in_request_order(fake_openai):
    table = {f"query {i}": f"answer {i}" for i in range(12)}
    server = fake_openai(table)
    llm = _llm(server, concurrency=4)
    out = llm.generate([_req(f"query {i}", n=3, temperature=0.7) for i in range(12)])
    assert out == [[f"answer {i}"] * 3 for i in range(12)]  # concurrent requests, answers stay in order
    assert llm.stats.generate_calls == 12 and len(server.requests) == 12
    seen = sorted(parse_prompt(b["messages"])[0] for b in server.requests)
    assert seen == sorted(table)
    for body in server.requests:
        assert body["model"] == "fake-model" and body["n"] == 3 and body["temperature"] == 0.7
        assert body["messages"] == prompts.zero_shot(parse_prompt(body["messages"])[0], LABELS)
        assert "top_p" not in body  # sent only when it restricts sampling
    llm.generate([_req("query 1", n=1, top_p=0.9, max_tokens=7, seed=3)])
    last = server.requests[-1]
    assert last["top_p"] == 0.9 and last["max_tokens"] == 7 and last["seed"] == 3 and last["n"] == 1


def test_concurrency_is_bounded_and_used(fake_openai):
    server = fake_openai({f"query {i}": f"answer {i}" for i in range(12)}, delay=0.2)
    llm = _llm(server, concurrency=4)
    out = llm.generate([_req(f"query {i}") for i in range(12)])
    assert out == [[f"answer {i}"] for i in range(12)]
    assert server.max_in_flight == 4  # requests overlap, never more than the bound
    llm.close()
    with pytest.raises(BackendError, match="closed"):
        llm.generate([_req("query 1")])


def test_generate_works_inside_a_running_event_loop(fake_openai):
    # Jupyter kernels and Gradio run an event loop in the caller's thread; the backend has its own loop thread
    import asyncio
    server = fake_openai({"query 1": "answer 1"})
    llm = _llm(server)

    async def cell():
        return llm.generate([_req("query 1")])

    assert asyncio.run(cell()) == [["answer 1"]]


def test_server_returning_fewer_choices_is_topped_up(fake_openai):
    server = fake_openai({"q": "tunes"}, max_choices=1)
    assert _llm(server).generate([_req("q", n=3)]) == [["tunes"] * 3]
    assert [r["n"] for r in server.requests] == [3, 2, 1]


@pytest.mark.parametrize("retries", [0, 2])
def test_server_returning_no_choices_is_a_failed_answer(fake_openai, retries):
    """A reply without choices is retried like a fault, then answered with Failed (not raised: one query's reply,
    not the server, is at fault), which the chooser reads as an empty, wrong answer."""
    server = fake_openai({"q": "tunes"}, max_choices=0)
    llm = _llm(server, max_retries=retries)
    [[got]] = llm.generate([_req("q", n=2)])
    assert isinstance(got, Failed) and got == "" and got.kind == "content"
    assert got.reason.startswith("openai:fake-model: ") and "no choices" in got.reason
    assert f"({retries + 1} attempt" in got.reason
    assert len(server.requests) == retries + 1  # bounded: max_retries retries
    assert llm.stats.failed == 1 and llm.stats.retries == retries


def test_local_server_needs_no_key(fake_openai, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = fake_openai({"q": "tunes"})
    llm = OpenAIChatLLM("fake-model", base_url=server.base_url, max_retries=0)
    assert llm.generate([_req("q")]) == [["tunes"]]
    assert server.auth_headers == ["Bearer EMPTY"]
    assert llm.identity() == {"kind": "openai", "model": "fake-model", "base_url": server.base_url}


def test_no_key_for_the_real_api_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(BackendError, match="OPENAI_API_KEY"):
        OpenAIChatLLM("gpt-4o-mini")


# --------------------------------------------------------------------------- the evaluation on a chat-only backend

def _user_data() -> tuple[Dataset, dict[str, str]]:
    """A user's four labels; the 'model' has its own words for two of them and lumps two others together."""
    rows = []
    for i in range(10):
        rows += [Example(f"play song number {i}", "tunes"), Example(f"next episode of show {i}", "podcasts"),
                 Example(f"forecast for day {i}", "sky report"), Example(f"alarm at {i} am", "wake-up buzz")]
    model_words = {"tunes": "audio", "podcasts": "audio", "sky report": "weather", "wake-up buzz": "wake-up buzz"}
    return Dataset("user-slang", rows), model_words


def test_run_evaluation_falls_back_to_constrained_generation(fake_openai, tmp_path):
    ds, model_words = _user_data()
    gold_of = {e.text: e.label for e in ds.examples}

    def responder(query, listed):
        if len(listed) < len(ds.labels) and gold_of[query] in listed:
            return gold_of[query]  # asked among a few candidates only (CM's second call): picks the right one
        return model_words[gold_of[query]]  # otherwise: the model's own wording

    server = fake_openai(responder)
    key = "sk-eval-" + "k3y" * 10
    llm = make_backend("openai:fake-model", base_url=server.base_url, api_key=key, cache_dir=tmp_path, max_retries=0)
    assert not llm.supports_scores
    res = run_evaluation(ds, llm, ["zero_shot+cm"], pref_count=16, n_test=16, seed=40, stratified=True, n_boot=200)

    cfg = res["config"]
    assert cfg["scoring"] == "generation-fallback" and cfg["decoding"]["mode"] == "score"
    assert cfg["model"] == {"kind": "openai", "model": "fake-model", "base_url": server.base_url}
    assert cfg["seed"] == 40 and cfg["n_test"] == 16 and cfg["pref_count"] == 16 and cfg["dataset"] == "user-slang"
    # votes: every request asked for n_votes samples
    assert {r["n"] for r in server.requests} == {cfg["decoding"]["n_votes"]}

    gold = res["gold"]
    zs, cm = res["results"]["zero_shot"], res["results"]["zero_shot+cm"]
    expected_zs = [model_words[g] for g in gold]  # unmatched answers are kept as said, and count as wrong
    assert res["predictions"]["zero_shot"] == expected_zs
    assert zs["accuracy"] == pytest.approx(sum(g == "wake-up buzz" for g in gold) / len(gold))
    assert res["predictions"]["zero_shot+cm"] == gold and cm["accuracy"] == 1.0
    n_audio = sum(g in ("tunes", "podcasts") for g in gold)
    assert n_audio > 0
    assert cm["actions"] == {"choose": n_audio, "map": len(gold) - n_audio}
    assert cm["second_call_rate"] == pytest.approx(n_audio / len(gold))
    bank = res["banks"]["zero_shot"]["bank"]["counts"]
    assert set(bank["audio"]) == {"tunes", "podcasts"} and list(bank["weather"]) == ["sky report"]
    assert 0 <= cm["p_value"] <= 1 and cm["delta"] == pytest.approx(1.0 - zs["accuracy"])
    assert key not in json.dumps(res) and "k3yk3y" not in json.dumps(res)

    # the same run again is served from the response cache: no new request reaches the server
    n_before = len(server.requests)
    again = run_evaluation(ds, llm, ["zero_shot+cm"], pref_count=16, n_test=16, seed=40, stratified=True, n_boot=200)
    assert len(server.requests) == n_before
    assert again["predictions"] == res["predictions"]
    llm.close()


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("retries", [0, 1])
def test_http_500_is_a_backend_error(fake_openai, retries):
    server = fake_openai(status=500)
    key = "sk-test-abcdef0123456789"
    with pytest.raises(BackendError) as ei:
        _llm(server, key=key, max_retries=retries).generate([_req("q")])
    msg = str(ei.value)
    assert "HTTP 500" in msg and "openai:fake-model" in msg and "failing on purpose" in msg
    assert "Traceback" not in msg and key not in msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__  # raised `from None`: no chained traceback
    assert len(server.requests) == 1 + retries  # bounded: the client's retries, then the error


@pytest.mark.parametrize("key", ["sk-proj-SeCrEt0123456789abcdef", "ollama-local-SeCrEt-998877", "SeCrEtTokenXYZ42"])
def test_http_401_echoing_the_key_does_not_leak_it(fake_openai, key):
    server = fake_openai(status=401)
    with pytest.raises(BackendError) as ei:
        _llm(server, key=key).generate([_req("q")])
    msg = str(ei.value)
    assert "HTTP 401" in msg
    assert server.auth_headers == [f"Bearer {key}"]  # the server did see the key and echoed it back...
    assert key not in msg and "SeCrEt" not in msg  # ...the error message does not carry it
    assert key not in repr(ei.value.args)


def test_connection_refused_is_a_backend_error():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = OpenAIChatLLM("fake-model", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-x-0123456789",
                        max_retries=0, timeout=5)
    with pytest.raises(BackendError, match="cannot connect"):
        llm.generate([_req("q")])
