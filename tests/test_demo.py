"""The Gradio demo, driven through its named API endpoints with gradio_client against an in-process server, and
its pieces (handlers, deployment guards) called directly.

The server runs on 127.0.0.1 with a response cache under pytest's tmp dir (shared with test_demo_browser.py in
one run, so the browser test reuses the model's answers). The embedded model runs on CPU: the sample files are
kept small. Every bank and evaluation the demo shows comes with a ``python -m cm_core`` line; the tests run that
line (``cm_core.cli.main``) and find the same numbers.
"""
from __future__ import annotations

import json
import re
import shlex
import threading
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from cm_core import cli  # noqa: E402
from cm_core.bank import MemoryBank  # noqa: E402
from cm_core.data import Dataset, guess_columns, parse_examples, split_dataset  # noqa: E402
from cm_core.errors import DataError  # noqa: E402
from cm_core.upload import decode_upload, preference_split, read_upload  # noqa: E402
from demo import app, deploy, handlers  # noqa: E402
from demo.testing import EXAMPLE_SAMPLES, EXAMPLE_TEST, serve  # noqa: E402

from conftest import REPO  # noqa: E402

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
EVAL_METHODS = ["zero_shot", "zero_shot+cm", "knn", "knn+cm", "logreg", "logreg+cm"]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "demo-cache"  # shared with test_demo_browser.py in one run


@pytest.fixture(scope="module")
def url(demo_cache):
    with serve(demo_cache) as u:
        yield u


def client(url) -> Client:
    return Client(url, verbose=False)


def _bank_of(download_path) -> dict:
    with open(download_path, encoding="utf-8") as f:
        return json.load(f)


def _bank_labels(bank: dict) -> set[str]:
    return {lab for row in bank["counts"].values() for lab in row}


def _rows(table) -> list[dict]:
    """A table as returned by the API (headers + data) or by a handler (a DataFrame), as a list of rows."""
    if hasattr(table, "to_dict"):
        return [{k: (None if v != v else v) for k, v in r.items()} for r in table.to_dict("records")]  # NaN -> None
    return [dict(zip(table["headers"], r)) for r in table["data"]]


# --------------------------------------------------------------------------- the command line the demo shows

def _shown_argv(markdown: str) -> list[str]:
    """The one ``python -m cm_core ...`` line in a status text, as argv for ``cm_core.cli.main``."""
    lines = re.findall(r"`{3,}bash\n(.*?)\n`{3,}", markdown)
    assert len(lines) == 1, markdown
    argv = shlex.split(lines[0])
    assert argv[:3] == ["python", "-m", "cm_core"], argv
    return argv[3:]


def _run_shown(markdown: str, files: dict, out_dir: Path, cache_dir: Path) -> Path:
    """Run the shown line in-process: its file names mapped to where those files are here (the built-in example's
    paths are relative to the repository root), its output under ``out_dir``. Returns the output file."""
    argv = _shown_argv(markdown)
    for i in range(1, len(argv)):
        if argv[i - 1] in ("--dataset", "--test-file", "--bank", "--input"):
            argv[i] = str(files.get(argv[i]) or REPO / argv[i])
            assert Path(argv[i]).is_file(), argv[i]
    out = out_dir / Path(argv[argv.index("--output") + 1]).name
    argv[argv.index("--output") + 1] = str(out)
    assert cli.main([*argv, "--cache-dir", str(cache_dir)]) == 0, argv
    return out


def _assert_same_numbers(results_json: Path, table, per_row_csv) -> dict:
    """The demo's evaluation table and per-row CSV agree with the command line's results JSON, number for number."""
    import pandas as pd
    res = json.loads(results_json.read_text(encoding="utf-8"))
    shown = {r["method"]: r for r in _rows(table)}
    assert list(shown) == [m for m, r in res["results"].items() if "skipped" not in r]
    for name, r in shown.items():
        c = res["results"][name]
        assert (r["accuracy"], r["95% CI low"], r["95% CI high"], r["macro-F1"], r["n"]) == (
            round(c["accuracy"], 3), round(c["ci95"][0], 3), round(c["ci95"][1], 3), round(c["macro_f1"], 3),
            c["n"]), name
        assert r["p vs its base (McNemar)"] == (None if c.get("p_value") is None else round(c["p_value"], 4))
    per_row = pd.read_csv(per_row_csv, keep_default_na=False, dtype=str)
    assert per_row["text"].tolist() == res["texts"] and per_row["gold"].tolist() == res["gold"]
    for name, preds in res["predictions"].items():
        assert per_row[name].tolist() == preds, name
    return res


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

def test_two_sessions_build_and_keep_their_own_banks(url, demo_cache, tmp_path):
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

    table_a, _plot_a, dl_a, held_a, status_a = results["a"]
    table_b, _plot_b, dl_b, held_b, status_b = results["b"]
    assert "Memory bank built" in status_a and "12 samples" in status_a  # int(0.2 * 60), as split_dataset draws
    assert "Memory bank built" in status_b and "9 samples" in status_b
    bank_a, bank_b = _bank_of(dl_a), _bank_of(dl_b)
    assert bank_a["format"] == "cm-memory-bank" and bank_a["meta"]["n_samples"] == 12
    assert _bank_labels(bank_a) <= EXAMPLE_LABELS and _bank_labels(bank_b) == B_LABELS
    assert set(bank_a["counts"]) <= EXAMPLE_LABELS and set(bank_b["counts"]) <= B_LABELS  # answers among own labels
    assert {r["your label"] for r in _rows(table_a)} == _bank_labels(bank_a)
    # A's 48 other rows are held out (a CSV the shown evaluate line reads); B kept every row, so its bank is the
    # shown `estimate --all-samples` line's, count for count.
    held_rows = Path(held_a).read_text(encoding="utf-8").splitlines()
    assert held_rows[0] == "utterance,my_label" and len(held_rows) == 1 + 48 and held_b is None
    argv_a = _shown_argv(status_a)
    assert argv_a[:5] == ["evaluate", "--dataset", "demo/examples/my_labels_samples.csv", "--test-file",
                          "held_out.csv"] and "--pref-fraction" in argv_a and "0.2" in argv_a
    assert _shown_argv(status_b)[0] == "estimate"
    out = _run_shown(status_b, {"b.jsonl": b_file}, tmp_path, demo_cache)
    assert _bank_of(out)["counts"] == bank_b["counts"]

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

    # Batch evaluation in session A on a few labelled rows: every method and its CM, CIs, p-values, per-row CSV;
    # the evaluate line shown beside them gives the same numbers.
    lines = EXAMPLE_TEST.read_text(encoding="utf-8").splitlines()
    small_test = tmp_path / "test.csv"
    small_test.write_text("\n".join([lines[0]] + lines[1::5]) + "\n", encoding="utf-8")  # 8 rows, one per label
    table, summary, csv_path = a.predict(handle_file(str(small_test)), "utterance", "my_label", *EMBEDDED,
                                         api_name="/evaluate")
    rows = _rows(table)
    assert [r["method"] for r in rows] == EVAL_METHODS
    for r in rows:
        assert 0 <= r["95% CI low"] <= r["accuracy"] <= r["95% CI high"] <= 1 and r["n"] == 8
    assert rows[0]["p vs its base (McNemar)"] is None and 0 <= rows[1]["p vs its base (McNemar)"] <= 1
    assert "8 rows" in summary
    with open(csv_path, encoding="utf-8") as f:
        per_row = f.read().splitlines()
    assert per_row[0] == "text,gold," + ",".join(EVAL_METHODS) + ",cm_action" and len(per_row) == 9
    out = _run_shown(summary, {"test.csv": small_test}, tmp_path, demo_cache)
    res = _assert_same_numbers(out, table, csv_path)
    assert res["banks"]["zero_shot"]["bank"]["counts"] == bank_a["counts"]  # the same 12 preference samples

    # The held-out rows (no test file): 48 rows of the example are outside A's 12 preference samples.
    # (Not run here: it would take minutes on CPU. The path is covered by test_shown_command_lines_repeat_the_demo
    # on a fake model.)


def test_held_out_rows_used_without_file():
    """Without a test file the evaluation uses the held-out rows of the uploaded samples."""
    state = {"held": [["a", "x"], ["b", "y"]], "samples": [], "labels": ["x", "y"], "columns": ["text", "label"]}
    rows, source, test_arg, text_col = handlers._read_test(None, None, None, state)
    assert [r.text for r in rows] == ["a", "b"] and source == "held-out rows"
    assert (test_arg, text_col) == ("held_out.csv", "text")
    with pytest.raises(deploy.UserError, match="held out"):
        handlers._read_test(None, None, None, {"held": [], "labels": ["x", "y"]})


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
    table, _plot, dl, _held, status = c.predict("message", "tag", *backend, "zero_shot", 1.0, 0.7,
                                                api_name="/build_bank")
    bank = _bank_of(dl)
    assert bank["counts"]["fix-it"] == {"fix-it": 3, "pet care": 3}
    assert bank["meta"]["model"]["kind"] == "openai" and key not in json.dumps(bank) and key not in status
    assert all(h == f"Bearer {key}" for h in server.auth_headers)
    assert _shown_argv(status)[_shown_argv(status).index("--model") + 1] == "openai:fake-model"
    base, cm, why, cands, _scores, _all = c.predict("my cat is sick", *backend, api_name="/ask")
    assert (base, cm) == ("fix-it", "pet care") and why.startswith("choose")
    assert {r["candidate"] for r in _rows(cands)} == {"fix-it", "pet care"}


# --------------------------------------------------------------------------- the shown command lines, on a fake model

ROWS = [("pay my electricity bill", "money stuff"), ("how much is in my savings account", "money stuff"),
        ("transfer fifty pounds to alex", "money stuff"), ("move money into the holiday pot", "money stuff"),
        ("book the dog in at the vet", "pet care"), ("order more cat food", "pet care"),
        ("when should the puppy get its jabs", "pet care"), ("the hamster will not eat", "pet care"),
        ("the kitchen tap is dripping", "fix-it"), ("find a plumber for the boiler", "fix-it"),
        ("how do I patch a hole in the wall", "fix-it"), ("the shed door is off its hinge", "fix-it")]
ROWS = ROWS + [(f"{t} please", y) for t, y in ROWS]  # 24 rows, 8 per label
TEST_ROWS = [(f"{t} today", y) for t, y in ROWS[:12]]


def _fake_responder(query, listed):
    """Files pets under fix-it unless asked among two candidates (CM re-asks); a fix-it query 'today' is money."""
    gold = dict(ROWS + TEST_ROWS).get(query, "money stuff")
    if gold == "pet care" and len(listed) != 2:
        return "fix-it"
    if gold == "fix-it" and query.endswith("today") and len(listed) != 2:
        return "money stuff"
    return gold


def test_shown_command_lines_repeat_the_demo(fake_openai, tmp_path, monkeypatch):
    """Each status text carries one ``python -m cm_core`` line; run on the same files, it reproduces the demo's bank
    and its evaluation table number for number: held-out rows (evaluate --test-file held_out.csv), all rows
    (estimate --all-samples), a separate test file, an uploaded bank with samples (--bank), and a bank alone
    (predict)."""
    import pandas as pd
    server = fake_openai(_fake_responder)
    key = "sk-fake-KEY-for-the-line"
    monkeypatch.setenv("CM_DEMO_CACHE_DIR", str(tmp_path / "demo-cache"))
    monkeypatch.setenv("OPENAI_API_KEY", key)  # what the line asks for; the demo itself gets the key field's key
    monkeypatch.setattr(handlers, "N_BOOT", 200)  # the line's CIs use 1000: compared below without CIs
    backend = ("openai", "fake-model", server.base_url, key)
    noop = lambda *a, **k: None  # noqa: E731
    samples = tmp_path / "my samples.csv"  # a space: the line quotes it
    samples.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in ROWS), encoding="utf-8")
    test = tmp_path / "test.csv"
    test.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in TEST_ROWS), encoding="utf-8")
    cli_cache = tmp_path / "cli-cache"

    def same(out, table, per_row):  # the CIs aside (fewer resamples here), every number agrees
        res = json.loads(out.read_text(encoding="utf-8"))
        shown = {r["method"]: r for r in _rows(table)}
        assert list(shown) == list(res["results"])
        for name, r in shown.items():
            assert (r["accuracy"], r["macro-F1"], r["n"]) == (round(res["results"][name]["accuracy"], 3),
                                                               round(res["results"][name]["macro_f1"], 3),
                                                               res["results"][name]["n"])
        rows = pd.read_csv(per_row, keep_default_na=False, dtype=str)
        assert all(rows[m].tolist() == p for m, p in res["predictions"].items())
        return res

    # 1. three quarters of the rows are preference samples, the rest held out
    state, *_ = handlers.load_samples(str(samples), "", None)
    state, table, _fig, bank_path, held_path, status = handlers.build_bank(
        "text", "label", *backend, "zero_shot", 0.75, 0.7, state, progress=noop)
    pref = preference_split(Dataset("s", parse_examples(samples.read_text(), source="s.csv", text_column="text")),
                            pref_fraction=0.75)
    assert [[e.text, e.label] for e in pref.preference.examples] == state["samples"] and len(state["samples"]) == 18
    assert Path(held_path).name == "held_out.csv" and key not in status
    files = {"my samples.csv": samples, "held_out.csv": held_path, "test.csv": test}
    ev_table, summary, per_row = handlers.evaluate_batch(None, "text", "label", *backend, state, progress=noop)
    assert _shown_argv(summary) == _shown_argv(status)  # the bank's line is the evaluation's
    res = same(_run_shown(summary, files, tmp_path, cli_cache), ev_table, per_row)
    assert res["banks"]["zero_shot"]["bank"]["counts"] == _bank_of(bank_path)["counts"]
    assert res["results"]["zero_shot+cm"]["accuracy"] > res["results"]["zero_shot"]["accuracy"]

    # 2. every row a preference sample: the bank is `estimate --all-samples`'s; a separate test file
    state, table, _fig, bank_path, held_path, status = handlers.build_bank(
        "text", "label", *backend, "zero_shot", 1.0, 0.7, state, progress=noop)
    assert held_path is None and _shown_argv(status)[0] == "estimate"
    assert _bank_of(_run_shown(status, files, tmp_path, cli_cache))["counts"] == _bank_of(bank_path)["counts"]
    ev_table, summary, per_row = handlers.evaluate_batch(str(test), "text", "label", *backend, state, progress=noop)
    assert "--test-file" in _shown_argv(summary) and "test.csv" in _shown_argv(summary)
    same(_run_shown(summary, files, tmp_path, cli_cache), ev_table, per_row)

    # 3. that bank uploaded again, with the samples loaded: the line passes it with --bank
    files["memory_bank.json"] = bank_path
    state, *_ = handlers.upload_bank(bank_path, "text", "label", state)
    ev_table, summary, per_row = handlers.evaluate_batch(str(test), "text", "label", *backend, state, progress=noop)
    argv = _shown_argv(summary)
    assert argv[argv.index("--bank") + 1] == "memory_bank.json"
    same(_run_shown(summary, files, tmp_path, cli_cache), ev_table, per_row)

    # 4. the bank alone (no samples): the line is `predict`, whose answers are the per-row CSV's CM column
    state, *_ = handlers.upload_bank(bank_path, None, None, None)
    ev_table, summary, per_row = handlers.evaluate_batch(str(test), "text", "label", *backend, state, progress=noop)
    assert [r["method"] for r in _rows(ev_table)] == ["zero_shot", "zero_shot+cm"]
    out = _run_shown(summary, files, tmp_path, cli_cache)
    answers = [json.loads(line)["answer"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert answers == pd.read_csv(per_row, keep_default_na=False, dtype=str)["zero_shot+cm"].tolist()


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
    table, _plot, dl, held, status = c.predict(handle_file(str(bank_file)), "utterance", "my_label",
                                               api_name="/upload_bank")
    assert "loaded from paper\\_bank\\.json" in status and held is None
    assert len(_rows(table)) == 6 and _bank_of(dl)["meta"] == {"imported_from": "paper-format"}
    base, cm, why, cands, scores, all_methods = c.predict("play the morning news podcast", *EMBEDDED,
                                                          api_name="/ask")
    assert base in EXAMPLE_LABELS and cm in EXAMPLE_LABELS
    if base == "tunes":
        assert why.startswith("choose") and {r["candidate"] for r in _rows(cands)} == {"tunes", "headlines"}
    assert len(_rows(all_methods)) == 4  # baseline, CM, knn, logreg (the example's samples are loaded)
    with pytest.raises(AppError, match="Type a query"):
        c.predict("   ", *EMBEDDED, api_name="/ask")
    # A test file whose columns or labels the command line could not read is refused, saying why.
    odd = tmp_path / "odd.csv"
    odd.write_text("sentence,label\nwake me at six,wake-up buzz\n", encoding="utf-8")
    with pytest.raises(AppError, match="same text and label columns"):
        c.predict(handle_file(str(odd)), "utterance", "my_label", *EMBEDDED, api_name="/evaluate")
    odd.write_text("utterance,my_label\nwake me at six,alarm clock\n", encoding="utf-8")
    with pytest.raises(AppError, match="line 2.*one of your labels"):
        c.predict(handle_file(str(odd)), "utterance", "my_label", *EMBEDDED, api_name="/evaluate")


def _closed_port() -> int:
    from demo.testing import free_port
    return free_port()  # bound and released: nothing listens there


# --------------------------------------------------------------------------- pieces, without a server

def test_importing_the_app_builds_nothing(monkeypatch):
    """``import demo.app`` defines the page; only build_demo() builds it (and ``__main__`` launches it)."""
    import importlib

    def refuse(*a, **k):
        raise AssertionError("a gradio Blocks was built at import time")

    monkeypatch.setattr(app.gr.Blocks, "__init__", refuse)
    importlib.reload(app)
    assert not any(isinstance(v, app.gr.Blocks) for v in vars(app).values())
    with pytest.raises(AssertionError, match="built at import"):
        app.build_demo()


def test_the_app_module_is_layout_only():
    """app.py wires components to handlers: no parsing, splitting, scoring or method building of its own."""
    src = (REPO / "demo" / "app.py").read_text(encoding="utf-8")
    assert len(src.splitlines()) < 400
    for forbidden in ("from cm_core", "parse_examples", "columns_of", "guess_columns", "split_dataset",
                      "preference_split", "run_evaluation", "summarize", "mcnemar", "registry", "estimate_bank",
                      "MemoryBank", "import csv", "import json", "csv.", "json.", "def _"):
        assert forbidden not in src, forbidden
    for path in (REPO / "demo").glob("*.py"):
        assert "CM(" not in path.read_text(encoding="utf-8"), path  # CM is built by cm_core.registry only


def test_read_upload_checks_size_and_encoding(tmp_path):
    big = tmp_path / "big.csv"
    big.write_bytes(b"a" * (deploy.MAX_FILE_BYTES + 1))
    with pytest.raises(DataError, match="over 5 MB"):
        read_upload(str(big), deploy.MAX_FILE_BYTES)
    with pytest.raises(DataError, match="over 5 MB"):
        decode_upload(b"a" * (deploy.MAX_FILE_BYTES + 1), "pasted", deploy.MAX_FILE_BYTES)
    with pytest.raises(DataError, match="binary"):
        decode_upload(b"text,label\n\x00\x01", "x.csv", deploy.MAX_FILE_BYTES)
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        decode_upload("text,label\ncafé,x\n".encode("latin-1"), "x.csv", deploy.MAX_FILE_BYTES)
    assert decode_upload("\ufefftext,label\n".encode("utf-8"), "x.csv", deploy.MAX_FILE_BYTES) == "text,label\n"
    with pytest.raises(deploy.UserError, match="No samples file"):
        handlers.read_file(None, "samples")


def test_guess_columns():
    text = EXAMPLE_SAMPLES.read_text(encoding="utf-8")
    assert guess_columns(text, "x.csv", ["id", "utterance", "my_label"]) == ("utterance", "my_label")
    assert guess_columns(text, "x.csv") == ("utterance", "my_label")  # the columns read from the text
    odd = "a,b,c\n1,the first long sentence here,cat\n2,another long sentence there,dog\n3,more words again,cat\n"
    assert guess_columns(odd, "x.csv", ["a", "b", "c"]) == ("b", "c")
    jsonl = '{"q": "a long question about things", "y": "k"}\n{"q": "another long one", "y": "k"}\n'
    assert guess_columns(jsonl, "x.jsonl") == ("q", "y")
    assert guess_columns('{"q": "x", "y": \n', "x.jsonl", ["q", "y"]) == ("q", "y")  # malformed: first two


def test_preference_split_is_the_command_lines():
    """The demo's split is ``evaluate --test-file``'s: split_dataset(test_fraction=0) draws the preference samples,
    every row in file order with fraction 1; the other rows are held out, disjoint by text."""
    ex = parse_examples(EXAMPLE_SAMPLES.read_text(encoding="utf-8"), source="s.csv", text_column="utterance",
                        label_column="my_label")
    ds = Dataset("s", ex)
    split = preference_split(ds, pref_fraction=0.2)
    pref, held = split.preference.examples, split.test.examples
    assert len(pref) == 12 and len(held) == 48
    assert pref == split_dataset(ds, pref_fraction=0.2, seed=40, test_fraction=0.0).preference.examples
    assert not {e.text for e in pref} & {e.text for e in held}
    assert [e for e in ex if e in held] == held  # file order
    assert preference_split(ds, pref_fraction=0.2).preference.examples == pref  # seeded
    everything = preference_split(ds, pref_fraction=1.0)
    assert everything.preference.examples == ex and everything.test.examples == []
    assert len(preference_split(ds, pref_fraction=1.0, pref_count=7).preference) == 7


def test_messages_escape_user_text_and_redact_keys():
    assert "<" not in deploy.md("<img src=x onerror=alert(1)>") and "\\*" in deploy.md("*bold*")

    @deploy.guarded
    def handler(query, api_key):
        raise RuntimeError(f"server said: bad key {api_key}")

    with pytest.raises(app.gr.Error) as err:
        handler("q", "sk-abcdef123456")
    assert "sk-abcdef123456" not in str(err.value) and "[redacted]" in str(err.value)


def test_command_line_cannot_break_out_of_its_code_block():
    argv = ["evaluate", "--dataset", "```<img src=x onerror=alert(1)>.csv"]
    shown = handlers._command_md(argv, "this", [])
    assert shown.count("````bash") == 1 and _shown_argv(shown) == argv


def test_heatmap_and_table():
    bank = MemoryBank.from_pairs([("tunes", "tunes"), ("tunes", "headlines"), ("grub", "grub")])
    fig = handlers.heatmap(bank)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "user label" and {t.get_text() for t in ax.get_yticklabels()} == {"grub", "tunes"}
    df = handlers.bank_frame(bank)
    assert list(df.columns) == ["model answer (response)", "your label", "count", "p"] and len(df) == 3


def test_launch_defaults(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    kw = deploy.launch_kwargs()
    assert (kw["server_name"], kw["server_port"], kw["max_file_size"]) == ("127.0.0.1", 7860, "5mb")
    monkeypatch.setenv("SPACE_ID", "someone/cm-demo")
    assert deploy.launch_kwargs()["server_name"] == "0.0.0.0"


def test_space_metadata_points_at_the_app():
    """demo/README.md's front matter names app.py, which runs as a script beside handlers.py and deploy.py."""
    meta = (REPO / "demo" / "README.md").read_text(encoding="utf-8").split("---")[1]
    assert re.search(r"^app_file: app\.py$", meta, re.M)
    src = (REPO / "demo" / "app.py").read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":' in src and "import handlers" in src and "import deploy" in src


def test_response_cache_can_stay_in_memory(monkeypatch, tmp_path):
    monkeypatch.setenv("CM_DEMO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CM_DEMO_RESPONSE_CACHE", "0")
    with deploy.backend_for("openai", "m", "http://127.0.0.1:9/v1", "sk-unused-123456") as llm:
        assert str(llm.cache.path) == ":memory:"
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("CM_DEMO_RESPONSE_CACHE", "1")
    with deploy.backend_for("openai", "m", "http://127.0.0.1:9/v1", "sk-unused-123456") as llm:
        assert llm.cache.path == tmp_path / "responses.sqlite"


# --------------------------------------------------------------------------- public deployment guards

def test_server_key_never_sent_to_a_visitors_base_url(monkeypatch, fake_openai):
    """The Space owner's OPENAI_API_KEY must not leak to a URL typed into the page (the visitor's own server)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-OWNER-secret-987654321")
    monkeypatch.setenv("CM_DEMO_RESPONSE_CACHE", "0")
    server = fake_openai({"q": "fix-it"})
    from cm_core.backends.base import GenRequest
    with deploy.backend_for("openai", "fake-model", server.base_url, "") as llm:
        assert llm.generate([GenRequest.of([{"role": "user", "content": "q"}])]) == [["fix-it"]]
    assert server.auth_headers and all("OWNER" not in h for h in server.auth_headers)


@pytest.mark.parametrize("url_", ["http://127.0.0.1:8000/v1", "http://localhost/v1", "http://10.1.2.3/v1",
                                  "http://169.254.169.254/latest", "http://[::1]:8000/v1", "http://192.168.0.7/v1"])
def test_public_demo_refuses_private_base_urls(monkeypatch, url_):
    monkeypatch.setenv("SPACE_ID", "someone/cm-demo")
    with pytest.raises(deploy.UserError, match="private or local"):
        deploy.check_base_url(url_)
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")  # the owner can allow it
    deploy.check_base_url(url_)


def test_local_demo_allows_local_servers_and_checks_scheme(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("CM_DEMO_PUBLIC", raising=False)
    deploy.check_base_url("http://127.0.0.1:8000/v1")  # vLLM / Ollama on your own machine
    with pytest.raises(deploy.UserError, match="http:// or https://"):
        deploy.check_base_url("file:///etc/passwd")
    with pytest.raises(deploy.UserError, match="no host"):
        deploy.check_base_url("http:///v1")


def test_public_demo_loads_hf_models_only_when_allowed(monkeypatch):
    monkeypatch.setenv("CM_DEMO_PUBLIC", "1")
    monkeypatch.delenv("CM_DEMO_ALLOW_HF", raising=False)
    with pytest.raises(deploy.UserError, match="does not load Hugging Face models"):
        with deploy.backend_for("hf", "some/huge-model", "", ""):
            pass
    monkeypatch.setenv("CM_DEMO_ALLOW_HF", "1")
    monkeypatch.setenv("CM_DEMO_HF_MODELS", "HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(deploy.UserError, match="only these"):
        deploy.check_hf_allowed("some/huge-model")
    deploy.check_hf_allowed("HuggingFaceTB/SmolLM2-360M-Instruct")
    monkeypatch.delenv("CM_DEMO_PUBLIC")
    monkeypatch.delenv("CM_DEMO_HF_MODELS")
    monkeypatch.delenv("CM_DEMO_ALLOW_HF")
    deploy.check_hf_allowed("any/model")  # on your own machine, anything goes
