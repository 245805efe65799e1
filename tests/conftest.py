"""Shared fixtures: the datasets folder beside the repository, the embedded LLM (loaded once per session),
a fake OpenAI-compatible server, and a table-driven fake method."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from cm_core.data import PAPER_DATASETS, data_dir as paper_data_dir  # noqa: E402
from cm_core.methods import Method, Prediction  # noqa: E402

from fake_openai import FakeOpenAIServer  # noqa: E402

def pytest_report_header(config):
    return f"datasets: {paper_data_dir()}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    missing = [n for n in PAPER_DATASETS if not (paper_data_dir() / n / "small.jsonl").is_file()]
    if missing:
        pytest.fail(f"datasets missing under {paper_data_dir()}: {missing}")
    return paper_data_dir()


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    """Test traffic stays on 127.0.0.1 even where a proxy is configured."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# --------------------------------------------------------------------------- the embedded LLM

@pytest.fixture(scope="session")
def embedded_llm(tmp_path_factory):
    """SmolLM2-135M-Instruct wrapped in a response cache under a session tmp dir (weights: CM_MODEL_DIR or
    ~/.cache/cm-personalize/models, materialized once)."""
    from cm_core import make_backend
    llm = make_backend("embedded", cache_dir=tmp_path_factory.mktemp("embedded_cache"))
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def embedded_raw(embedded_llm):
    """The uncached TransformersLLM inside the cache wrapper (for naive_score)."""
    return embedded_llm.inner


# --------------------------------------------------------------------------- fake OpenAI server

@pytest.fixture
def fake_openai():
    """Factory: ``fake_openai(responder, status=...)`` starts a server; all are stopped after the test."""
    servers: list[FakeOpenAIServer] = []

    def start(responder=None, **kw) -> FakeOpenAIServer:
        s = FakeOpenAIServer(responder, **kw).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


# --------------------------------------------------------------------------- a deterministic fake method

class TableMethod(Method):
    """Answers from a table; records every call. With candidates, answers ``choices[text]`` when it is among
    them, else the first candidate. ``probs`` optionally gives p(y|x) per text."""

    name = "table"

    def __init__(self, labels, answers: dict, choices: dict | None = None, probs: dict | None = None):
        self.labels = list(labels)
        self.answers, self.choices, self.probs = dict(answers), dict(choices or {}), dict(probs or {})
        self.calls: list[tuple[list[str], list[list[str]] | None]] = []
        self.fitted_on: list | None = None

    def fit(self, samples):
        self.fitted_on = list(samples)
        return self

    def predict(self, texts, candidates=None):
        texts = list(texts)
        self.calls.append((texts, None if candidates is None else [list(c) for c in candidates]))
        out = []
        for i, t in enumerate(texts):
            if candidates is None:
                out.append(Prediction(self.answers[t], self.probs.get(t)))
            else:
                cands = list(candidates[i])
                want = self.choices.get(t)
                out.append(Prediction(want if want in cands else cands[0], {c: 1.0 / len(cands) for c in cands}))
        return out


@pytest.fixture
def table_method():
    return TableMethod
