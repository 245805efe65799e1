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
from cm_core.errors import BackendError, DataError  # noqa: E402
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


def _path(download) -> str | None:
    """A download button's file (a handler returns the button, the API its file)."""
    value = getattr(download, "value", download)
    return value.get("path") if isinstance(value, dict) else value


def _bank_of(download_path) -> dict:
    download_path = _path(download_path)
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
        if argv[i - 1] in ("--dataset", "--test-file", "--bank", "--input", "--responses"):
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
        assert (r["acc. %"], r["95% CI low"], r["95% CI high"], r["F1 %"], r["n"]) == (
            handlers.pct(c["accuracy"]), handlers.pct(c["ci95"][0]), handlers.pct(c["ci95"][1]),
            handlers.pct(c["macro_f1"]), c["n"]), name
        assert r["p vs base"] == handlers.fmt_p(c.get("p_value"))
    per_row = pd.read_csv(per_row_csv, keep_default_na=False, dtype=str)
    assert per_row["text"].tolist() == res["texts"] and per_row["gold"].tolist() == res["gold"]
    for name, preds in res["predictions"].items():
        assert per_row[name].tolist() == preds, name
    return res


# --------------------------------------------------------------------------- API surface

def test_named_endpoints(url):
    api = client(url).view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/load_samples", "/load_pasted", "/use_example", "/build_bank", "/upload_bank", "/ask",
                 "/evaluate", "/example_test"):
        assert name in api, name
    build = [p["parameter_name"] for p in api["/build_bank"]["parameters"]]
    assert build == ["text_col", "label_col", "backend", "model", "base_url", "api_key", "method", "pref_fraction",
                     "temperature", "words"]
    assert [p["parameter_name"] for p in api["/upload_bank"]["parameters"]] == ["file", "text_col", "label_col",
                                                                                 "pref_fraction", "words"]


# --------------------------------------------------------------------------- two users at once

def test_two_sessions_build_and_keep_their_own_banks(url, demo_cache, tmp_path):
    a, b, c = client(url), client(url), client(url)
    # A: the built-in example (CSV, columns id/utterance/my_label); B: a JSONL with other names and other labels.
    tcol, lcol, status, preview, test_path, words = a.predict(api_name="/use_example")
    assert (tcol["value"], lcol["value"]) == ("utterance", "my_label")
    assert "60 rows" in status and test_path.endswith(".csv") and "8 labels" in status
    assert words.split() == handlers.EXAMPLE_WORDS.read_text(encoding="utf-8").split()  # the model's own words
    b_file = tmp_path / "b.jsonl"
    b_file.write_text("\n".join(json.dumps({"message": t, "tag": y}) for t, y in B_ROWS) + "\n", encoding="utf-8")
    tcol_b, lcol_b, status_b, _ = b.predict(handle_file(str(b_file)), "", api_name="/load_samples")
    assert (tcol_b["value"], lcol_b["value"]) == ("message", "tag")

    results, errors = {}, []

    def build(name, cl, cols, fraction):
        try:
            results[name] = cl.predict(*cols, *EMBEDDED, "zero_shot", fraction, 0.7, "", api_name="/build_bank")
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
    assert {r["model answer"] for r in _rows(table_a)} == set(bank_a["counts"])
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
    assert {r["model answer"] for r in _rows(scores_a)} == EXAMPLE_LABELS  # zero-shot: the model's answers are
    assert {r["model answer"] for r in _rows(scores_b)} == B_LABELS  # the user's labels
    assert why_a.split(":")[0] in ("keep", "map", "choose") and f"CM answered '{cm_a}'" in why_a
    methods_a = [r["method"] for r in _rows(all_a)]
    assert any(m.startswith("kNN") for m in methods_a) and any(m.startswith("logistic") for m in methods_a)
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
        assert 0 <= r["95% CI low"] <= r["acc. %"] <= r["95% CI high"] <= 100 and r["n"] == 8
    assert rows[0]["p vs base"] is None
    assert rows[1]["p vs base"] == "< 0.0001" or 0 <= float(rows[1]["p vs base"]) <= 1
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


def test_openai_compatible_backend(url, tmp_path, fake_openai, monkeypatch):
    """A fake OpenAI-compatible server that files pet questions under fix-it, unless asked among two labels."""
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")  # the fake server listens on 127.0.0.1
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
    table, _plot, dl, _held, status = c.predict("message", "tag", *backend, "zero_shot", 1.0, 0.7, "",
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
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")  # the fake server listens on 127.0.0.1
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
            assert (r["acc. %"], r["F1 %"], r["n"]) == (handlers.pct(res["results"][name]["accuracy"]),
                                                               handlers.pct(res["results"][name]["macro_f1"]),
                                                               res["results"][name]["n"])
        rows = pd.read_csv(per_row, keep_default_na=False, dtype=str)
        assert all(rows[m].tolist() == p for m, p in res["predictions"].items())
        return res

    # 1. three quarters of the rows are preference samples, the rest held out
    state, *_ = handlers.load_samples(str(samples), "", None)
    state, table, _fig, bank_path, held_path, status = handlers.build_bank(
        "text", "label", *backend, "zero_shot", 0.75, 0.7, "", state, progress=noop)
    bank_path, held_path = _path(bank_path), _path(held_path)
    pref = preference_split(Dataset("s", parse_examples(samples.read_text(), source="s.csv", text_column="text")),
                            pref_fraction=0.75)
    assert [[e.text, e.label] for e in pref.preference.examples] == state["samples"] and len(state["samples"]) == 18
    assert Path(held_path).name == "held_out.csv" and key not in status
    files = {"my samples.csv": samples, "held_out.csv": held_path, "test.csv": test}
    ev_table, summary, per_row = handlers.evaluate_batch(None, "text", "label", *backend, state, progress=noop)
    per_row = _path(per_row)
    assert _shown_argv(summary) == _shown_argv(status)  # the bank's line is the evaluation's
    res = same(_run_shown(summary, files, tmp_path, cli_cache), ev_table, per_row)
    assert res["banks"]["zero_shot"]["bank"]["counts"] == _bank_of(bank_path)["counts"]
    assert res["results"]["zero_shot+cm"]["accuracy"] > res["results"]["zero_shot"]["accuracy"]

    # 2. every row a preference sample: the bank is `estimate --all-samples`'s; a separate test file
    state, table, _fig, bank_path, held_path, status = handlers.build_bank(
        "text", "label", *backend, "zero_shot", 1.0, 0.7, "", state, progress=noop)
    bank_path, held_path = _path(bank_path), _path(held_path)
    assert held_path is None and _shown_argv(status)[0] == "estimate"
    assert _bank_of(_run_shown(status, files, tmp_path, cli_cache))["counts"] == _bank_of(bank_path)["counts"]
    ev_table, summary, per_row = handlers.evaluate_batch(str(test), "text", "label", *backend, state, progress=noop)
    per_row = _path(per_row)
    assert "--test-file" in _shown_argv(summary) and "test.csv" in _shown_argv(summary)
    same(_run_shown(summary, files, tmp_path, cli_cache), ev_table, per_row)

    # 3. that bank uploaded again, with the samples loaded: the line passes it with --bank
    files["memory_bank.json"] = bank_path
    state, *_ = handlers.upload_bank(bank_path, "text", "label", 1.0, "", state)
    ev_table, summary, per_row = handlers.evaluate_batch(str(test), "text", "label", *backend, state, progress=noop)
    per_row = _path(per_row)
    argv = _shown_argv(summary)
    assert argv[argv.index("--bank") + 1] == "memory_bank.json"
    same(_run_shown(summary, files, tmp_path, cli_cache), ev_table, per_row)

    # 3b. the same bank uploaded with a preference fraction below 1: the samples are split as a build splits them,
    # the classifiers learn from the preference samples only and the held-out rows stay held out (issue item 9)
    state, _t, _f, _dl, held_up, status = handlers.upload_bank(bank_path, "text", "label", 0.75, "", state)
    held_up = _path(held_up)
    assert len(state["samples"]) == 18 and len(state["held"]) == 6 and Path(held_up).name == "held_out.csv"
    assert "stay held out" in status and "more than your" in status  # the bank saw 24 samples: it says so
    files["held_out.csv"] = held_up
    ev_table, summary, per_row = handlers.evaluate_batch(None, "text", "label", *backend, state, progress=noop)
    per_row = _path(per_row)
    assert {r["n"] for r in _rows(ev_table)} == {6}
    argv = _shown_argv(summary)
    assert argv[argv.index("--bank") + 1] == "memory_bank.json" and argv[argv.index("--pref-fraction") + 1] == "0.75"
    same(_run_shown(summary, files, tmp_path, cli_cache), ev_table, per_row)

    # 4. the bank alone (no samples): the line is `predict`, whose answers are the per-row CSV's CM column
    state, *_ = handlers.upload_bank(bank_path, None, None, 1.0, "", None)
    ev_table, summary, per_row = handlers.evaluate_batch(str(test), "text", "label", *backend, state, progress=noop)
    per_row = _path(per_row)
    assert [r["method"] for r in _rows(ev_table)] == ["zero_shot", "zero_shot+cm"]
    out = _run_shown(summary, files, tmp_path, cli_cache)
    answers = [json.loads(line)["answer"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert answers == pd.read_csv(per_row, keep_default_na=False, dtype=str)["zero_shot+cm"].tolist()


# --------------------------------------------------------------------------- bad input, and the app still works

def test_bad_inputs_give_clear_messages_and_app_keeps_working(url, tmp_path, monkeypatch):
    c = client(url)
    with pytest.raises(AppError, match="Build a memory bank first"):
        c.predict("hello", *EMBEDDED, api_name="/ask")
    with pytest.raises(AppError, match="Load preference samples first"):
        c.predict("text", "label", *EMBEDDED, "zero_shot", 1.0, 0.7, "", api_name="/build_bank")

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
    # A broken line or a missing label cannot be mended by picking other columns: refused at once, saying which
    # line and what to do (not "pick the right columns").
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(AppError, match="line 2: malformed JSON.*one JSON object per line") as err:
        c.predict(handle_file(str(broken)), "", api_name="/load_samples")
    assert "columns" not in str(err.value)
    missing = tmp_path / "missing.csv"
    missing.write_text("text,label\nwake me at six,wake-up buzz\nis it raining,\nplay jazz,tunes\n", encoding="utf-8")
    with pytest.raises(AppError, match="line 3: empty label.*needs your label"):
        c.predict(handle_file(str(missing)), "", api_name="/load_samples")
    # Wrong columns, same column twice (a good file loaded first).
    good = tmp_path / "good.csv"
    good.write_text("text,label\nwake me at six,wake-up buzz\nis it raining,sky report\nplay jazz,tunes\n",
                    encoding="utf-8")
    c.predict(handle_file(str(good)), "", api_name="/load_samples")
    with pytest.raises(AppError, match="not in good.csv; its columns are: text, label"):
        c.predict("query", "label", *EMBEDDED, "zero_shot", 1.0, 0.7, "", api_name="/build_bank")
    with pytest.raises(AppError, match="must be different"):
        c.predict("text", "text", *EMBEDDED, "zero_shot", 1.0, 0.7, "", api_name="/build_bank")
    # A single label: refused when the file is loaded, not at Build.
    with pytest.raises(AppError, match="only one distinct label"):
        c.predict("text,label\nhello,greeting\nhi there,greeting\n", api_name="/load_pasted")
    # A file over the size limit is refused by the server (max_file_size) before the app sees it.
    big = tmp_path / "big.csv"
    big.write_bytes(b"text,label\n" + b"x" * (6 * 1024 * 1024) + b",y\n")
    with pytest.raises(Exception):
        c.predict(handle_file(str(big)), "", api_name="/load_samples")

    # Banks: malformed, wrong version; then the paper's format works.
    bad_bank = tmp_path / "bank.json"
    bad_bank.write_text("{not json", encoding="utf-8")
    with pytest.raises(AppError, match="not a memory bank: it is not valid JSON"):
        c.predict(handle_file(str(bad_bank)), "", "", 1.0, "", api_name="/upload_bank")
    bad_bank.write_text(json.dumps({"format": "cm-memory-bank", "version": 99, "counts": {}}), encoding="utf-8")
    with pytest.raises(AppError, match="version 99"):
        c.predict(handle_file(str(bad_bank)), "", "", 1.0, "", api_name="/upload_bank")

    # Backend errors: a private address is refused by default (no port scanning of the server's network); allowed,
    # a server that is not there says so (the key never shows); a model path, existing or not, is "not found";
    # an unknown backend.
    secret = "sk-test-VERYSECRET-0123456789"
    c.predict(api_name="/use_example")
    closed = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(AppError, match="only to servers at public internet addresses"):
        c.predict("utterance", "my_label", "openai", "gpt-test", closed, secret, "zero_shot", 0.1, 0.7, "",
                  api_name="/build_bank")
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")
    with pytest.raises(AppError) as err:
        c.predict("utterance", "my_label", "openai", "gpt-test", closed, secret, "zero_shot", 0.1, 0.7, "",
                  api_name="/build_bank")
    assert "cannot connect" in str(err.value) and secret not in str(err.value)
    monkeypatch.delenv("CM_DEMO_ALLOW_PRIVATE_URLS")
    shown = []
    for path in (tmp_path / "no-such-model", tmp_path, Path("/etc")):
        with pytest.raises(AppError, match="Model not found") as err:
            c.predict("utterance", "my_label", "hf", str(path), "", "", "zero_shot", 0.1, 0.7, "",
                      api_name="/build_bank")
        shown.append(str(err.value).replace(str(path), "PATH"))
    assert len(set(shown)) == 1, shown  # the same words whether the path exists or not
    with pytest.raises(AppError, match="needs a model name"):
        c.predict("utterance", "my_label", "openai", "", "", "", "zero_shot", 0.1, 0.7, "", api_name="/build_bank")
    with pytest.raises(AppError, match="base URL must start with http"):
        c.predict("utterance", "my_label", "openai", "gpt-test", "ftp://x", "", "zero_shot", 0.1, 0.7, "",
                  api_name="/build_bank")

    # After all that, the same session still works: a paper-format bank over the example's samples, then a query.
    paper = {"grub": ["grub", "wake-up buzz"], "tunes": ["tunes", "headlines"], "sky report": ["sky report"],
             "wake-up buzz": ["wake-up buzz"]}
    bank_file = tmp_path / "paper_bank.json"
    bank_file.write_text(json.dumps(paper), encoding="utf-8")
    table, _plot, dl, held, status = c.predict(handle_file(str(bank_file)), "utterance", "my_label", 1.0, "",
                                               api_name="/upload_bank")
    assert "loaded from paper\\_bank\\.json" in status and held is None
    assert len(_rows(table)) == 6 and _bank_of(dl)["meta"] == {"imported_from": "paper-format"}
    base, cm, why, cands, scores, all_methods = c.predict("play the morning news podcast", *EMBEDDED,
                                                          api_name="/ask")
    assert base in EXAMPLE_LABELS and cm in EXAMPLE_LABELS and f"CM answered '{cm}'" in why
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
    assert list(df.columns) == ["model answer", "your label", "count", "p"] and len(df) == 3


def test_heatmap_title_fits_and_emoji_labels_are_drawn():
    """Issue item 8: the heatmap's title is inside the figure, and an emoji label is written out, not an empty box."""
    from demo.handlers import _font_chars
    bank = MemoryBank.from_pairs([("🍕 food", "grub 🍝"), ("alarm", "wake-up ⏰"), ("alarm", "grub 🍝"),
                                  ("music", "tunes")] * 2)
    fig = handlers.heatmap(bank)
    fig.canvas.draw()
    ax = fig.axes[0]
    box, title = fig.bbox, ax.title.get_window_extent()
    assert ax.get_title() and title.x0 >= box.x0 - 1 and title.x1 <= box.x1 + 1
    drawn = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert "grub (spaghetti)" in drawn and "(slice of pizza) food" in drawn
    assert all(ord(ch) in _font_chars() for t in drawn for ch in t), drawn


def test_small_wording():
    """Issue item 8: p is never a bare 0, counts agree in number."""
    assert handlers.fmt_p(0.0) == "< 0.0001" and handlers.fmt_p(3e-5) == "< 0.0001"
    assert handlers.fmt_p(0.61) == "0.6100" and handlers.fmt_p(None) is None
    assert handlers._n(1, "label") == "1 label" and handlers._n(3, "label") == "3 labels"
    assert handlers.fmt_pct(0.4) == "40 %" and handlers.fmt_pct(1 / 3) == "33.3 %"
    state, *_rest, status, _preview = handlers.load_pasted("text,label\nhi,a\nyo,a\nhey,b\n", None)
    assert "2 labels" in status and "3 rows" in status
    off, on = handlers.downloads_ready(None, __file__)  # the page turns a download button on only with a file
    assert (off["interactive"], on["interactive"]) == (False, True)
    assert not handlers.cleared()[2].interactive and handlers.cleared()[2].value is None


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
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")
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
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")
    server = fake_openai({"q": "fix-it"})
    from cm_core.backends.base import GenRequest
    with deploy.backend_for("openai", "fake-model", server.base_url, "") as llm:
        assert llm.generate([GenRequest.of([{"role": "user", "content": "q"}])]) == [["fix-it"]]
    assert server.auth_headers and all("OWNER" not in h for h in server.auth_headers)


@pytest.mark.parametrize("public", [True, False])
@pytest.mark.parametrize("url_", ["http://127.0.0.1:8000/v1", "http://localhost/v1", "http://10.1.2.3/v1",
                                  "http://169.254.169.254/latest", "http://[::1]:8000/v1", "http://192.168.0.7/v1",
                                  "http://0.0.0.0:22/", "http://100.64.0.1/v1", "http://[fd00::1]/v1",
                                  "http://240.0.0.1/v1", "http://2130706433/v1", "http://no-such-host.invalid/v1"])
def test_every_deployment_refuses_private_base_urls(monkeypatch, url_, public):
    """Issue item 10: private, loopback, link-local and reserved addresses (and names that do not resolve, in the
    same words: no oracle) are refused on every deployment, public or not, unless the owner allows them."""
    monkeypatch.delenv("CM_DEMO_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("CM_DEMO_PUBLIC", "1" if public else "0")
    with pytest.raises(deploy.UserError, match="only to servers at public internet addresses"):
        deploy.check_base_url(url_)
    if "invalid" not in url_:
        monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")  # the owner can allow a local server
        host, addresses = deploy.check_base_url(url_)
        assert addresses


def test_base_url_scheme_and_host_are_checked(monkeypatch):
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")
    assert deploy.check_base_url("http://127.0.0.1:8000/v1") == ("127.0.0.1", ["127.0.0.1"])  # vLLM / Ollama
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


# --------------------------------------------------------------------------- the model's own words (issue item 1)

WORD_OF = {"money stuff": "finance", "pet care": "animals", "fix-it": "repairs"}
MODEL_WORDS = "finance\nanimals\nrepairs\nweather\n"


def _gold(query: str) -> str | None:
    for t, y in ROWS + TEST_ROWS:
        if query == t or query.startswith(t):
            return y
    return None


def _words_responder(query, listed):
    """A model that knows its own words (finance, animals, repairs) but, asked among the user's labels, files pets
    under fix-it, even when re-asked between fix-it and pet care: zero-shot + CM cannot mend that, own words can."""
    gold = _gold(query) or "money stuff"
    if "finance" in listed:
        return WORD_OF[gold]
    return "fix-it" if gold == "pet care" and "fix-it" in listed else (gold if gold in listed else listed[0])


def test_model_words_files():
    """The example's vocabulary: plain MASSIVE scenario names that fit its eight request types; the generic list is
    all 18 scenario names of data/massive_scenario."""
    import json as _json
    from cm_core.upload import parse_words
    massive = sorted({_json.loads(line)["label"] for line in
                      (REPO / "data" / "massive_scenario" / "small.jsonl").read_text(encoding="utf-8").splitlines()})
    generic = parse_words(handlers.GENERIC_WORDS.read_text(encoding="utf-8"))
    example = parse_words(handlers.EXAMPLE_WORDS.read_text(encoding="utf-8"))
    assert sorted(generic) == massive and len(generic) == 18
    assert set(example) <= set(massive) and {"alarm", "weather", "music", "news", "calendar", "transport", "iot",
                                              "cooking"} <= set(example)


def test_auto_picks_the_base_that_wins_on_held_out_rows(fake_openai, tmp_path, monkeypatch):
    """Build with 'auto' builds both banks, compares their CM on the held-out rows and keeps the better, saying so
    in one sentence with numbers; a tie keeps zero-shot. Ask, evaluate and the per-row CSV follow the choice; a
    test row that looks like a formula reaches the CSV as text (issue item 7)."""
    import pandas as pd
    server = fake_openai(_words_responder)
    monkeypatch.setenv("CM_DEMO_CACHE_DIR", str(tmp_path / "demo-cache"))
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setattr(handlers, "N_BOOT", 100)
    backend = ("openai", "fake-model", server.base_url, "sk-fake-words-123456")
    noop = lambda *a, **k: None  # noqa: E731
    samples = tmp_path / "s.csv"
    samples.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in ROWS), encoding="utf-8")
    state, *_ = handlers.load_samples(str(samples), "", None)
    state, table, _fig, bank_dl, held_dl, status = handlers.build_bank(
        "text", "label", *backend, "auto", 0.75, 0.7, MODEL_WORDS, state, progress=noop)
    assert state["method"] == "own_words" and set(state["banks"]) == {"own_words", "zero_shot"}
    assert re.search(r"On your 6 held-out rows, the model's own words \+ CM got 100 % vs \d+(\.\d)? % for "
                     r"zero-shot over your labels \+ CM; (kNN|logistic regression) trained on the same 18 samples "
                     r"got \d+", status), status
    assert {r["model answer"] for r in _rows(table)} <= {"finance", "animals", "repairs", "weather"}
    assert _bank_of(bank_dl)["meta"]["responses"] == ["finance", "animals", "repairs", "weather"]
    argv = _shown_argv(status)
    assert argv[argv.index("--responses") + 1] == "model_words.txt" and "save the model" in status
    assert "own_words+cm,own_words+cm_soft,own_words+cm_em,zero_shot,knn,logreg" in argv
    base, cm, why, cands, scores, all_rows = handlers.ask("order more cat food today", *backend, state)
    assert (base, cm) == ("animals", "pet care") and why.startswith("map:") and "CM answered 'pet care'" in why
    assert {r["method"] for r in _rows(all_rows)} >= {"the model's own words (model alone)",
                                                       "the model's own words + CM", "zero-shot over your labels + CM"}
    test = tmp_path / "t.csv"
    test.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in TEST_ROWS)
                    + '"=HYPERLINK(""http://x"")",money stuff\n=1+1,money stuff\n', encoding="utf-8")
    ev_table, summary, per_row = handlers.evaluate_batch(str(test), "text", "label", *backend, state, progress=noop)
    methods = [r["method"] for r in _rows(ev_table)]
    assert methods[:5] == ["own_words", "own_words+cm", "own_words+cm_soft", "own_words+cm_em", "zero_shot"]
    assert summary.startswith("**On these 14 rows")
    raw = Path(_path(per_row)).read_text(encoding="utf-8")
    assert "\n\"'=HYPERLINK(\"\"http://x\"\")\"," in raw and "\n'=1+1," in raw and "\n=" not in raw
    assert pd.read_csv(_path(per_row))["own_words+cm"].tolist()[:3] == [y for _, y in TEST_ROWS[:3]]
    # the shown line, with the words saved as it says, repeats the evaluation number for number
    (tmp_path / "model_words.txt").write_text(MODEL_WORDS, encoding="utf-8")
    out = _run_shown(summary, {"s.csv": samples, "t.csv": test, "model_words.txt": tmp_path / "model_words.txt"},
                     tmp_path, tmp_path / "cli-cache")
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["config"]["responses"] == ["finance", "animals", "repairs", "weather"]
    assert {m: (handlers.pct(r["accuracy"]), handlers.fmt_p(r.get("p_value"))) for m, r in res["results"].items()
            if "accuracy" in r} == {r["method"]: (r["acc. %"], r["p vs base"]) for r in _rows(ev_table)}
    # and the bank's line (held-out rows) gives both banks of the build, count for count
    files = {"s.csv": samples, "held_out.csv": _path(held_dl), "model_words.txt": tmp_path / "model_words.txt"}
    res = json.loads(_run_shown(status, files, tmp_path, tmp_path / "cli-cache").read_text(encoding="utf-8"))
    assert {b: res["banks"][b]["bank"]["counts"] for b in ("own_words", "zero_shot")} == {
        b: bank["counts"] for b, bank in state["banks"].items()}

    # The other way round: the model's own words tell nothing (always "weather"), zero-shot is right: a tie or a
    # loss for the own words keeps zero-shot.
    server2 = fake_openai(lambda q, listed: "weather" if "finance" in listed else (_gold(q) or listed[0]))
    backend2 = ("openai", "fake-model-2", server2.base_url, "sk-fake-words-123456")
    state, *_rest, status = handlers.build_bank("text", "label", *backend2, "auto", 0.75, 0.7, MODEL_WORDS, state,
                                                progress=noop)
    assert state["method"] == "zero_shot" and "zero-shot over your labels + CM got 100 %" in status


# --------------------------------------------------------------------------- uploads a visitor gets wrong (item 5)

def _bank_json() -> str:
    return MemoryBank.from_pairs([("tunes", "tunes"), ("grub", "grub")], {"labels": ["grub", "tunes"]}).to_json()


@pytest.mark.parametrize("name,content,says", [
    ("empty.csv", b"", "is empty. Upload a file with a header row"),
    ("header.csv", b"text,label\n", "header row but no rows under it"),
    ("blank.csv", b"text,label\nwake me,alarm\nhi there,\n", "line 3: empty label.*needs your label"),
    ("broken.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b"\n', "line 2: malformed JSON.*one JSON object"),
    ("cells.csv", b"text,label\nwake me, now,alarm\nhi,x\n", "more cells than the header.*double quotes"),
    ("long.csv", b"text,label\n" + b"x" * 5000 + b",y\nhi,z\n", "5000 characters.*Shorten"),
    ("big.csv", b"text,label\n" + b"x" * (5 * 1024 * 1024) + b",y\n", "files over 5 MB are refused"),
    ("one_label.csv", b"text,label\nwake me,alarm\nhi,alarm\n", "only one distinct label"),
    ("memory_bank.json", None, "is a saved memory bank.*upload it in section 2"),
])
def test_bad_sample_files_say_what_to_do(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(_bank_json().encode() if content is None else content)
    with pytest.raises(app.gr.Error) as err:
        handlers.load_samples(str(path), "", None)
    msg = str(err.value.message if hasattr(err.value, "message") else err.value)
    assert re.search(says, msg, re.S), msg
    assert "Pick the right text and label columns" not in msg
    file_update, status = handlers.samples_upload_failed(str(path), {"raw": {"name": "old.csv"}})
    assert file_update.value is None  # the rejected file leaves the box
    assert status.startswith("⚠️") and "not loaded" in status and "old\\.csv" in status and "Loaded" not in status


def test_semicolons_are_read_and_columns_still_chosen(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("text;label;id\nwake me at six;wake-up buzz;1\nis it raining;sky report;2\n", encoding="utf-8")
    state, tcol, lcol, status, preview = handlers.load_samples(str(path), "", None)
    assert (tcol.value, lcol.value) == ("text", "label") and "2 rows" in status and "semicolons" in status
    assert _rows(preview)[0] == {"text": "wake me at six", "label": "wake-up buzz"}


@pytest.mark.parametrize("content,says,never", [
    (b"\x80\x04\x95\x10\x00\x00\x00", "not a memory bank: it is not UTF-8 text.*JSON text file", "Excel"),
    (json.dumps({"version": 1, "counts": {"a": {"b": 1}}}).encode(), 'no "format" entry', "None"),
    (json.dumps({"format": None}).encode(), 'its "format" is null', "None"),
    (b"text,label\nwake me,alarm\n", "looks like a table of samples.*section 1", "malformed"),
    (json.dumps([1, 2]).encode(), "holds a JSON list", "None"),
])
def test_bad_bank_files_say_what_they_are(tmp_path, content, says, never):
    path = tmp_path / "bank.json"
    path.write_bytes(content)
    with pytest.raises(app.gr.Error) as err:
        handlers.upload_bank(str(path), None, None, 1.0, "", None)
    msg = str(err.value.message if hasattr(err.value, "message") else err.value)
    assert re.search(says, msg, re.S) and never not in msg, msg
    file_update, status = handlers.bank_upload_failed(str(path), {"bank": {}})
    assert file_update.value is None and "not loaded" in status and "still in use" in status


def test_paste_loads_the_pasted_rows_not_the_file(tmp_path):
    """Issue item 4: 'Load pasted rows' reads the pasted text, whatever file sits in the upload box."""
    jsonl = tmp_path / "other.jsonl"
    jsonl.write_text('{"q": "x y z", "tag": "a"}\n{"q": "u v w", "tag": "b"}\n', encoding="utf-8")
    state, tcol, lcol, status, _ = handlers.load_pasted("text,label\nwake me,alarm\nrain,weather\n", None)
    assert state["raw"]["name"] == "pasted.csv" and (tcol.value, lcol.value) == ("text", "label")
    assert app.build_demo  # the page wires the paste button to load_pasted alone (tested in the browser)
    outputs = handlers.clear_after_paste("")
    assert outputs[-1] is None and len(outputs) == len(handlers.cleared()) + 3


# --------------------------------------------------------------------------- outbound connections (item 10)

def _trap_server(host: str, port: int = 0, status: int = 200, location: str | None = None):
    """A tiny HTTP server that records every request (and answers ``status``, with ``location``)."""
    import http.server
    hits: list[str] = []

    class H(http.server.BaseHTTPRequestHandler):
        def _any(self):
            hits.append(f"{self.command} {self.path} Host={self.headers.get('Host')}")
            body = b'{"choices": []}'
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _any

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((host, port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, hits


def _chat(llm):
    from cm_core.backends.base import GenRequest
    return llm.generate([GenRequest.of([{"role": "user", "content": "Query: q"}])])


def test_connection_is_pinned_to_the_checked_address(monkeypatch, fake_openai):
    """The name is resolved once, by the check; the connection goes to that address even when the name would later
    resolve elsewhere (DNS rebinding), and the Host header keeps the name."""
    import socket
    server = fake_openai({"q": "fix-it"})
    port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
    trap, hits = _trap_server("127.0.0.2", port)  # where a second lookup would lead
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("CM_DEMO_RESPONSE_CACHE", "0")
    checked = []
    monkeypatch.setattr(deploy, "_resolve", lambda host, port: checked.append(host) or ["127.0.0.1"])
    real = socket.getaddrinfo
    lookups = []

    def rebinding(host, *a, **k):  # after the check, the name points at the trap
        if host == "model.example":
            lookups.append(host)
            return real("127.0.0.2", *a, **k)
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        with deploy.backend_for("openai", "m", f"http://model.example:{port}/v1", "sk-pin-123456") as llm:
            assert _chat(llm) == [["fix-it"]]
    finally:
        trap.shutdown()
    assert checked == ["model.example"] and lookups == [] and hits == []


def test_public_check_then_rebinding_to_a_private_address_fails_closed(monkeypatch):
    """In the default mode a name must resolve to public addresses; the client then connects only there, so a
    rebinding to 127.0.0.1 afterwards reaches nothing local."""
    import socket
    trap, hits = _trap_server("127.0.0.1")
    port = trap.server_address[1]
    monkeypatch.delenv("CM_DEMO_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.setenv("CM_DEMO_RESPONSE_CACHE", "0")
    monkeypatch.setattr(deploy, "_resolve", lambda host, port: ["198.51.100.7"] if host == "evil.example" else [])
    with pytest.raises(deploy.UserError, match="public internet"):  # 198.51.100.0/24 is reserved: refused
        deploy.check_base_url(f"http://evil.example:{port}/v1")
    monkeypatch.setattr(deploy, "_resolve", lambda host, port: ["8.8.8.8"])
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1" if host == "evil.example"
                                                                           else host, *a, **k))
    connected = []

    async def refuse(self, host, port, **kw):  # the pinned address is never dialled for real in a test
        connected.append(host)
        raise OSError("unreachable in the test")

    hx, hc = deploy._http_modules()
    monkeypatch.setattr(hc.AnyIOBackend, "connect_tcp", refuse)
    try:
        with deploy.backend_for("openai", "m", f"http://evil.example:{port}/v1", "sk-pin-123456") as llm:
            with pytest.raises(BackendError, match="cannot connect"):
                _chat(llm)
    finally:
        trap.shutdown()
    assert hits == [] and set(connected) == {"8.8.8.8"}


def test_redirects_are_not_followed(monkeypatch):
    """A server that answers with a redirect to a private address: the redirect is not followed."""
    target, target_hits = _trap_server("127.0.0.1")
    redirector, hits = _trap_server("127.0.0.1", status=307,
                                    location=f"http://127.0.0.1:{target.server_address[1]}/v1/chat/completions")
    monkeypatch.setenv("CM_DEMO_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("CM_DEMO_RESPONSE_CACHE", "0")
    try:
        with deploy.backend_for("openai", "m", f"http://127.0.0.1:{redirector.server_address[1]}/v1",
                                "sk-redirect-123456") as llm:
            with pytest.raises(BackendError, match="HTTP 307"):
                _chat(llm)
    finally:
        target.shutdown()
        redirector.shutdown()
    assert hits and target_hits == []


# --------------------------------------------------------------------------- the model at start-up (item 2)

def test_a_build_waiting_for_the_model_says_why(monkeypatch, tmp_path):
    import collections
    import time as _time
    monkeypatch.setenv("CM_DEMO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(deploy, "_PREPARING", {})
    monkeypatch.setattr(deploy, "_BACKENDS", collections.OrderedDict())
    monkeypatch.setattr(deploy, "needs_conversion", lambda spec: True)
    monkeypatch.setattr(deploy, "_load_model", lambda spec, persistent: _time.sleep(1.6) or "MODEL")
    seen = []
    deploy.wait_for_model("embedded", "", lambda frac, desc=None: seen.append((frac, desc)))
    assert seen and all(0 <= f < 1 for f, _ in seen)
    assert all(d.startswith("preparing the model, first run only") for _, d in seen), seen
    assert deploy.prepare("embedded", "").result() == "MODEL"  # the same future: loaded once


def test_build_waits_for_the_model_with_its_own_progress(monkeypatch):
    """Build asks for the model through wait_for_model, with the page's progress, before anything else runs."""
    seen = []

    def waiting(backend, model, progress):
        progress(0.1, desc="preparing the model, first run only (a one-time conversion, about 30 s): 3 s")
        seen.append((backend, model))
        raise deploy.UserError("stop here")

    monkeypatch.setattr(deploy, "wait_for_model", waiting)
    descs = []
    state, *_ = handlers.load_pasted("text,label\nwake me,alarm\nrain today,weather\n", None)
    with pytest.raises(app.gr.Error, match="stop here"):
        handlers.build_bank("text", "label", *EMBEDDED, "zero_shot", 1.0, 0.7, "", state,
                            progress=lambda frac, desc=None: descs.append(desc))
    assert seen == [("embedded", "")] and descs[0].startswith("preparing the model, first run only")


def test_the_app_prepares_the_model_when_it_starts(monkeypatch):
    calls = []
    monkeypatch.setattr(deploy, "prepare_at_startup", lambda: calls.append("prepare"))
    monkeypatch.setattr(app.gr.Blocks, "launch", lambda self, **kw: calls.append("launch"))
    app.main()
    assert calls == ["prepare", "launch"]


def test_spreadsheet_safe():
    import pandas as pd
    from cm_core.report import spreadsheet_safe
    df = pd.DataFrame({"text": ['=HYPERLINK("http://x")', "=1+1", "+3", "@SUM(A1)", "-2", "\tx", "plain"],
                       "n": [1, 2, 3, 4, 5, 6, 7]})
    out = spreadsheet_safe(df)
    assert out["text"].tolist() == ["'=HYPERLINK(\"http://x\")", "'=1+1", "'+3", "'@SUM(A1)", "'-2", "'\tx", "plain"]
    assert out["n"].tolist() == df["n"].tolist() and df["text"][0].startswith("=")  # a copy; numbers untouched
