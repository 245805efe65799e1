"""The demo under load: N concurrent sessions (threads, one gradio_client each) on 127.0.0.1, each uploading its own
samples with its own label set, building its own memory bank on an OpenAI-compatible backend (the fake server)
and asking two queries. Every session must get its own, correct answers; no session may see another's labels in
its bank, its tables or its answers. Latency percentiles per operation are printed (``pytest -s``) and written
to ``<tmp_path>/demo_load_latency.json``.

CM_LOAD_SESSIONS (default 20) sets N; the demo's own queue settings (CM_DEMO_CONCURRENCY, default 4) apply.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from demo.testing import free_port  # noqa: E402

from conftest import REPO  # noqa: E402

N_SESSIONS = int(os.environ.get("CM_LOAD_SESSIONS", "20"))
BUDGET_S = 240  # all sessions together, from the first request to the last answer
KEY = "sk-load-" + "Lq2" * 8

pytestmark = [pytest.mark.load, pytest.mark.timeout(BUDGET_S + 120)]

TOPICS = {  # label stem -> the texts of one session (the session tag is added to texts and labels)
    "bills": ["pay the electricity bill", "how much is in savings", "send money to alex"],
    "pets": ["book the dog at the vet", "order more cat food", "the puppy needs its jabs"],
    "repairs": ["the kitchen tap drips", "find a plumber", "patch the hole in the wall"],
}
QUERIES = {"pets": "my cat is sick again", "bills": "pay the water bill today"}


def session_data(i: int) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
    """Labels, rows and the two queries (query -> expected CM answer) of session i; all tagged with i."""
    tag = f"{i:02d}"
    labels = [f"{stem}-{tag}" for stem in TOPICS]
    rows = [(f"{text} (session {tag})", f"{stem}-{tag}") for stem, texts in TOPICS.items() for text in texts]
    queries = {f"{q} (session {tag})": f"{stem}-{tag}" for stem, q in QUERIES.items()}
    return labels, rows, queries


def make_responder(n: int):
    """The fake model files pet questions under repairs, unless asked among two candidates (CM's re-ask)."""
    truth = {}
    for i in range(n):
        _, rows, queries = session_data(i)
        truth.update(rows)
        truth.update(queries)

    def respond(query, listed):
        gold = truth.get(query)
        if gold is None:
            return "no idea"
        if gold.startswith("pets-") and len(listed) != 2:
            return gold.replace("pets-", "repairs-")
        return gold
    return respond


def percentiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}

    def q(p):  # nearest-rank percentile
        return v[min(len(v) - 1, max(0, int(round(p * len(v) + 0.5)) - 1))]
    return {"n": len(v), "p50": round(q(0.50), 3), "p90": round(q(0.90), 3), "max": round(v[-1], 3),
            "mean": round(sum(v) / len(v), 3)}


def tags_in(obj) -> set[str]:
    """Session tags (the NN of 'label-NN' / '(session NN)') anywhere in a returned value."""
    text = json.dumps(obj, default=str) if not isinstance(obj, str) else obj
    return set(re.findall(r"(?:bills|pets|repairs)-(\d\d)\b", text)) | set(re.findall(r"session (\d\d)\b", text))


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """The demo as deployed (``python demo/app.py``), in its own process: the clients' threads in this process do
    not share the server's interpreter lock, so the latencies are the server's."""
    tmp = tmp_path_factory.mktemp("load")
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "CM_DEMO_CACHE_DIR": str(tmp / "cache"), "GRADIO_TEMP_DIR": str(tmp / "gradio"),
           "CM_DEMO_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "CM_DEMO_ALLOW_PRIVATE_URLS": "1"}  # the fake OpenAI server listens on 127.0.0.1
    env.pop("OPENAI_API_KEY", None)
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "demo" / "app.py")], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    u = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(u + "config", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the demo did not start:\n" + (tmp / "server.log").read_text()[-3000:])
                time.sleep(0.3)
        yield u
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def test_concurrent_sessions_keep_their_own_banks(url, fake_openai, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = fake_openai(make_responder(N_SESSIONS + 1))
    backend = ("openai", "fake-model", server.base_url, KEY)
    latencies: dict[str, list[float]] = {"connect": [], "load_samples": [], "build_bank": [], "ask": [],
                                         "session": []}
    problems: list[str] = []
    done: dict[int, dict] = {}
    lock = threading.Lock()
    cold: dict[str, list[float]] = {op: [] for op in latencies}
    start_gate = threading.Barrier(N_SESSIONS)

    def session(i: int, warmup: bool = False):
        tag = f"{i:02d}"
        labels, rows, queries = session_data(i)
        path = tmp_path / f"samples_{tag}.csv"
        path.write_text("utterance,my_label\n" + "".join(f'"{t}",{y}\n' for t, y in rows), encoding="utf-8")
        record = cold if warmup else latencies

        def timed(op, fn, *args, **kw):
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            with lock:
                record[op].append(time.perf_counter() - t0)
            return out

        try:
            if not warmup:
                start_gate.wait(timeout=60)
            t_session = time.perf_counter()
            c = timed("connect", Client, url, verbose=False)
            tcol, lcol, status, preview = timed("load_samples", c.predict, handle_file(str(path)), "",
                                                api_name="/load_samples")
            assert (tcol["value"], lcol["value"]) == ("utterance", "my_label"), (tcol, lcol)
            table, _plot, bank_dl, _held, bank_status = timed("build_bank", c.predict, "utterance", "my_label",
                                                              *backend, "zero_shot", 1.0, 0.7, "",
                                                              api_name="/build_bank")
            bank = json.loads(Path(bank_dl).read_text(encoding="utf-8"))
            answers = {}
            for q, want in queries.items():
                base, cm, why, cands, scores, all_methods = timed("ask", c.predict, q, *backend, api_name="/ask")
                answers[q] = {"base": base, "cm": cm, "why": why, "want": want, "tables": [cands, scores, all_methods]}
            with lock:
                record["session"].append(time.perf_counter() - t_session)
            if warmup:
                return
            done[i] = {"status": status, "table": table, "bank": bank, "bank_status": bank_status,
                       "answers": answers, "labels": labels, "preview": preview}
        except Exception as e:  # reported below, with the session number
            with lock:
                problems.append(f"session {tag}: {type(e).__name__}: {e}")

    # One session first, alone: the server's cold start (first OpenAI client, the sentence embedder for the kNN /
    # logistic-regression rows) is reported apart from the concurrent burst.
    session(N_SESSIONS, warmup=True)
    assert not problems, problems
    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(N_SESSIONS)]
    t_all = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, BUDGET_S - (time.perf_counter() - t_all)))
    wall = time.perf_counter() - t_all
    hung = [i for i, t in enumerate(threads) if t.is_alive()]

    # ------------------------------------------------------------------ every session got its own right answers
    for i, r in sorted(done.items()):
        tag = f"{i:02d}"
        own = set(r["labels"])
        counts = r["bank"]["counts"]
        bank_labels = {lab for row in counts.values() for lab in row}
        if bank_labels != own or not set(counts) <= own:
            problems.append(f"session {tag}: bank labels {sorted(bank_labels)} / answers {sorted(counts)}")
        if counts.get(f"repairs-{tag}") != {f"repairs-{tag}": 3, f"pets-{tag}": 3}:
            problems.append(f"session {tag}: unexpected bank {counts}")
        for q, a in r["answers"].items():
            if a["cm"] != a["want"]:
                problems.append(f"session {tag}: {q!r} -> CM {a['cm']!r}, expected {a['want']!r}")
            if a["want"].startswith("pets-") and not (a["base"] == f"repairs-{tag}" and a["why"].startswith("choose")):
                problems.append(f"session {tag}: {q!r} base {a['base']!r} / {a['why'][:40]!r}")
        foreign = tags_in([r["status"], r["table"], r["bank"], r["bank_status"], r["answers"], r["preview"]]) - {tag}
        if foreign:
            problems.append(f"session {tag} saw other sessions' data: {sorted(foreign)}")

    stats = {op: percentiles(v) for op, v in latencies.items()}
    report = {"cold_start_session_s": {op: round(v[0], 3) for op, v in cold.items() if v and op != "ask"},
              "sessions": N_SESSIONS, "completed": len(done), "lost": N_SESSIONS - len(done), "hung": hung,
              "wall_s": round(wall, 2), "server_requests": len(server.requests),
              "concurrency_limit": int(os.environ.get("CM_DEMO_CONCURRENCY", "4")), "latency_s": stats,
              "problems": problems[:50]}
    out = tmp_path / "demo_load_latency.json"
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"\ndemo load: {N_SESSIONS} concurrent sessions, {len(done)} completed, {report['lost']} lost, "
          f"wall {wall:.1f} s, {len(server.requests)} LLM requests (queue concurrency {report['concurrency_limit']})")
    print("  cold start (one session alone, before the burst): "
          + ", ".join(f"{op} {v:.2f} s" for op, v in report["cold_start_session_s"].items()))
    for op, s in stats.items():
        if s:
            print(f"  {op:13s} n={s['n']:3d}  p50={s['p50']:7.3f} s  p90={s['p90']:7.3f} s  max={s['max']:7.3f} s")
    print(f"  written to {out}")

    assert not hung, f"sessions still running after {BUDGET_S} s: {hung}"
    assert not problems, "\n".join(problems)
    assert len(done) == N_SESSIONS and report["lost"] == 0
    assert set(server.auth_headers) == {f"Bearer {KEY}"}
