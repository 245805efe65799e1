"""The OpenAI-compatible backend against a local fake server (127.0.0.1 only): generation, scoring through a
server's prompt log-probabilities (detected once, lazily), the evaluation's fallback from scoring to constrained
generation with honest votes, answer cleaning on multi-line replies, and errors that are clear and never contain
the key. tests/test_served_model.py runs the same backend against a real llama.cpp server."""
from __future__ import annotations

import json
import re
import socket

import pytest

from cm_core import prompts
from cm_core.backends import make_backend
from cm_core.backends.base import Failed, GenRequest, ScoreRequest
from cm_core.backends.openai_backend import BUILTIN_TEMPLATES, OpenAIChatLLM, _candidate_score, _Span, load_template
from cm_core.data import Dataset, Example
from cm_core.errors import BackendError, CMError
from cm_core.evaluate import run_evaluation

from fake_openai import BAD, END, GOOD, parse_prompt, tokenize

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


# --------------------------------------------------------------------------- scoring through the server

def _score_reqs(queries, labels=LABELS, listed=False):
    return [ScoreRequest.of(prompts.zero_shot(q, labels if listed else None), labels) for q in queries]


def _expected(label: str, right: bool) -> tuple[float, int]:
    n = len(tokenize(label))
    return (GOOD if right else BAD) * n + END, n + 1


@pytest.mark.parametrize("mode,batched", [("echo", False), ("prompt_logprobs", True), ("prompt_logprobs", False)])
def test_scores_come_from_the_servers_prompt_logprobs(fake_openai, mode, batched):
    server = fake_openai({"q1": "tunes", "q2": "wake-up buzz"}, completions=mode, batch_prompts=batched)
    llm = _llm(server, concurrency=3)
    assert not server.completion_requests and not server.requests  # nothing is asked at construction
    ident = llm.identity()
    assert llm.supports_scores and llm.scoring == {"echo": "completions-echo",
                                                   "prompt_logprobs": "completions-prompt-logprobs"}[mode]
    assert "chatml" in llm.scoring_note and llm.stats.extra["scoring"] == llm.scoring
    assert llm.identity() == ident  # detection does not change what the cache keys on
    probes = len(server.completion_requests)
    assert llm.supports_scores and len(server.completion_requests) == probes  # detected once
    # labels listed in the prompt (one of them is the answer) are not mistaken for the reply
    out = llm.score(_score_reqs(["q1", "q2"], listed=True))
    for res, answer in zip(out, ["tunes", "wake-up buzz"]):
        for label, s in zip(LABELS, res):
            lp, n = _expected(label, label == answer)
            assert s.logprob == pytest.approx(lp) and s.n_tokens == n
    sent = server.completion_requests[probes:]
    assert len(sent) == (2 if batched else 2 * len(LABELS))  # one request per query, or one per candidate
    assert all(b["max_tokens"] == 1 and b["temperature"] == 0 for b in sent)
    assert all((b.get("echo") and b.get("logprobs") == 0) if mode == "echo" else b.get("prompt_logprobs") == 0
               for b in sent)
    # unbatched requests run concurrently, so they arrive in any order: compare the set of full prompts sent
    prompts_sent = [p for b in sent for p in (b["prompt"] if isinstance(b["prompt"], list) else [b["prompt"]])]
    assert all(p.startswith("<|im_start|>system\n") for p in prompts_sent)
    endings = sorted((re.search(r"Query: (\S+)\n", p).group(1), p.rsplit("<|im_start|>assistant\n", 1)[1])
                     for p in prompts_sent)
    assert endings == sorted((q, f"{label}<|im_end|>") for q in ["q1", "q2"] for label in LABELS)
    assert llm.stats.score_calls == 2 and llm.stats.failed == 0


def test_scoring_drives_the_evaluation_and_is_cached(fake_openai, tmp_path):
    ds, _ = _user_data()
    gold_of = {e.text: e.label for e in ds.examples}
    server = fake_openai(lambda q, listed: gold_of.get(q, "no idea"), completions="echo")
    llm = make_backend("openai:fake-model", base_url=server.base_url, api_key="sk-x", cache_dir=tmp_path,
                       max_retries=0)
    assert not server.completion_requests  # building the cached backend asks nothing
    res = run_evaluation(ds, llm, ["zero_shot+cm_soft"], pref_count=8, n_test=8, seed=40, stratified=True,
                         n_boot=50)
    assert res["config"]["scoring"] == "score"
    assert res["run"]["llm_calls"]["extra"]["scoring"] == "completions-echo"
    assert res["results"]["zero_shot"]["accuracy"] == 1.0
    assert not server.requests[1:] and all("n" not in b for b in server.completion_requests)  # no generation
    n = len(server.completion_requests)
    again = run_evaluation(ds, llm, ["zero_shot+cm_soft"], pref_count=8, n_test=8, seed=40, stratified=True,
                           n_boot=50)
    assert again["predictions"] == res["predictions"] and len(server.completion_requests) == n
    llm.close()


def test_chat_only_server_falls_back_once_and_says_why(fake_openai, caplog):
    from cm_core.methods import ZeroShot
    server = fake_openai({"q1": "tunes"})
    llm = _llm(server)
    with caplog.at_level("WARNING"):
        preds = ZeroShot(llm, LABELS).predict(["q1"])
        ZeroShot(llm, LABELS).predict(["q1"])
    assert not llm.supports_scores and "HTTP 404" in llm.scoring_note
    assert preds[0].label == "tunes" and llm.stats.extra["scoring"] == "generation-fallback"
    said = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(said) == 1 and "HTTP 404" in said[0]
    assert len(server.completion_requests) == 1  # one probe: no completions endpoint, nothing more asked
    with pytest.raises(NotImplementedError):
        llm.score(_score_reqs(["q1"]))


def test_a_template_that_does_not_match_the_servers_is_not_used(fake_openai):
    server = fake_openai({"q1": "tunes"}, completions="echo", template_tokens_offset=3)
    llm = _llm(server)
    assert not llm.supports_scores and "--chat-template" in llm.scoring_note and "chatml" in llm.scoring_note
    server2 = fake_openai({"q1": "tunes"}, completions="echo", template_tokens_offset=3)
    llm2 = _llm(server2, chat_template="chatml")  # the user's word is checked too
    assert not llm2.supports_scores


def test_scoring_can_be_turned_off(fake_openai):
    server = fake_openai({"q1": "tunes"}, completions="echo")
    llm = _llm(server, scoring="off")
    assert not llm.supports_scores and "off" in llm.scoring_note and not server.completion_requests
    with pytest.raises(CMError, match="scoring"):
        _llm(server, scoring="maybe")


def test_a_bad_key_stops_the_detection(fake_openai):
    server = fake_openai(status=401, completions="echo")
    llm = _llm(server)
    with pytest.raises(BackendError, match="HTTP 401"):
        llm.supports_scores


def test_a_reply_without_logprobs_is_a_failed_query(fake_openai):
    from cm_core.methods import ZeroShot
    server = fake_openai({"q1": "tunes", "q2": "tunes"}, completions="echo")
    llm = _llm(server)
    assert llm.supports_scores
    server.completions = "prompt_logprobs"  # the server changed its mind: echo no longer gives log-probabilities
    preds = ZeroShot(llm, LABELS).predict(["q1", "q2"])
    assert [p.label for p in preds] == ["", ""] and "no echoed token log-probabilities" in preds[0].info["failed"]
    assert llm.stats.failed == 3  # the two queries and the content-free input (calibration)


# --------------------------------------------------------------------------- token alignment on real reply shapes

def test_candidate_tokens_are_found_as_servers_show_them():
    span = _Span("getting around", "<|im_end|>")
    # llama-cpp-python: special tokens shown as nothing; the label also appears earlier in the prompt; the echo
    # ends with the one generated token
    texts = ["", "system", "\n", "-", " getting", " around", "", "\n", "", "assistant", "\n", "getting", " around",
             "", "\n"]
    values = [None, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -0.5, -0.25, -0.125, -3.0]
    s = _candidate_score(texts, values, span)
    assert s.logprob == pytest.approx(-0.875) and s.n_tokens == 3
    # vLLM: special tokens shown as their text, no generated token
    texts = ["<|im_start|>", "assistant", "\n", "getting", " around", "<|im_end|>"]
    s = _candidate_score(texts, [None, -1, -1, -0.5, -0.25, -0.125], span)
    assert s.logprob == pytest.approx(-0.875) and s.n_tokens == 3
    with pytest.raises(ValueError, match="not among"):
        _candidate_score(texts, [None] * 6, _Span("travel", "<|im_end|>"))
    with pytest.raises(ValueError, match="missing"):
        _candidate_score(texts, [None, -1, -1, None, -0.25, -0.125], span)


def test_echo_one_token_off_is_recognized():
    from cm_core.backends.openai_backend import _echo_shifted
    tokens = ["system", "\n", "You", " label", "", "\n", "", "ass", "istant", "\n", "al", "arm", "", "\n"]
    # aligned: the likeliest token at a predictable position is the token there ("istant" after "ass")
    aligned = [None] + [{t: -0.1} for t in tokens[1:]]
    # one off (llama-cpp-python without a BOS token): each position shows the distribution of the next one
    shifted = [None] + [{t: -0.1} for t in tokens[2:]] + [{"x": -0.1}]
    reply = lambda tops: {"choices": [{"index": 0, "logprobs": {"tokens": tokens, "top_logprobs": tops}}]}
    assert not _echo_shifted(reply(aligned)) and _echo_shifted(reply(shifted))


def test_chat_templates():
    msgs = prompts.zero_shot("wake me up", None)
    chatml = BUILTIN_TEMPLATES["chatml"]
    prompt, span = chatml.scoring_prompt(msgs, "alarm")
    assert prompt == (f"<|im_start|>system\n{msgs[0]['content']}<|im_end|>\n<|im_start|>user\n{msgs[1]['content']}"
                      "<|im_end|>\n<|im_start|>assistant\nalarm<|im_end|>") and span.end == "<|im_end|>"
    llama3 = BUILTIN_TEMPLATES["llama3"].scoring_prompt(msgs, "alarm")[0]
    assert llama3.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nalarm<|eot_id|>")
    with pytest.raises(CMError, match="unknown chat template"):
        load_template("chatmlx")


def test_a_jinja_template_file_renders_as_the_embedded_tokenizer_does(tmp_path):
    # SmolLM2's own template (the embedded model's), as a file
    path = tmp_path / "smollm2.jinja"
    path.write_text("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")
    template = load_template(str(path))
    msgs = prompts.zero_shot("wake me up", LABELS)
    prompt, span = template.scoring_prompt(msgs, "alarm")
    assert prompt == BUILTIN_TEMPLATES["chatml"].scoring_prompt(msgs, "alarm")[0] + "\n"
    assert span.end == "<|im_end|>\n"  # the first token after the reply (the end of turn) is the one scored


# --------------------------------------------------------------------------- honest votes

def test_votes_from_a_server_that_ignores_n_use_distinct_seeds(fake_openai):
    server = fake_openai({"q": "tunes"}, max_choices=1)
    assert _llm(server).generate([_req("q", n=5, temperature=0.7, seed=40)]) == [["tunes"] * 5]
    assert [(r["n"], r["seed"]) for r in server.requests] == [(5, 40), (4, 41), (3, 42), (2, 43), (1, 44)]


# --------------------------------------------------------------------------- answers in several lines

@pytest.mark.parametrize("reply,labels,expected", [
    ("The label is:\n- getting around", ["getting around", "travel"], ("getting around", True)),
    ("Label:\n\ntravel", ["getting around", "travel"], ("travel", True)),
    ("**Label:** Travel", ["travel"], ("travel", True)),
    ("Sure! Here is the label for your query.\n\nLabel: alarm", ["alarm", "audio"], ("alarm", True)),
    ("1. music\n2. audio", ["music", "audio"], ("music", True)),
    ("I cannot tell.\nIt could be many things.", ["music", "audio"], ("i cannot tell", False)),
    # as SmolLM2 answers through llama.cpp's server (sampled at 0.7, the labels listed)
    ('The label "weather" is the most likely label for the given query.', ["weather", "news"], ("weather", True)),
    ("The label is: alarm\n\nExplanation: the query asks to be woken up.", ["alarm", "datetime"], ("alarm", True)),
])
def test_multi_line_replies_are_matched(reply, labels, expected):
    from cm_core.methods import match_label
    assert match_label(reply, labels) == expected
