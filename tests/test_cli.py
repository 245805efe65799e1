"""The command line: evaluate writes a results JSON, estimate + predict round-trip a bank, bad input exits 2
with a one-line message and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cm_core.bank import MemoryBank
from cm_core.cli import main
from cm_core.data import load_file
from cm_core.evaluate import accuracy

from conftest import REPO

LABELS = ("alarm", "weather", "cooking", "transport")


@pytest.fixture(scope="module")
def tiny(data_dir, tmp_path_factory):
    """60 rows of massive_scenario, 15 for each of 4 labels, written to a tmp jsonl (read from shared/)."""
    counts = {lab: 0 for lab in LABELS}
    rows = []
    with open(data_dir / "massive_scenario" / "small.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["label"] in counts and counts[r["label"]] < 15:
                counts[r["label"]] += 1
                rows.append(r)
    path = tmp_path_factory.mktemp("cli") / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(args, tmp_path, timeout=540) -> subprocess.CompletedProcess:
    env = {**os.environ, "CM_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "cm_core", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_evaluate_baselines_writes_results(tiny, tmp_path):
    out = tmp_path / "out" / "results.json"
    r = _run(["evaluate", "--dataset", str(tiny), "--model", "embedded", "--methods", "label_similarity,knn,logreg",
              "--n-test", "20", "--pref-count", "20", "--cache-dir", str(tmp_path / "cache"), "--output", str(out)],
             tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text(encoding="utf-8"))
    assert set(res) >= {"version", "config", "results", "banks", "gold", "texts", "predictions", "run"}
    cfg = res["config"]
    assert cfg["protocol"] == "ours"
    assert cfg["n_test"] == 20 and cfg["pref_count"] == 20 and cfg["seed"] == 40 and cfg["dataset"] == "tiny"
    assert cfg["n_labels"] == 4 and cfg["model"] is None  # baselines only: no LLM was loaded
    assert set(res["results"]) == {"label_similarity", "label_similarity+cm", "knn", "knn+cm", "logreg", "logreg+cm"}
    assert len(res["gold"]) == len(res["texts"]) == 20 and set(res["gold"]) <= set(LABELS)
    for name, r_ in res["results"].items():
        preds = res["predictions"][name]
        assert r_["accuracy"] == pytest.approx(accuracy(res["gold"], preds))  # recomputable from the file
        assert r_["ci95"][0] <= r_["accuracy"] <= r_["ci95"][1] and r_["n"] == 20
        assert 0 <= r_["macro_f1"] <= 1 and r_["kind"] == "baseline"
        if name.endswith("+cm"):
            assert 0 <= r_["p_value"] <= 1 and r_["base"] == name[:-3]
            assert sum(r_["actions"].values()) == 20
    for base in ("label_similarity", "knn", "logreg"):
        assert res["banks"][base]["stats"]["samples"] == 20
    # the printed table names every method
    for name in res["results"]:
        assert name in r.stdout
    assert f"wrote {out}" in r.stdout


def test_estimate_then_predict_round_trip(tiny, tmp_path, capsys):
    bank_path = tmp_path / "bank.json"
    rc = main(["estimate", "--dataset", str(tiny), "--method", "label_similarity", "--all-samples",
               "--cache-dir", str(tmp_path / "cache"), "--output", str(bank_path)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    bank = MemoryBank.from_json(bank_path)
    ds = load_file(tiny)
    assert printed["output"] == str(bank_path) and printed["samples"] == len(ds) == bank.n_samples
    assert bank.meta["labels"] == ds.labels and bank.meta["base_method"] == "label_similarity"
    assert {lab for row in bank.counts.values() for lab in row} <= set(ds.labels)

    queries = tmp_path / "queries.txt"
    texts = ds.texts[:6] + ["what time does the bakery open tomorrow"]
    queries.write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    preds_path = tmp_path / "preds.jsonl"
    rc = main(["predict", "--bank", str(bank_path), "--input", str(queries), "--method", "label_similarity+cm",
               "--cache-dir", str(tmp_path / "cache"), "--output", str(preds_path)])
    assert rc == 0
    rows = [json.loads(line) for line in preds_path.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == texts  # one row per query, blank lines skipped, order kept
    for r in rows:
        assert r["answer"] in ds.labels and r["base"] in ds.labels
        cands = bank.candidates(r["base"])
        if not cands:
            assert r["action"] == "keep" and r["answer"] == r["base"]
        elif len(cands) == 1:
            assert r["action"] == "map" and r["answer"] == next(iter(cands))
        else:
            assert r["action"] == "choose" and r["answer"] in cands
        assert r["candidates"] == (cands or {})


def test_evaluate_zero_shot_against_an_openai_compatible_server(tiny, tmp_path, fake_openai):
    gold = {e.text: e.label for e in load_file(tiny).examples}
    server = fake_openai(lambda query, listed: gold[query])  # an oracle: the CLI plumbing is under test here
    out = tmp_path / "res.json"
    r = _run(["evaluate", "--dataset", str(tiny), "--model", "openai:oracle", "--base-url", server.base_url,
              "--methods", "zero_shot", "--n-test", "12", "--pref-count", "8", "--cache-dir", str(tmp_path / "c"),
              "--output", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["config"]["scoring"] == "generation-fallback"
    assert res["config"]["model"]["model"] == "oracle"
    assert res["results"]["zero_shot"]["accuracy"] == 1.0 and res["results"]["zero_shot+cm"]["accuracy"] == 1.0
    assert server.requests and all(b["model"] == "oracle" for b in server.requests)
    # --concurrency reaches the backend: with a slow server, 16 requests overlap up to the bound
    slow = fake_openai(lambda query, listed: gold[query], delay=0.2)
    r = _run(["evaluate", "--dataset", str(tiny), "--model", "openai:oracle", "--base-url", slow.base_url,
              "--methods", "zero_shot", "--n-test", "12", "--pref-count", "8", "--concurrency", "16", "--no-cache",
              "--output", str(tmp_path / "res2.json")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert 8 < slow.max_in_flight <= 16


def _assert_one_line_error(rc, stdout, stderr, *needles):
    assert rc == 2, (stdout, stderr)
    err = stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in stderr and "Traceback" not in stdout
    for n in needles:
        assert n in err, err


def test_missing_dataset_file_exits_2(tmp_path):
    r = _run(["evaluate", "--dataset", str(tmp_path / "missing.jsonl"), "--methods", "knn"], tmp_path)
    _assert_one_line_error(r.returncode, r.stdout, r.stderr, "missing.jsonl")


# the remaining bad inputs go through main() in-process (the same code path, without a new interpreter each)

def _main(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_unknown_method(tiny, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc, so, se = _main(["evaluate", "--dataset", str(tiny), "--methods", "knn,telepathy", "--output", str(out)], capsys)
    _assert_one_line_error(rc, so, se, "unknown method 'telepathy'")
    assert not out.exists()
    bank = tmp_path / "bank.json"
    MemoryBank.from_pairs([("alarm", "alarm")], meta={"labels": list(LABELS)}).to_json(bank)
    rc, so, se = _main(["predict", "--bank", str(bank), "--input", str(tiny), "--method", "zero_shot+cm_extra"],
                       capsys)
    _assert_one_line_error(rc, so, se, "unknown method 'zero_shot+cm_extra'")


def test_bad_concurrency(tiny, capsys):
    rc, so, se = _main(["evaluate", "--dataset", str(tiny), "--concurrency", "0"], capsys)
    _assert_one_line_error(rc, so, se, "--concurrency must be at least 1")


def test_missing_bank_file(tiny, tmp_path, capsys):
    rc, so, se = _main(["predict", "--bank", str(tmp_path / "none.json"), "--input", str(tiny)], capsys)
    _assert_one_line_error(rc, so, se, "none.json", "not found")


def test_malformed_data_and_bank(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "label": "x"}\n{"input": "b", "label"\n', encoding="utf-8")
    rc, so, se = _main(["estimate", "--dataset", str(bad), "--method", "label_similarity", "--all-samples",
                        "--output", str(tmp_path / "b.json")], capsys)
    _assert_one_line_error(rc, so, se, "bad.jsonl", "line 2")
    bank = tmp_path / "bank.json"
    bank.write_text('{"format": "cm-memory-bank", "version": 99, "counts": {}}', encoding="utf-8")
    q = tmp_path / "q.txt"
    q.write_text("hello\n", encoding="utf-8")
    rc, so, se = _main(["predict", "--bank", str(bank), "--input", str(q)], capsys)
    _assert_one_line_error(rc, so, se, "bank.json", "version 99")


# --------------------------------------------------------------------------- --protocol paper

@pytest.mark.parametrize("flags", [["--decoding", "generate"], ["--decoding", "score"], ["--list-labels"],
                                   ["--no-list-labels"], ["--no-calibrate"], ["--stratified"],
                                   ["--test-file", "x.jsonl"], ["--pref-count", "5"], ["--test-fraction", "0.5"],
                                   ["--temperature", "0.7"]])
def test_paper_protocol_refuses_our_flags(flags, tmp_path, capsys):
    """Flags the paper protocol would silently ignore are errors that name the flag (before any model loads)."""
    out = tmp_path / "r.json"
    rc, so, se = _main(["evaluate", "--protocol", "paper", "--dataset", "banking77", "--methods", "zero_shot",
                        *flags, "--output", str(out)], capsys)
    _assert_one_line_error(rc, so, se, flags[0].replace("--no-list", "--list"), "--protocol paper")
    assert not out.exists()


def test_protocol_specific_flags_and_methods(tiny, tmp_path, capsys):
    rc, so, se = _main(["evaluate", "--dataset", str(tiny), "--methods", "knn", "--n-test-other", "5"], capsys)
    _assert_one_line_error(rc, so, se, "--n-test-other does not apply to --protocol ours")
    rc, so, se = _main(["evaluate", "--protocol", "paper", "--dataset", "banking77", "--methods", "knn"], capsys)
    _assert_one_line_error(rc, so, se, "'knn' (a method of our protocol) is not in the paper protocol",
                           "zero_shot, few_shot, cot, self_consistency, self_refine")
    rc, so, se = _main(["estimate", "--protocol", "paper", "--dataset", "banking77", "--all-samples"], capsys)
    _assert_one_line_error(rc, so, se, "--all-samples does not apply")


@pytest.mark.parametrize("name, data, needle", [
    ("missing.json", None, "not found"),
    ("bank.pkl", b"\x80\x04\x95\x10\x00", "a pickle file"),
    ("pickled.json", b"\x80\x04}\x94.", "a pickle file"),
    ("empty.json", b"{}", "empty bank"),
    ("shape.json", b'{"card arrival": 3}', "must be a non-empty list of label strings"),
    ("text.json", b"card arrival: [card arrival]", "malformed JSON"),
])
def test_paper_bank_file_errors(name, data, needle, tmp_path, capsys):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    rc, so, se = _main(["evaluate", "--protocol", "paper", "--dataset", "banking77", "--methods",
                        "zero_shot+cm_paper", "--bank", str(path), "--output", str(tmp_path / "r.json")], capsys)
    _assert_one_line_error(rc, so, se, name, needle)


def test_paper_estimate_then_evaluate_with_that_bank(tmp_path, fake_openai, capsys):
    """The paper's one bank from `estimate --protocol paper`, given back to `evaluate --protocol paper --bank`: no
    bank is estimated again, and the run uses the GPT runs' prompt shape on an openai backend."""
    server = fake_openai(lambda query, listed: "{'card arrival'}")
    common = ["--protocol", "paper", "--dataset", "banking77", "--model", "openai:gpt-4o-mini", "--base-url",
              server.base_url, "--cache-dir", str(tmp_path / "cache")]
    bank_path = tmp_path / "bank.json"
    assert main(["estimate", *common, "--output", str(bank_path)]) == 0
    capsys.readouterr()
    bank = MemoryBank.from_json(bank_path)
    assert bank.meta["protocol"] == "paper" and bank.n_samples == 100 and bank.meta["pref_fraction"] == 0.01
    assert len(server.requests) == 100 and all(b["max_tokens"] == 30 for b in server.requests)
    out = tmp_path / "res.json"
    assert main(["evaluate", *common, "--methods", "zero_shot+cm", "--n-test", "6", "--bank", str(bank_path),
                 "--output", str(out)]) == 0
    assert "protocol=paper" in capsys.readouterr().out
    res = json.loads(out.read_text(encoding="utf-8"))
    cfg = res["config"]
    assert cfg["protocol"] == "paper" and cfg["bank_given"] and cfg["prompt_shape"] == "gpt"
    assert any("GPT runs test all of small" in d for d in cfg["departures"])
    asked, reasked = server.requests[100:106], server.requests[106:]  # 6 zero-shot answers, 6 re-asks
    assert all(b["max_tokens"] == 10 and b["messages"][0]["role"] == "user" for b in asked)
    assert len(reasked) == 6 and all(b["max_tokens"] == 20 for b in reasked)
    assert all("Considering the following query" in b["messages"][0]["content"] for b in reasked)
    # every preference row answered 'card arrival': one entry, many candidates, so every answer is re-asked
    assert res["results"]["zero_shot+cm"]["actions"] == {"choose": 6}


def test_own_words_with_a_response_file_on_a_fake_backend(tmp_path, fake_openai, capsys):
    """--responses gives own_words the model's vocabulary; the bank maps its words onto the file's labels, and the
    results JSON records the vocabulary."""
    import json as _json
    words = {"alarm": "wake-up buzz", "weather": "sky report", "music": "tunes"}
    rows = [(f"{w} request number {i}", u) for i in range(10) for w, u in words.items()]
    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f"{t},{u}\n" for t, u in rows), encoding="utf-8")
    vocab = tmp_path / "words.txt"
    vocab.write_text("alarm\nweather\nmusic\n", encoding="utf-8")
    # a generation-only server: the model says the word of its vocabulary that the query contains
    server = fake_openai(lambda query, listed: next((w for w in listed if w.split()[0] in query), listed[0])
                         if listed else "none")
    out = tmp_path / "res.json"
    rc = main(["evaluate", "--dataset", str(data), "--model", "openai:fake", "--base-url", server.base_url,
               "--methods", "own_words,own_words+cm", "--responses", str(vocab), "--pref-fraction", "0.3",
               "--n-test", "12", "--cache-dir", str(tmp_path / "cache"), "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = _json.loads(out.read_text(encoding="utf-8"))
    assert res["config"]["responses"] == ["alarm", "weather", "music"]
    assert res["results"]["own_words"]["accuracy"] == 0.0  # its words are never the user's labels
    assert res["results"]["own_words+cm"]["accuracy"] == 1.0  # the bank maps each onto the user's
    assert res["banks"]["own_words"]["bank"]["counts"]["alarm"] == {"wake-up buzz": 9} or \
        set(res["banks"]["own_words"]["bank"]["counts"]["alarm"]) == {"wake-up buzz"}
    assert main(["evaluate", "--dataset", str(data), "--methods", "knn", "--responses", str(tmp_path / "none.txt"),
                 "--output", str(tmp_path / "x.json")]) == 2


def test_no_bank_for_a_method_trained_on_the_samples(tiny, tmp_path, capsys):
    out = tmp_path / "bank.json"
    rc, so, se = _main(["estimate", "--dataset", str(tiny), "--method", "setfit", "--all-samples",
                        "--output", str(out)], capsys)
    _assert_one_line_error(rc, so, se, "setfit is trained on the preference samples themselves")
    assert not out.exists()
