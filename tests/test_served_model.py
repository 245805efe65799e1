"""Against a real OpenAI-compatible server: llama.cpp's server (llama-cpp-python[server], requirements-server.txt)
serving the very GGUF the project embeds, started here on 127.0.0.1 and stopped after the module.

It checks what the fake server cannot: that our backend detects what a real server offers (log-probabilities of a
prompt's tokens through ``/v1/completions`` with ``echo``), that the chat template it renders for that endpoint is
the server's, and that labels scored through the server agree with the in-process embedded backend on the same
queries (the same weights: the served path must not lose the calibrated scoring). Then the CLI and the demo's
backend run against it. Skipped, with the reason, where llama-cpp-python is not installed (``bash .ci/run``
installs it).

The server command (the README's): ``python -m llama_cpp.server --model <embedded GGUF> --model_alias smollm2
--chat_format chatml --host 127.0.0.1 --port PORT`` (it keeps log-probabilities: ``--logits_all`` is on by default).
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
    pytest.skip("llama-cpp-python[server] is not installed (bash .ci/run builds it; see requirements-server.txt): "
                "no real llama.cpp server to test against", allow_module_level=True)

from cm_core.backends import make_backend  # noqa: E402
from cm_core.backends.hf import embedded_gguf_path  # noqa: E402
from cm_core.data import load_dataset, split_dataset  # noqa: E402
from cm_core.methods import Decoding, ZeroShot  # noqa: E402

# a slow CPU server: each test may take minutes where other work shares the 2 cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[1]
ALIAS = "smollm2"
# llama-cpp-python's echo costs ~25 ms per prompt token on 2 cores (it sorts the vocabulary at every position), about
# 1.5 s per candidate: the comparison scores N_QUERIES queries among N_LABELS labels (plus their calibration)
N_QUERIES, N_LABELS = 20, 5
AGREEMENT = 0.95


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The llama.cpp server on a free local port; its log is shown if it does not come up."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()), "--model_alias", ALIAS,
           "--chat_format", "chatml", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
           "--n_threads", str(min(4, os.cpu_count() or 1))]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the llama.cpp server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if ALIAS in r.read().decode():
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the llama.cpp server did not come up in 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def queries():
    """massive_scenario test rows (the issue's split) and the labels most of them have."""
    ds = load_dataset("massive_scenario")
    test = split_dataset(ds, pref_fraction=0.02, n_test=N_QUERIES, seed=40).test
    common = [lab for lab, _ in Counter(test.targets).most_common()] + ds.labels
    return list(dict.fromkeys(common))[:N_LABELS], test.texts


def _served(server, tmp_path, **kw):
    return make_backend(f"openai:{ALIAS}", base_url=server, cache_dir=tmp_path, api_key="EMPTY", timeout=120, **kw)


def test_the_server_is_asked_for_log_probabilities(server, tmp_path):
    llm = _served(server, tmp_path)
    assert llm.supports_scores, llm.scoring_note
    assert llm.inner.scoring == "completions-echo"
    assert "chatml chat template, checked against the server's" in llm.scoring_note  # found, not given
    assert llm.identity() == {"kind": "openai", "model": ALIAS, "base_url": server}
    llm.close()


def test_served_scores_agree_with_the_embedded_model(server, queries, embedded_llm, tmp_path):
    labels, texts = queries
    served = _served(server, tmp_path, concurrency=4)
    dec = Decoding()  # the default: calibrated, length-normalized scores
    here = ZeroShot(embedded_llm, labels, dec).predict(texts)
    there = ZeroShot(served, labels, dec).predict(texts)
    assert served.stats.extra["scoring"] == "completions-echo" and served.stats.failed == 0
    agree = np.mean([a.label == b.label for a, b in zip(here, there)])
    gap = np.abs(np.array([a.info["scores"] for a in here]) - np.array([b.info["scores"] for b in there]))
    print(f"\nserved vs embedded on {len(texts)} queries x {len(labels)} labels: argmax agreement {agree:.1%}, "
          f"calibrated mean log-prob gap median {np.median(gap):.3f} max {gap.max():.3f} nats")
    assert agree >= AGREEMENT
    assert np.median(gap) < 0.3  # the same weights (fp32 in process, Q4_1 served): small numeric differences
    served.close()


def test_cli_evaluates_through_the_server(server, tmp_path):
    """The CLI's evaluation on a small labelled file (3 labels): every label is scored through the server."""
    rows = [(f"wake me up at {h} am", "alarm") for h in range(5, 11)] + \
           [(f"will it rain in city number {i} tomorrow", "weather") for i in range(6)] + \
           [(f"play some song number {i} by the band", "music") for i in range(6)]
    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "cm_core", "evaluate", "--dataset", str(data), "--model", f"openai:{ALIAS}",
           "--base-url", server, "--methods", "zero_shot,zero_shot+cm_soft", "--pref-count", "6", "--stratified",
           "--n-test", "6", "--seed", "40", "--cache-dir", str(tmp_path / "cache"), "--output", str(out)]
    env = {**os.environ, "OPENAI_API_KEY": "EMPTY", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"]["scoring"] == "score"
    assert res["run"]["llm_calls"]["extra"]["scoring"] == "completions-echo"
    assert res["run"]["llm_calls"]["generate_calls"] == 0  # no label was asked for in text
    assert "falls back" not in done.stderr


def test_the_demos_backend_scores_through_the_server(server, queries, monkeypatch, tmp_path):
    from demo import deploy
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")  # the demo refuses local addresses unless told
    monkeypatch.setenv("CM_CACHE_DIR", str(tmp_path))
    labels, texts = queries
    with deploy.backend_for("openai", ALIAS, server, None) as llm:
        preds = ZeroShot(llm, labels[:3]).predict(texts[:2])
        assert llm.supports_scores and llm.stats.extra["scoring"] == "completions-echo"
    assert all(p.label in labels[:3] and p.probs for p in preds)
