"""The persistent response cache: hits, keys, de-duplication, resuming after an interruption, no secrets on disk."""
from __future__ import annotations

import hashlib
import sqlite3

import pytest

from cm_core.backends import make_backend
from cm_core.backends.base import LLM, CandidateScore, GenRequest, ScoreRequest
from cm_core.backends.cache import CachedLLM, ResponseCache, request_key


class Interrupted(RuntimeError):
    pass


class CountingLLM(LLM):
    """Deterministic answers from the request; counts backend requests; can fail after ``fail_after`` of them."""

    kind = "fake"
    supports_scores = True

    def __init__(self, model="fake-1", revision="r1", fail_after: int | None = None):
        super().__init__(model)
        self.revision, self.fail_after = revision, fail_after
        self.requests = 0
        self.seen: list = []

    def identity(self):
        return {"kind": self.kind, "model": self.model, "revision": self.revision}

    def _tick(self, req):
        if self.fail_after is not None and self.requests >= self.fail_after:
            raise Interrupted(f"backend died after {self.requests} requests")
        self.requests += 1
        self.seen.append(req)

    def generate(self, requests):
        self.stats.generate_calls += len(requests)
        out = []
        for r in requests:
            self._tick(r)
            h = hashlib.md5(repr((self.model, self.revision, r)).encode()).hexdigest()[:8]
            out.append([f"{h}-{i}" for i in range(r.n)])
        return out

    def score(self, requests):
        self.stats.score_calls += len(requests)
        out = []
        for r in requests:
            self._tick(r)
            out.append([CandidateScore(-float(len(c)) - 0.25 * i, len(c.split())) for i, c in enumerate(r.candidates)])
        return out


def _gen(q: str, **kw) -> GenRequest:
    return GenRequest.of([{"role": "user", "content": q}], **kw)


def test_second_identical_call_is_a_hit(tmp_path):
    inner = CountingLLM()
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    reqs = [_gen("hello", n=2, temperature=0.7), _gen("world")]
    first = llm.generate(reqs)
    assert inner.requests == 2 and llm.stats.cache_hits == 0
    second = llm.generate(reqs)
    assert second == first and len(first[0]) == 2
    assert inner.requests == 2 and llm.stats.cache_hits == 2
    assert llm.stats is inner.stats and inner.stats.generate_calls == 2  # misses only reach the backend


def test_scores_round_trip_through_the_cache(tmp_path):
    inner = CountingLLM()
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    req = ScoreRequest.of([{"role": "user", "content": "q"}], ["a b", "ccc"])
    fresh = llm.score([req])
    cached = llm.score([req])
    assert fresh == cached == [[CandidateScore(-3.0, 2), CandidateScore(-3.25, 1)]]
    assert inner.requests == 1
    assert isinstance(cached[0][0], CandidateScore) and cached[0][1].mean == -3.25


def test_duplicates_in_one_batch_are_computed_once(tmp_path):
    inner = CountingLLM()
    llm = CachedLLM(inner, tmp_path / "c.sqlite", chunk_size=2)
    reqs = [_gen("a"), _gen("b"), _gen("a"), _gen("c"), _gen("b")]
    out = llm.generate(reqs)
    assert inner.requests == 3
    assert out[0] == out[2] and out[1] == out[4] and out[0] != out[1]


@pytest.mark.parametrize("change", [dict(temperature=0.9), dict(seed=1), dict(n=3), dict(top_p=0.5),
                                    dict(max_tokens=10)])
def test_decoding_settings_change_the_key(tmp_path, change):
    inner = CountingLLM()
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    base = dict(n=1, temperature=0.7, top_p=0.9, max_tokens=60, seed=0)
    llm.generate([_gen("hello", **base)])
    llm.generate([_gen("hello", **{**base, **change})])
    assert inner.requests == 2 and llm.stats.cache_hits == 0
    ident = inner.identity()
    assert request_key(ident, _gen("hello", **base).key()) != request_key(ident, _gen("hello", **{**base, **change}).key())


def test_prompt_and_candidates_change_the_key(tmp_path):
    inner = CountingLLM()
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    msgs = [{"role": "user", "content": "q"}]
    llm.score([ScoreRequest.of(msgs, ["a", "b"])])
    llm.score([ScoreRequest.of(msgs, ["b", "a"])])  # order matters: scores come back in candidate order
    llm.score([ScoreRequest.of([{"role": "system", "content": "q"}], ["a", "b"])])
    llm.generate([GenRequest.of(msgs)])
    assert inner.requests == 4


def test_model_identity_changes_the_key(tmp_path):
    path = tmp_path / "shared.sqlite"
    a = CountingLLM(model="fake-1")
    out_a = CachedLLM(a, path).generate([_gen("hello")])
    for other in (CountingLLM(model="fake-2"), CountingLLM(model="fake-1", revision="r2")):
        out_o = CachedLLM(other, path).generate([_gen("hello")])
        assert other.requests == 1, "another model must not be served this model's answers"
        assert out_o != out_a
    same = CountingLLM(model="fake-1")
    assert CachedLLM(same, path).generate([_gen("hello")]) == out_a and same.requests == 0


def test_resume_after_interruption(tmp_path):
    reqs = [_gen(f"query {i}", n=2, temperature=0.7, seed=i) for i in range(20)]
    reference = CachedLLM(CountingLLM(), tmp_path / "uninterrupted.sqlite").generate(reqs)

    path = tmp_path / "run.sqlite"
    dying = CountingLLM(fail_after=10)
    llm = CachedLLM(dying, path, chunk_size=4)
    with pytest.raises(Interrupted):
        llm.generate(reqs)
    llm.close()
    saved = len(ResponseCache(path))
    assert saved == 8  # two whole chunks of 4 were committed before the backend died in the third

    healthy = CountingLLM()
    resumed = CachedLLM(healthy, path, chunk_size=4)
    out = resumed.generate(reqs)
    assert healthy.requests == len(reqs) - saved
    assert healthy.seen == reqs[saved:]  # exactly the ones not finished before
    assert out == reference
    assert resumed.stats.cache_hits == saved
    again = CountingLLM()
    assert CachedLLM(again, path).generate(reqs) == reference and again.requests == 0


def test_cache_survives_reopening(tmp_path):
    path = tmp_path / "nested" / "dir" / "c.sqlite"  # parents are created
    llm = CachedLLM(CountingLLM(), path)
    out = llm.generate([_gen("persist me")])
    llm.close()
    inner = CountingLLM()
    assert CachedLLM(inner, ResponseCache(path)).generate([_gen("persist me")]) == out
    assert inner.requests == 0


def _all_bytes(folder) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_api_key_never_written_to_the_cache(tmp_path, fake_openai):
    key = "sk-live-" + "Zq7" * 12
    server = fake_openai({"hello": "weather"})
    llm = make_backend("openai:fake-model", cache_dir=tmp_path / "cache", base_url=server.base_url, api_key=key,
                       max_retries=0)
    assert isinstance(llm, CachedLLM)
    out = llm.generate([GenRequest.of([{"role": "user", "content": "Query: hello\nLabel:"}], n=2)])
    assert out == [["weather", "weather"]]
    assert server.auth_headers == [f"Bearer {key}"]  # the key did reach the server...
    assert key not in repr(llm.identity()) and "Zq7Zq7" not in repr(llm.identity())
    db = tmp_path / "cache" / "responses.sqlite"
    rows = sqlite3.connect(str(db)).execute("SELECT key, value FROM responses").fetchall()
    assert len(rows) == 1 and rows[0][1] == '["weather", "weather"]'
    llm.close()
    data = _all_bytes(tmp_path / "cache")  # the database and any WAL/journal beside it
    assert data and key.encode() not in data and b"Zq7Zq7" not in data  # ...but never reached the disk
    # a second client with another key shares the cached answer: the key is not part of the identity
    other = make_backend("openai:fake-model", cache_dir=tmp_path / "cache", base_url=server.base_url,
                         api_key="sk-other-key-123456", max_retries=0)
    assert other.generate([GenRequest.of([{"role": "user", "content": "Query: hello\nLabel:"}], n=2)]) == out
    assert len(server.requests) == 1
    other.close()
