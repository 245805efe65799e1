"""Command line: ``python -m cm_core {estimate,predict,evaluate}``. A thin layer over the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import registry
from .backends import DEFAULT_CACHE_DIR, make_backend
from .bank import MemoryBank
from .cm import estimate_bank
from .data import Split, load_dataset, load_file, split_dataset
from .errors import CMError, run_command
from .evaluate import run_evaluation
from .methods import Decoding


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="embedded | openai:MODEL | hf:ID_OR_PATH (default: embedded)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="response cache and materialized models")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    p.add_argument("--decoding", choices=["score", "generate"], default="score",
                   help="score: rank labels by log-probability; generate: the paper's text protocol")
    p.add_argument("--no-calibrate", action="store_true", help="do not calibrate scores on a content-free input")
    p.add_argument("--list-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="show all candidate labels in the prompt (the paper's prompt; slower on CPU). Default: only "
                        "when the model must write a label itself (generation)")
    p.add_argument("--seed", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight at once (openai backends; e.g. 64 against a vLLM server)")
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("-v", "--verbose", action="store_true")


def _decoding(a) -> Decoding:
    # a batch is what one backend call sees: at least as many requests as may be in flight
    return Decoding(mode=a.decoding, calibrate=not a.no_calibrate, list_labels=a.list_labels, seed=a.seed,
                    batch_size=max(8, a.concurrency))


def _backend(a):
    kw = {"concurrency": a.concurrency} if a.model.startswith("openai:") else {}
    return make_backend(a.model, cache_dir=a.cache_dir, use_cache=not a.no_cache, base_url=a.base_url, **kw)


def _dataset(a, path_or_name: str):
    return load_dataset(path_or_name, **({"text_column": a.text_column} if a.text_column else {}),
                        **({"label_column": a.label_column} if a.label_column else {}))


def _backend_for(a, names) -> object | None:
    """The LLM backend, built only when one of the methods needs it (after every name was checked)."""
    return _backend(a) if any(registry.needs_llm(n) for n in names) else None


def cmd_estimate(a) -> dict:
    ds = _dataset(a, a.dataset)
    if a.all_samples:
        samples = ds.examples
    else:
        samples = split_dataset(ds, pref_fraction=a.pref_fraction, pref_count=a.pref_count, seed=a.seed,
                                stratified=a.stratified).preference.examples
    llm = _backend_for(a, [a.method])
    base = registry.build(a.method, labels=ds.labels, llm=llm, decoding=_decoding(a)).fit(samples)
    bank = estimate_bank(base, samples, a.temperature, a.seed)
    bank.meta.update({"dataset": ds.name, "labels": ds.labels})
    bank.to_json(a.output)
    stats = bank.stats()
    print(json.dumps({"output": a.output, **stats}, indent=2))
    return stats


def _read_queries(path: str, text_column: str | None) -> list[str]:
    p = Path(path)
    if p.suffix.lower() in (".txt", ""):
        from .data import _decode, _read_bytes
        lines = [ln.strip() for ln in _decode(_read_bytes(p), str(p)).splitlines()]
        if not any(lines):
            raise CMError(f"{path}: no queries")
        return [ln for ln in lines if ln]
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
    cm = registry.build(name, labels=labels, llm=_backend_for(a, [name]), decoding=_decoding(a), bank=bank)
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
    ds = _dataset(a, a.dataset)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        registry.split_method_name(m)  # fail fast on a typo, before loading any model
    split = None
    if a.test_file:  # the preference samples come from --dataset, the test rows from this file
        test = load_file(a.test_file, text_column=a.text_column, label_column=a.label_column, labels=ds.labels)
        pref = ds if a.pref_count is None and a.pref_fraction >= 1 else split_dataset(
            ds, pref_fraction=a.pref_fraction, pref_count=a.pref_count, seed=a.seed, test_fraction=0.0).preference
        split = Split(pref, test if a.n_test is None else test.subset(test.examples[:a.n_test], "test"), a.seed)
    bank = MemoryBank.from_json(Path(a.bank)) if a.bank else None
    llm = _backend_for(a, methods)
    res = run_evaluation(ds, llm, methods, pref_fraction=a.pref_fraction, pref_count=a.pref_count,
                         n_test=a.n_test, seed=a.seed, stratified=a.stratified, bank_temperature=a.temperature,
                         decoding=_decoding(a), bank=bank, split=split, test_fraction=a.test_fraction)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(res, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"{'method':28s} {'acc':>6s} {'95% CI':>15s} {'macroF1':>8s} {'p':>7s}")
    for name, r in res["results"].items():
        if "skipped" in r:
            print(f"{name:28s} skipped: {r['skipped']}")
            continue
        p = f"{r['p_value']:.3g}" if r.get("p_value") is not None else ""
        print(f"{name:28s} {r['accuracy']:6.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] {r['macro_f1']:8.3f} {p:>7s}")
    print(f"wrote {a.output} (n_test={res['config']['n_test']}, preference samples={res['config']['pref_count']}, "
          f"{res['run']['wall_time_s']}s)")
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cm_core", description="Consistent Marginalization: personalize an "
                                 "LLM's answers to one user's labels from a few preference samples.")
    sub = ap.add_subparsers(dest="command", required=True)

    e = sub.add_parser("estimate", help="estimate a memory bank from preference samples")
    _common(e)
    e.add_argument("--dataset", required=True, help="file (jsonl/csv) or dataset name")
    e.add_argument("--method", default="zero_shot", choices=registry.ALL_METHODS)
    e.add_argument("--all-samples", action="store_true", help="use every row as a preference sample (your own file)")
    e.add_argument("--pref-fraction", type=float, default=0.05)
    e.add_argument("--pref-count", type=int, default=None)
    e.add_argument("--stratified", action="store_true")
    e.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the base answers")
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
    v.add_argument("--dataset", required=True, help="banking77, clinc, massive_scenario, mtop_intent, stackexchange "
                   "(shipped in data/), another hub dataset, or a file")
    v.add_argument("--methods", default="zero_shot,label_similarity,knn,logreg",
                   help="comma-separated; a base name also runs its +cm variant; add +cm_paper / +cm_soft explicitly")
    v.add_argument("--pref-fraction", type=float, default=0.05)
    v.add_argument("--pref-count", type=int, default=None)
    v.add_argument("--n-test", type=int, default=200, help="at most this many test rows")
    v.add_argument("--test-fraction", type=float, default=0.5,
                   help="share of --dataset's rows held out as the test set (default 0.5, as the paper)")
    v.add_argument("--test-file", default=None,
                   help="labelled test rows from this file instead; --dataset then gives only preference samples "
                        "(all of them with --pref-fraction 1)")
    v.add_argument("--stratified", action="store_true")
    v.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for the memory bank")
    v.add_argument("--bank", default=None, help="use this saved bank instead of estimating one")
    v.add_argument("--output", default="results.json")
    v.set_defaults(func=cmd_evaluate)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    def body():
        if a.concurrency < 1:
            raise CMError(f"--concurrency must be at least 1, got {a.concurrency}")
        a.func(a)

    return run_command(body)
