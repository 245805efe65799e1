"""The Gradio demo, driven through its named API endpoints with gradio_client against an in-process server.

The server runs on 127.0.0.1 with a response cache under pytest's tmp dir (shared with test_demo_browser.py in
one run, so the browser test reuses the model's answers). The embedded model runs on CPU: the sample files are
kept small.
"""
from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from demo import app  # noqa: E402
from demo.testing import EXAMPLE_SAMPLES, EXAMPLE_TEST, serve  # noqa: E402

pytestmark = pytest.mark.timeout(1500)

EXAMPLE_LABELS = {"wake-up buzz", "sky report", "tunes", "grub", "headlines", "plans", "getting around",
                  "house stuff"}
B_LABELS = {"money stuff", "pet care", "fix-it"}
B_ROWS = [("pay my electricity bill", "money stuff"), ("how much is in my savings account", "money stuff"),
          ("transfer fifty pounds to alex", "money stuff"), ("book the dog in at the vet", "pet care"),
          ("order more cat food", "pet care"), ("when should the puppy get its jabs", "pet care"),
          ("the kitchen tap is dripping", "fix-it"), ("find a plumber for the boiler", "fix-it"),
          ("how do I patch a hole in the wall", "fix-it")]
EMBEDDED = ("embedded", "", "", "")  # backend, model, base_url, api_key


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "demo-cache"
    with serve(cache) as u:
        yield u


def client(url) -> Client:
    return Client(url, verbose=False)


def _bank_of(download_path) -> dict:
    with open(download_path, encoding="utf-8") as f:
        return json.load(f)


def _bank_labels(bank: dict) -> set[str]:
    return {lab for row in bank["counts"].values() for lab in row}


def _rows(table: dict) -> list[dict]:
    return [dict(zip(table["headers"], r)) for r in table["data"]]


# --------------------------------------------------------------------------- API surface

def test_named_endpoints(url):
    api = client(url).view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/load_samples", "/use_example", "/build_bank", "/upload_bank", "/ask", "/evaluate",
                 "/example_test"):
        assert name in api, name
    build = [p["parameter_name"] for p in api["/build_bank"]["parameters"]]
    assert build == ["text_col", "label_col", "backend", "model", "base_url", "api_key", "method", "pref_fraction",
                     "temperature"]


# --------------------------------------------------------------------------- two users at once

def test_two_sessions_build_and_keep_their_own_banks(url, tmp_path):
    a, b, c = client(url), client(url), client(url)
    # A: the built-in example (CSV, columns id/utterance/my_label); B: a JSONL with other names and other labels.
    tcol, lcol, status, preview, test_path = a.predict(api_name="/use_example")
    assert (tcol["value"], lcol["value"]) == ("utterance", "my_label")
    assert "60 rows" in status and test_path.endswith(".csv")
    b_file = tmp_path / "b.jsonl"
    b_file.write_text("\n".join(json.dumps({"message": t, "tag": y}) for t, y in B_ROWS) + "\n", encoding="utf-8")
    tcol_b, lcol_b, status_b, _ = b.predict(handle_file(str(b_file)), "", api_name="/load_samples")
    assert (tcol_b["value"], lcol_b["value"]) == ("message", "tag")

    results, errors = {}, []

    def build(name, cl, cols, fraction):
        try:
            results[name] = cl.predict(*cols, *EMBEDDED, "zero_shot", fraction, 0.7, api_name="/build_bank")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(f"{name}: {e!r}")

    threads = [threading.Thread(target=build, args=("a", a, ("utterance", "my_label"), 0.2)),
               threading.Thread(target=build, args=("b", b, ("message", "tag"), 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    table_a, _plot_a, dl_a, status_a = results["a"]
    table_b, _plot_b, dl_b, status_b = results["b"]
    assert "Memory bank built" in status_a and "16 samples" in status_a
    assert "Memory bank built" in status_b and "9 samples" in status_b
    bank_a, bank_b = _bank_of(dl_a), _bank_of(dl_b)
    assert bank_a["format"] == "cm-memory-bank" and bank_a["meta"]["n_samples"] == 16
    assert _bank_labels(bank_a) <= EXAMPLE_LABELS and _bank_labels(bank_b) == B_LABELS
    assert set(bank_a["counts"]) <= EXAMPLE_LABELS and set(bank_b["counts"]) <= B_LABELS  # answers among own labels
    assert {r["your label"] for r in _rows(table_a)} == _bank_labels(bank_a)

    # Each session answers in its own labels, with its own bank; a third session has no bank at all.
    base_a, cm_a, why_a, cands_a, scores_a, all_a = a.predict("set a timer for the pasta", *EMBEDDED,
                                                             api_name="/ask")
    base_b, cm_b, why_b, _, scores_b, all_b = b.predict("my cat is sick", *EMBEDDED, api_name="/ask")
    assert base_a in EXAMPLE_LABELS and cm_a in EXAMPLE_LABELS
    assert base_b in B_LABELS and cm_b in B_LABELS
    assert {r["label"] for r in _rows(scores_a)} == EXAMPLE_LABELS
    assert {r["label"] for r in _rows(scores_b)} == B_LABELS
    assert why_a.split(":")[0] in ("keep", "map", "choose")
    methods_a = [r["method"] for r in _rows(all_a)]
    assert any(m.startswith("knn") for m in methods_a) and any(m.startswith("logreg") for m in methods_a)
    with pytest.raises(AppError, match="Build a memory bank first"):
        c.predict("set a timer for the pasta", *EMBEDDED, api_name="/ask")

    # B loading new samples resets B only; A's bank is untouched.
    b.predict(api_name="/use_example")
    with pytest.raises(AppError, match="Build a memory bank first"):
        b.predict("my cat is sick", *EMBEDDED, api_name="/ask")
    assert a.predict("set a timer for the pasta", *EMBEDDED, api_name="/ask")[1] == cm_a

    # Batch evaluation in session A on a few labelled rows: four methods, CIs, p-value, per-row CSV.
    lines = EXAMPLE_TEST.read_text(encoding="utf-8").splitlines()
    small_test = tmp_path / "test.csv"
    small_test.write_text("\n".join([lines[0]] + lines[1::5]) + "\n", encoding="utf-8")  # 8 rows, one per label
    table, summary, csv_path = a.predict(handle_file(str(small_test)), "utterance", "my_label", *EMBEDDED,
                                         api_name="/evaluate")
    rows = _rows(table)
    assert len(rows) == 4 and rows[0]["method"].endswith("(baseline)") and "CM" in rows[1]["method"]
    for r in rows:
        assert 0 <= r["95% CI low"] <= r["accuracy"] <= r["95% CI high"] <= 1 and r["n"] == 8
    assert rows[0]["p vs baseline (McNemar)"] is None and 0 <= rows[1]["p vs baseline (McNemar)"] <= 1
    assert "8 rows" in summary
    with open(csv_path, encoding="utf-8") as f:
        per_row = f.read().splitlines()
    assert per_row[0].startswith("text,gold,baseline,cm,cm_action,knn,logreg") and len(per_row) == 9

    # The held-out rows (no test file): 44 rows of the example are outside A's 16 preference samples.
    # (Not run here: it would take minutes on CPU. The path is covered by test_held_out_rows_used_without_file.)


def test_held_out_rows_used_without_file(monkeypatch):
    """Without a test file the evaluation uses the held-out rows of the uploaded samples."""
    state = {"held": [["a", "x"], ["b", "y"]], "samples": [], "labels": ["x", "y"]}
    rows, source = app._read_test(None, None, None, state)
    assert [r.text for r in rows] == ["a", "b"] and source == "held-out rows"
    with pytest.raises(app.UserError, match="held out"):
        app._read_test(None, None, None, {"held": [], "labels": ["x", "y"]})


def test_openai_compatible_backend(url, tmp_path, fake_openai):
    """A fake OpenAI-compatible server that files pet questions under fix-it, unless asked among two labels."""
    truth = dict(B_ROWS)

    def responder(query, listed):
        if truth.get(query) == "pet care" or "cat" in query:
            return "pet care" if len(listed) == 2 else "fix-it"
        return truth.get(query, "money stuff")

    server = fake_openai(responder)
    key = "sk-fake-KEY-abcdef123456"
    c = client(url)
    b_file = tmp_path / "b.jsonl"
    b_file.write_text("\n".join(json.dumps({"message": t, "tag": y}) for t, y in B_ROWS) + "\n", encoding="utf-8")
    c.predict(handle_file(str(b_file)), "", api_name="/load_samples")
    backend = ("openai", "fake-model", server.base_url, key)
    table, _plot, dl, status = c.predict("message", "tag", *backend, "zero_shot", 1.0, 0.7, api_name="/build_bank")
    bank = _bank_of(dl)
    assert bank["counts"]["fix-it"] == {"fix-it": 3, "pet care": 3}
    assert bank["meta"]["model"]["kind"] == "openai" and key not in json.dumps(bank)
    assert all(h == f"Bearer {key}" for h in server.auth_headers)
    base, cm, why, cands, _scores, _all = c.predict("my cat is sick", *backend, api_name="/ask")
    assert (base, cm) == ("fix-it", "pet care") and why.startswith("choose")
    assert {r["candidate"] for r in _rows(cands)} == {"fix-it", "pet care"}


# --------------------------------------------------------------------------- bad input, and the app still works

def test_bad_inputs_give_clear_messages_and_app_keeps_working(url, tmp_path):
    c = client(url)
    with pytest.raises(AppError, match="Build a memory bank first"):
        c.predict("hello", *EMBEDDED, api_name="/ask")
    with pytest.raises(AppError, match="Load preference samples first"):
        c.predict("text", "label", *EMBEDDED, "zero_shot", 1.0, 0.7, api_name="/build_bank")

    bad = tmp_path / "latin1.csv"
    bad.write_bytes("text,label\ncafé crème,drinks\n".encode("latin-1"))
    with pytest.raises(AppError, match="not UTF-8"):
        c.predict(handle_file(str(bad)), "", api_name="/load_samples")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"\n\n")
    with pytest.raises(AppError, match="is empty"):
        c.predict(handle_file(str(empty)), "", api_name="/load_samples")
    one_col = tmp_path / "one.csv"
    one_col.write_text("text\nhello\nworld\n", encoding="utf-8")
    with pytest.raises(AppError, match="only the column"):
        c.predict(handle_file(str(one_col)), "", api_name="/load_samples")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', encoding="utf-8")
    _, _, status, _ = c.predict(handle_file(str(broken)), "", api_name="/load_samples")
    assert "malformed JSON" in status and "line 2" in status
    with pytest.raises(AppError, match="line 2: malformed JSON"):
        c.predict("text", "label", *EMBEDDED, "zero_shot", 1.0, 0.7, api_name="/build_bank")

    # A label missing on line 3: loading says so, building refuses with the line number.
    missing = tmp_path / "missing.csv"
    missing.write_text("text,label\nwake me at six,wake-up buzz\nis it raining,\nplay jazz,tunes\n", encoding="utf-8")
    _, _, status, _ = c.predict(handle_file(str(missing)), "", api_name="/load_samples")
    assert "line 3" in status and "label" in status
    with pytest.raises(AppError, match="line 3.*needs a label"):
        c.predict("text", "label", *EMBEDDED, "zero_shot", 1.0, 0.7, api_name="/build_bank")
    # Wrong columns, same column twice, a single label.
    with pytest.raises(AppError, match="not in missing.csv; its columns are: text, label"):
        c.predict("query", "label", *EMBEDDED, "zero_shot", 1.0, 0.7, api_name="/build_bank")
    with pytest.raises(AppError, match="must be different"):
        c.predict("text", "text", *EMBEDDED, "zero_shot", 1.0, 0.7, api_name="/build_bank")
    c.predict(None, "text,label\nhello,greeting\nhi there,greeting\n", api_name="/load_samples")
    with pytest.raises(AppError, match="Only one distinct label"):
        c.predict("text", "label", *EMBEDDED, "zero_shot", 1.0, 0.7, api_name="/build_bank")
    # A file over the size limit is refused by the server (max_file_size) before the app sees it.
    big = tmp_path / "big.csv"
    big.write_bytes(b"text,label\n" + b"x" * (6 * 1024 * 1024) + b",y\n")
    with pytest.raises(Exception):
        c.predict(handle_file(str(big)), "", api_name="/load_samples")

    # Banks: malformed, wrong version; then the paper's format works.
    bad_bank = tmp_path / "bank.json"
    bad_bank.write_text("{not json", encoding="utf-8")
    with pytest.raises(AppError, match="malformed JSON"):
        c.predict(handle_file(str(bad_bank)), "", "", api_name="/upload_bank")
    bad_bank.write_text(json.dumps({"format": "cm-memory-bank", "version": 99, "counts": {}}), encoding="utf-8")
    with pytest.raises(AppError, match="version 99"):
        c.predict(handle_file(str(bad_bank)), "", "", api_name="/upload_bank")

    # Backend errors: an OpenAI-compatible server that is not there (the key never shows), a model path that
    # does not exist, an unknown backend.
    secret = "sk-test-VERYSECRET-0123456789"
    c.predict(api_name="/use_example")
    with pytest.raises(AppError) as err:
        c.predict("utterance", "my_label", "openai", "gpt-test", f"http://127.0.0.1:{_closed_port()}/v1", secret,
                  "zero_shot", 0.1, 0.7, api_name="/build_bank")
    assert "cannot connect" in str(err.value) and secret not in str(err.value)
    with pytest.raises(AppError, match="could not load model"):
        c.predict("utterance", "my_label", "hf", str(tmp_path / "no-such-model"), "", "", "zero_shot", 0.1, 0.7,
                  api_name="/build_bank")
    with pytest.raises(AppError, match="needs a model name"):
        c.predict("utterance", "my_label", "openai", "", "", "", "zero_shot", 0.1, 0.7, api_name="/build_bank")
    with pytest.raises(AppError, match="base URL must start with http"):
        c.predict("utterance", "my_label", "openai", "gpt-test", "ftp://x", "", "zero_shot", 0.1, 0.7,
                  api_name="/build_bank")

    # After all that, the same session still works: a paper-format bank over the example's samples, then a query.
    paper = {"grub": ["grub", "wake-up buzz"], "tunes": ["tunes", "headlines"], "sky report": ["sky report"],
             "wake-up buzz": ["wake-up buzz"]}
    bank_file = tmp_path / "paper_bank.json"
    bank_file.write_text(json.dumps(paper), encoding="utf-8")
    table, _plot, dl, status = c.predict(handle_file(str(bank_file)), "utterance", "my_label",
                                         api_name="/upload_bank")
    assert "loaded from paper\\_bank\\.json" in status
    assert len(_rows(table)) == 6 and _bank_of(dl)["meta"] == {"imported_from": "paper-format"}
    base, cm, why, cands, scores, all_methods = c.predict("play the morning news podcast", *EMBEDDED,
                                                          api_name="/ask")
    assert base in EXAMPLE_LABELS and cm in EXAMPLE_LABELS
    if base == "tunes":
        assert why.startswith("choose") and {r["candidate"] for r in _rows(cands)} == {"tunes", "headlines"}
    assert len(_rows(all_methods)) == 4  # baseline, CM, knn, logreg (the example's samples are loaded)
    with pytest.raises(AppError, match="Type a query"):
        c.predict("   ", *EMBEDDED, api_name="/ask")


def _closed_port() -> int:
    from demo.testing import free_port
    return free_port()  # bound and released: nothing listens there


# --------------------------------------------------------------------------- pieces, without a server

def test_read_upload_checks_size_and_encoding_itself(tmp_path):
    big = tmp_path / "big.csv"
    big.write_bytes(b"a" * (app.MAX_FILE_BYTES + 1))
    with pytest.raises(app.UserError, match="over 5 MB"):
        app._read_upload(str(big), "samples")
    with pytest.raises(app.UserError, match="over 5 MB"):
        app._decode(b"a" * (app.MAX_FILE_BYTES + 1), "pasted")
    with pytest.raises(app.UserError, match="binary"):
        app._decode(b"text,label\n\x00\x01", "x.csv")
    with pytest.raises(app.UserError, match="No samples file"):
        app._read_upload(None, "samples")


def test_guess_columns():
    text = EXAMPLE_SAMPLES.read_text(encoding="utf-8")
    assert app._guess_columns(text, "x.csv", ["id", "utterance", "my_label"]) == ("utterance", "my_label")
    odd = "a,b,c\n1,the first long sentence here,cat\n2,another long sentence there,dog\n3,more words again,cat\n"
    assert app._guess_columns(odd, "x.csv", ["a", "b", "c"]) == ("b", "c")


def test_split_is_stratified_and_disjoint():
    ex = app.parse_examples(EXAMPLE_SAMPLES.read_text(encoding="utf-8"), source="s.csv", text_column="utterance",
                            label_column="my_label")
    pref, held = app._split(ex, 0.2)
    assert len(pref) == 16 and len(held) == 44
    assert {e.label for e in pref} == EXAMPLE_LABELS
    assert not {e.text for e in pref} & {e.text for e in held}
    assert app._split(ex, 0.2) == (pref, held)  # seeded
    pref_all, held_all = app._split(ex, 1.0)
    assert len(pref_all) == 60 and held_all == []


def test_messages_escape_user_text_and_redact_keys():
    assert "<" not in app._md("<img src=x onerror=alert(1)>") and "\\*" in app._md("*bold*")

    @app.guarded
    def handler(query, api_key):
        raise RuntimeError(f"server said: bad key {api_key}")

    with pytest.raises(app.gr.Error) as err:
        handler("q", "sk-abcdef123456")
    assert "sk-abcdef123456" not in str(err.value) and "[redacted]" in str(err.value)


def test_heatmap_and_table():
    bank = app.MemoryBank.from_pairs([("tunes", "tunes"), ("tunes", "headlines"), ("grub", "grub")])
    fig = app.heatmap(bank, ["grub", "headlines", "tunes"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "your label" and [t.get_text() for t in ax.get_yticklabels()] == ["grub", "tunes"]
    df = app.bank_table(bank)
    assert list(df.columns) == ["model answer (response)", "your label", "count", "p"] and len(df) == 3


def test_launch_defaults(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    kw = app.launch_kwargs()
    assert (kw["server_name"], kw["server_port"], kw["max_file_size"]) == ("127.0.0.1", 7860, "5mb")
    monkeypatch.setenv("SPACE_ID", "someone/cm-demo")
    assert app.launch_kwargs()["server_name"] == "0.0.0.0"


def test_response_cache_can_stay_in_memory(monkeypatch, tmp_path):
    monkeypatch.setenv("CM_DEMO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CM_DEMO_RESPONSE_CACHE", "0")
    with app.backend_for("openai", "m", "http://127.0.0.1:9/v1", "sk-unused-123456") as llm:
        assert str(llm.cache.path) == ":memory:"
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("CM_DEMO_RESPONSE_CACHE", "1")
    with app.backend_for("openai", "m", "http://127.0.0.1:9/v1", "sk-unused-123456") as llm:
        assert llm.cache.path == tmp_path / "responses.sqlite"


# --------------------------------------------------------------------------- public deployment guards

def test_server_key_never_sent_to_a_visitors_base_url(monkeypatch, fake_openai):
    """The Space owner's OPENAI_API_KEY must not leak to a URL typed into the page (the visitor's own server)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-OWNER-secret-987654321")
    monkeypatch.setenv("CM_DEMO_RESPONSE_CACHE", "0")
    server = fake_openai({"q": "fix-it"})
    from cm_core.backends.base import GenRequest
    with app.backend_for("openai", "fake-model", server.base_url, "") as llm:
        assert llm.generate([GenRequest.of([{"role": "user", "content": "q"}])]) == [["fix-it"]]
    assert server.auth_headers and all("OWNER" not in h for h in server.auth_headers)


@pytest.mark.parametrize("url_", ["http://127.0.0.1:8000/v1", "http://localhost/v1", "http://10.1.2.3/v1",
                                  "http://169.254.169.254/latest", "http://[::1]:8000/v1", "http://192.168.0.7/v1"])
def test_public_demo_refuses_private_base_urls(monkeypatch, url_):
    monkeypatch.setenv("SPACE_ID", "someone/cm-demo")
    with pytest.raises(app.UserError, match="private or local"):
        app.check_base_url(url_)
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")  # the owner can allow it
    app.check_base_url(url_)


def test_local_demo_allows_local_servers_and_checks_scheme(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("CM_DEMO_PUBLIC", raising=False)
    app.check_base_url("http://127.0.0.1:8000/v1")  # vLLM / Ollama on your own machine
    with pytest.raises(app.UserError, match="http:// or https://"):
        app.check_base_url("file:///etc/passwd")
    with pytest.raises(app.UserError, match="no host"):
        app.check_base_url("http:///v1")


def test_public_demo_loads_hf_models_only_when_allowed(monkeypatch):
    monkeypatch.setenv("CM_DEMO_PUBLIC", "1")
    monkeypatch.delenv("CM_DEMO_ALLOW_HF", raising=False)
    with pytest.raises(app.UserError, match="does not load Hugging Face models"):
        with app.backend_for("hf", "some/huge-model", "", ""):
            pass
    monkeypatch.setenv("CM_DEMO_ALLOW_HF", "1")
    monkeypatch.setenv("CM_DEMO_HF_MODELS", "HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(app.UserError, match="only these"):
        app.check_hf_allowed("some/huge-model")
    app.check_hf_allowed("HuggingFaceTB/SmolLM2-360M-Instruct")
    monkeypatch.delenv("CM_DEMO_PUBLIC")
    monkeypatch.delenv("CM_DEMO_HF_MODELS")
    monkeypatch.delenv("CM_DEMO_ALLOW_HF")
    app.check_hf_allowed("any/model")  # on your own machine, anything goes
