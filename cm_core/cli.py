"""Command line: ``python -m cm_core {estimate,predict,evaluate}``. A thin layer over the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import registry
from .backends import DEFAULT_CACHE_DIR, check_base_url, make_backend
from .backends.openai_backend import DEADLINE_FACTOR, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from .bank import MemoryBank
from .cm import estimate_bank
from .data import Split, load_dataset, load_file, read_lines, split_dataset
from .misalign import SCHEMES, misaligned
from .errors import CMError, run_command
from .evaluate import run_evaluation
from .methods import Decoding
from .paper import PAPER_DECODING, paper_split
from .paper_methods import PaperBank, load_bank


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="embedded | openai:MODEL | hf:ID_OR_PATH (default: embedded)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="response cache and materialized models")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    p.add_argument("--decoding", choices=["score", "generate"], default=None,
                   help="score (default): rank labels by log-probability; generate: sample text and clean it")
    p.add_argument("--no-calibrate", action="store_true", help="do not calibrate scores on a content-free input")
    p.add_argument("--list-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="show all candidate labels in the prompt (the paper's prompt; slower on CPU). Default: only "
                        "when the model must write a label itself (generation)")
    p.add_argument("--seed", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight at once (openai backends; e.g. 64 against a vLLM server)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"openai backends: limit on each attempt, the whole reply (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES, metavar="N",
                   help="openai backends: retries of an attempt that failed (timeout, HTTP 429/5xx, a garbled reply "
                        f"or one without text), with exponential back-off (default {DEFAULT_MAX_RETRIES})")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="openai backends: limit on one request, all its attempts and waits included; past it the "
                        f"query fails (default {DEADLINE_FACTOR} x --timeout)")
    p.add_argument("--chat-template", default=None, metavar="NAME_OR_FILE",
                   help="openai backends: the served model's chat template (chatml, llama3 or a Jinja file), used to "
                        "score labels through the server's completions endpoint; checked against the server's own. "
                        "Default: chatml and llama3 are tried")
    p.add_argument("--max-failed-fraction", type=float, default=0.0, metavar="F",
                   help="share of LLM queries that may fail for good (after their retries; each counts as a wrong "
                        "answer and is never cached, so a re-run asks it again) before the command exits with "
                        "status 2, after writing its output. Default 0: any failed query is an error")
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--responses", default=None, metavar="FILE",
                   help="own_words: the model's own vocabulary, one name per line (e.g. a dataset's original label "
                        "names); CM maps its answers onto your labels")
    p.add_argument("-v", "--verbose", action="store_true")


def _decoding(a) -> Decoding:
    # a batch is what a local model computes at once; a streaming backend (openai) is handed every request of a
    # step by the chooser and keeps --concurrency of them in flight (LLM.streams_requests)
    return Decoding(mode=a.decoding or "score", calibrate=not a.no_calibrate, list_labels=a.list_labels, seed=a.seed,
                    batch_size=max(8, a.concurrency))


# Our protocol's flags: the paper protocol fixes what they set, so giving one there is an error, not a silent no-op.
OURS_ONLY = {"decoding": "--decoding", "list_labels": "--list-labels", "no_calibrate": "--no-calibrate",
             "stratified": "--stratified", "test_file": "--test-file", "pref_count": "--pref-count",
             "test_fraction": "--test-fraction", "temperature": "--temperature", "all_samples": "--all-samples",
             "text_column": "--text-column", "label_column": "--label-column", "rename": "--rename"}
PAPER_ONLY = {"n_test_other": "--n-test-other"}
SWITCHES = {"no_calibrate", "stratified", "all_samples"}  # store_true: False means "not given"; the others: None
DEFAULT_PREF_FRACTION = {"ours": 0.05, "paper": 0.01}  # paper: the Llama runs' 1 %


def _check_protocol_flags(a) -> None:
    """Refuse a flag the chosen protocol would ignore."""
    other = OURS_ONLY if a.protocol == "paper" else PAPER_ONLY
    for dest, flag in other.items():
        value = getattr(a, dest, None)
        if (value is True) if dest in SWITCHES else (value is not None):
            raise CMError(f"{flag} does not apply to --protocol {a.protocol}"
                          + (" (the official protocol fixes it)" if a.protocol == "paper" else ""))
    if a.pref_fraction is None:
        a.pref_fraction = DEFAULT_PREF_FRACTION[a.protocol]


def _backend(a):
    kw = {"concurrency": a.concurrency, "timeout": a.timeout, "max_retries": a.max_retries,
          "deadline": a.deadline, "chat_template": a.chat_template} if a.model.startswith("openai:") else {}
    llm = make_backend(a.model, cache_dir=a.cache_dir, use_cache=not a.no_cache, base_url=a.base_url, **kw)
    vars(a).setdefault("opened_backends", []).append(llm)  # main closes it on every exit path
    return llm


def _dataset(a, path_or_name: str):
    return load_dataset(path_or_name, **({"text_column": a.text_column} if a.text_column else {}),
                        **({"label_column": a.label_column} if a.label_column else {}))


def _backend_for(a, names) -> object | None:
    """The LLM backend, built only when one of the methods needs it (after every name was checked)."""
    return _backend(a) if any(registry.needs_llm(n) for n in names) else None


def cmd_estimate(a) -> dict:
    _check_protocol_flags(a)
    if a.protocol == "paper":
        return _estimate_paper(a)
    base_name, _ = registry.split_method_name(a.method)
    if not registry.supports_cm(base_name):
        raise CMError(f"{base_name} is trained on the preference samples themselves: a bank of its answers to them "
                      "would be an identity, so no bank is estimated for it")
    ds = _dataset(a, a.dataset)
    if a.all_samples:
        samples = ds.examples
    else:
        samples = split_dataset(ds, pref_fraction=a.pref_fraction, pref_count=a.pref_count, seed=a.seed,
                                stratified=a.stratified).preference.examples
    llm = _backend_for(a, [a.method])
    base = registry.build(a.method, labels=ds.labels, llm=llm, decoding=_decoding(a), **_responses(a)).fit(samples)
    bank = estimate_bank(base, samples, 0.7 if a.temperature is None else a.temperature, a.seed)
    bank.meta.update({"dataset": ds.name, "labels": ds.labels, "protocol": "ours"})
    return _write_bank(bank, a.output)


def _estimate_paper(a) -> dict:
    """The paper's one bank: the bank prompt's answers on the official preference rows (MBE)."""
    if a.method != "zero_shot":
        raise CMError("the paper protocol has one bank, made with the bank prompt (zero-shot): drop --method")
    from .data import data_dir
    small, large = data_dir() / a.dataset / "small.jsonl", data_dir() / a.dataset / "large.jsonl"
    if not small.is_file():
        raise CMError(f"the paper protocol runs on the paper's datasets; {small} does not exist")
    pref, _, info = paper_split(small, large if large.is_file() else None, a.pref_fraction, a.seed)
    estimator = PaperBank(_backend(a), info["labels"], dataset=a.dataset, seed=a.seed)
    bank = estimate_bank(estimator, pref, PAPER_DECODING["llama_bank"].temperature, a.seed)
    bank.meta.update({"dataset": a.dataset, "labels": info["labels"], "protocol": "paper",
                      "pref_fraction": a.pref_fraction, "departures": info["departures"]})
    return _write_bank(bank, a.output)


def _write_bank(bank: MemoryBank, output: str) -> dict:
    bank.to_json(output)
    stats = bank.stats()
    print(json.dumps({"output": output, **stats}, indent=2))
    return stats


def _responses(a) -> dict:
    """``responses=`` for own_words, from --responses FILE (one of the model's own names per line)."""
    return {"responses": read_lines(a.responses, "responses")} if getattr(a, "responses", None) else {}


def _read_queries(path: str, text_column: str | None) -> list[str]:
    p = Path(path)
    if p.suffix.lower() in (".txt", ""):
        return read_lines(p, "queries")
    return load_file(p, text_column=text_column).texts


def cmd_predict(a) -> list[dict]:
    bank = MemoryBank.from_json(Path(a.bank))
    labels = bank.meta.get("labels")
    if a.dataset:
        labels = _dataset(a, a.dataset).labels
    if not labels:
        raise CMError("no label set: pass --dataset (a file or name) or use a bank written by `estimate`")
    name = a.method if registry.split_method_name(a.method)[1] else a.method + "+cm"
    samples = []
    if a.samples:
        samples = load_file(a.samples, text_column=a.text_column, label_column=a.label_column).examples
    elif registry.needs_samples(name, bank_given=True):
        raise CMError(f"{registry.split_method_name(name)[0]} needs the preference samples: pass --samples FILE")
    cm = registry.build(name, labels=labels, llm=_backend_for(a, [name]), decoding=_decoding(a), bank=bank,
                        **_responses(a))
    cm.fit(samples)
    queries = _read_queries(a.input, a.text_column)
    rows = [{"text": q, "base": p.info.get("base"), "answer": p.label, "action": p.info.get("action"),
             "candidates": p.info.get("candidates")} for q, p in zip(queries, cm.predict(queries))]
    out = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    if a.output:
        Path(a.output).write_text(out, encoding="utf-8")
    else:
        sys.stdout.write(out)
    return rows


def cmd_evaluate(a) -> dict:
    _check_protocol_flags(a)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        registry.split_method_name(m, a.protocol)  # fail fast on a typo, before loading any model
    if a.protocol == "paper":
        bank = load_bank(a.bank) if a.bank else None  # the official JSON {answer: [labels]} or estimate's
        res = run_evaluation(a.dataset, _backend(a), methods, protocol="paper", pref_fraction=a.pref_fraction,
                             n_test=a.n_test, n_test_other=a.n_test_other, seed=a.seed, bank=bank)
        return _report(a, res)
    ds = _dataset(a, a.dataset)
    responses = _responses(a)
    if a.rename:  # the vocabulary-misalignment setting: the user's names renamed, the model keeps the originals
        if a.test_file:
            raise CMError("--rename renames --dataset's labels; a --test-file would still carry the original names")
        ds, original = misaligned(ds, a.rename)
        responses = responses or {"responses": original}
    test_fraction = 0.5 if a.test_fraction is None else a.test_fraction
    split = None
    if a.test_file:  # the preference samples come from --dataset, the test rows from this file
        test = load_file(a.test_file, text_column=a.text_column, label_column=a.label_column, labels=ds.labels)
        pref = ds if a.pref_count is None and a.pref_fraction >= 1 else split_dataset(
            ds, pref_fraction=a.pref_fraction, pref_count=a.pref_count, seed=a.seed, test_fraction=0.0).preference
        split = Split(pref, test if a.n_test is None else test.subset(test.examples[:a.n_test], "test"), a.seed)
    bank = MemoryBank.from_json(Path(a.bank)) if a.bank else None
    if split is None:  # split here: a dataset too small for the split fails before any backend or model is built
        split = split_dataset(ds, pref_fraction=a.pref_fraction, pref_count=a.pref_count, n_test=a.n_test,
                              seed=a.seed, stratified=a.stratified, test_fraction=test_fraction)
    _check_split(ds, split, bank_given=bank is not None)
    llm = _backend_for(a, methods)
    res = run_evaluation(ds, llm, methods, pref_fraction=a.pref_fraction, pref_count=a.pref_count,
                         n_test=a.n_test, seed=a.seed, stratified=a.stratified,
                         bank_temperature=0.7 if a.temperature is None else a.temperature,
                         decoding=_decoding(a), bank=bank, split=split, test_fraction=test_fraction,
                         **responses)
    res["config"]["rename"] = a.rename
    return _report(a, res)


def _report(a, res: dict) -> dict:
    """Write the results JSON and print the accuracy table."""
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(res, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"{'method':28s} {'acc':>6s} {'95% CI':>15s} {'macroF1':>8s} {'p':>7s}")
    for name, r in res["results"].items():
        if "skipped" in r:
            print(f"{name:28s} skipped: {r['skipped']}")
            continue
        p = f"{r['p_value']:.3g}" if r.get("p_value") is not None else ""
        print(f"{name:28s} {r['accuracy']:6.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] {r['macro_f1']:8.3f} {p:>7s}")
    print(f"wrote {a.output} (protocol={res['config']['protocol']}, n_test={res['config']['n_test']}, preference "
          f"samples={res['config']['pref_count']}, {res['run']['wall_time_s']}s)")
    failed = res["run"].get("failed_queries") or {}
    if failed.get("total"):
        steps = ", ".join(f"{k} {v}" for k, v in failed.items() if v and k != "total")
        print(f"failed LLM queries (each counts as a wrong answer): {failed['total']} ({steps})")
    return res


MIN_TEST_ROWS, MIN_PREF_SAMPLES = 5, 2


def _check_split(ds, split: Split, bank_given: bool = False) -> None:
    """Refuse a dataset or split no evaluation can mean anything on, before any backend or model is built."""
    if len(ds.labels) < 2:
        raise CMError(f"{ds.name} has {len(ds.labels)} label ({', '.join(map(repr, ds.labels))}); an evaluation "
                      "needs at least 2")
    if len(split.test) < MIN_TEST_ROWS:
        raise CMError(f"{ds.name}: the test split has {len(split.test)} rows ({len(ds)} rows in all); accuracy, "
                      f"its CI and p-values need at least {MIN_TEST_ROWS}: use more rows, --test-fraction or "
                      "--test-file")
    if not bank_given and len(split.preference) < MIN_PREF_SAMPLES:
        raise CMError(f"{ds.name}: {len(split.preference)} preference sample for the memory bank; it needs at least "
                      f"{MIN_PREF_SAMPLES}: raise --pref-count or --pref-fraction")


PROTOCOL_HELP = ("ours (default): calibrated scoring, soft CM, de-duplicated splits; paper: the official experiment "
                 "(official splits, prompts, decoding, strict scoring, one zero-shot bank; +cm_paper as coded, +cm "
                 "as the formula reads, +cm_shrunk the formula over the shrunk bank, this project's addition)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cm_core", description="Consistent Marginalization: personalize an "
                                 "LLM's answers to one user's labels from a few preference samples.")
    sub = ap.add_subparsers(dest="command", required=True)

    e = sub.add_parser("estimate", help="estimate a memory bank from preference samples")
    _common(e)
    e.add_argument("--dataset", required=True, help="file (jsonl/csv) or dataset name")
    e.add_argument("--method", default="zero_shot", choices=registry.ALL_METHODS)
    e.add_argument("--protocol", choices=registry.PROTOCOLS, default="ours", help=PROTOCOL_HELP)
    e.add_argument("--all-samples", action="store_true", help="use every row as a preference sample (your own file)")
    e.add_argument("--pref-fraction", type=float, default=None, help="default 0.05 (ours), 0.01 (paper)")
    e.add_argument("--pref-count", type=int, default=None)
    e.add_argument("--stratified", action="store_true")
    e.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature of the base answers (default 0.7)")
    e.add_argument("--output", default="bank.json")
    e.set_defaults(func=cmd_estimate)

    p = sub.add_parser("predict", help="answer queries through a memory bank")
    _common(p)
    p.add_argument("--bank", required=True)
    p.add_argument("--input", required=True, help="queries: .txt (one per line), .jsonl or .csv")
    p.add_argument("--method", default="zero_shot+cm", help="base method with +cm, +cm_paper or +cm_soft")
    p.add_argument("--dataset", default=None, help="label set source (default: the labels stored in the bank)")
    p.add_argument("--samples", default=None, help="preference samples, for few-shot/cot/knn/logreg bases")
    p.add_argument("--output", default=None)
    p.set_defaults(func=cmd_predict)

    v = sub.add_parser("evaluate", help="evaluate methods and their CM variants on a dataset")
    _common(v)
    v.add_argument("--protocol", choices=registry.PROTOCOLS, default="ours", help=PROTOCOL_HELP)
    v.add_argument("--dataset", required=True, help="banking77, clinc, massive_scenario, mtop_intent, stackexchange "
                   "(shipped in data/), another hub dataset, or a file")
    v.add_argument("--methods", default="zero_shot,label_similarity,knn,logreg",
                   help="comma-separated; a base name also runs its +cm variant; add +cm_paper / +cm_soft explicitly")
    v.add_argument("--pref-fraction", type=float, default=None, help="default 0.05 (ours), 0.01 (paper)")
    v.add_argument("--pref-count", type=int, default=None)
    v.add_argument("--n-test", type=int, default=200, help="at most this many test rows")
    v.add_argument("--n-test-other", type=int, default=None,
                   help="paper protocol: test rows of the base methods other than zero-shot (default --n-test)")
    v.add_argument("--test-fraction", type=float, default=None,
                   help="share of --dataset's rows held out as the test set (default 0.5, as the paper)")
    v.add_argument("--test-file", default=None,
                   help="labelled test rows from this file instead; --dataset then gives only preference samples "
                        "(all of them with --pref-fraction 1)")
    v.add_argument("--stratified", action="store_true")
    v.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature for the memory bank (default 0.7)")
    v.add_argument("--bank", default=None, help="use this saved bank instead of estimating one (paper protocol: the "
                   "official JSON {answer: [labels]}, the one bank of every base method)")
    v.add_argument("--rename", choices=SCHEMES, default=None,
                   help="vocabulary misalignment: rename the dataset's labels as a user might (codes: opaque codes; "
                        "nicknames: unrelated real words; seeded, see cm_core/misalign.py); own_words then answers in "
                        "the original names (unless --responses) and CM maps them onto the renamed labels")
    v.add_argument("--output", default="results.json")
    v.set_defaults(func=cmd_evaluate)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    def body():
        _check_flags(a)
        try:
            a.func(a)
        finally:
            for llm in vars(a).get("opened_backends", []):
                llm.close()  # the cache file too: no -wal/-shm left behind, whatever happened
        _check_failures(a)

    return run_command(body)


def _check_flags(a) -> None:
    """Flags that need no file or model, checked before anything is read, built or sent."""
    if a.concurrency < 1:
        raise CMError(f"--concurrency must be at least 1, got {a.concurrency}")
    if not a.timeout > 0:
        raise CMError(f"--timeout must be positive (seconds), got {a.timeout:g}")
    if a.max_retries < 0:
        raise CMError(f"--max-retries must be 0 or more, got {a.max_retries}")
    if a.deadline is not None and not a.deadline > 0:
        raise CMError(f"--deadline must be positive (seconds), got {a.deadline:g}")
    if not 0 <= a.max_failed_fraction <= 1:
        raise CMError(f"--max-failed-fraction must be between 0 and 1, got {a.max_failed_fraction:g}")
    check_base_url(a.base_url, "--base-url")
    if a.chat_template:
        from .backends.openai_backend import load_template
        load_template(a.chat_template)  # a name or file that is not a template: say so before anything runs
    if a.model.startswith("openai:") and not a.base_url:
        import os
        check_base_url(os.environ.get("OPENAI_BASE_URL") or None, "OPENAI_BASE_URL")


def _check_failures(a) -> None:
    """Say how many LLM queries failed for good; past --max-failed-fraction, exit non-zero (output is written)."""
    backends = vars(a).get("opened_backends", [])
    failed = sum(b.stats.failed for b in backends)
    if not failed:
        return
    asked = max(1, sum(b.stats.queries for b in backends))
    what = (f"{failed} of {asked} LLM queries failed ({failed / asked:.1%}) after their retries; each counts as a "
            "wrong answer and none was cached, so re-running the same command asks only them again")
    if failed / asked > a.max_failed_fraction:
        raise CMError(f"{what} (over --max-failed-fraction {a.max_failed_fraction:g})")
    print(f"warning: {what}", file=sys.stderr)
