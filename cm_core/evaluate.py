"""Evaluation: accuracy and macro-F1 with bootstrap 95% CIs, a paired test of each CM variant against its base,
and the whole experiment (split, fit, predict, score) as one function returning plain JSON-able data.

Two protocols: ``ours`` (calibrated scoring, soft CM, de-duplicated splits) and ``paper`` (the official experiment,
:func:`run_paper_evaluation`). Every results JSON names its protocol in ``config.protocol``.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import f1_score

from .backends.base import LLM
from .bank import MemoryBank
from . import paper, registry
from .cm import estimate_bank
from .data import Dataset, Split, data_dir, split_dataset
from .errors import CMError
from .methods import Decoding, Prediction
from .paper_methods import SOFT_REASON, PaperBank

RESULTS_VERSION = 1


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    return float(np.mean([g == p for g, p in zip(gold, pred)])) if gold else 0.0


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Macro-F1 over the gold labels present (predictions outside them count as errors)."""
    return float(f1_score(gold, pred, labels=sorted(set(gold)), average="macro", zero_division=0))


def bootstrap_ci(gold, pred, metric=accuracy, n_resamples: int = 1000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% CI, resampling test rows (scipy.stats.bootstrap, paired)."""
    g, p = np.asarray(gold, dtype=object), np.asarray(pred, dtype=object)
    if len(g) < 2:
        v = metric(list(g), list(p))
        return [v, v]
    if metric is accuracy:
        correct = (g == p).astype(float)
        res = stats.bootstrap((correct,), np.mean, n_resamples=n_resamples, method="percentile",
                              random_state=seed, vectorized=True)
    elif metric is macro_f1:
        res = stats.bootstrap((np.arange(len(g)),), _macro_f1_vectorized(g, p), n_resamples=n_resamples,
                              method="percentile", random_state=seed, vectorized=True)
    else:
        idx = np.arange(len(g))
        res = stats.bootstrap((idx,), lambda i: metric(list(g[i]), list(p[i])), n_resamples=n_resamples,
                              method="percentile", random_state=seed, vectorized=False)
    lo, hi = res.confidence_interval
    return [float(np.nan_to_num(lo, nan=0.0)), float(np.nan_to_num(hi, nan=0.0))]


def _macro_f1_vectorized(gold: np.ndarray, pred: np.ndarray):
    """Macro-F1 of many resamples at once (rows of indices), equal to :func:`macro_f1` on each resample:
    per-class counts by bincount, averaged over the classes present in that resample's gold labels."""
    classes = sorted(set(gold.tolist()))
    code = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    g = np.array([code[x] for x in gold])
    pr = np.array([code.get(x, k) for x in pred])  # k: a prediction outside the gold classes

    def stat(idx, axis=-1):
        idx = np.atleast_2d(idx)
        gi, pi = g[idx], pr[idx]
        rows = np.arange(idx.shape[0])[:, None]
        tp = np.zeros((idx.shape[0], k + 1))
        gold_n = np.zeros_like(tp)
        pred_n = np.zeros_like(tp)
        np.add.at(gold_n, (rows, gi), 1)
        np.add.at(pred_n, (rows, pi), 1)
        np.add.at(tp, (rows, gi), (gi == pi).astype(float))
        tp, gold_n, pred_n = tp[:, :k], gold_n[:, :k], pred_n[:, :k]
        denom = gold_n + pred_n
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        present = gold_n > 0
        return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)
    return stat


def mcnemar_p(gold, base_pred, new_pred) -> float:
    """Exact McNemar test (two-sided binomial test on the discordant pairs)."""
    b = sum(1 for g, x, y in zip(gold, base_pred, new_pred) if x == g and y != g)
    c = sum(1 for g, x, y in zip(gold, base_pred, new_pred) if x != g and y == g)
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(c, b + c, 0.5).pvalue)


def summarize(gold, pred, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    return {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred),
            "ci95": bootstrap_ci(gold, pred, accuracy, n_boot, seed),
            "macro_f1_ci95": bootstrap_ci(gold, pred, macro_f1, max(200, n_boot // 5), seed), "n": len(gold)}


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "openai", "scikit-learn", "sentence-transformers", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def compare(gold: Sequence[str], predictions: Mapping[str, Sequence[str]], base_of: Mapping[str, str] | None = None,
            n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Metrics of every method's predictions; a method with an entry in ``base_of`` is also compared with its base
    (paired exact McNemar test, accuracy difference). What the evaluation, the reports and the demo show."""
    base_of = base_of or {}
    out: dict[str, dict[str, Any]] = {}
    for name, pred in predictions.items():
        out[name] = summarize(gold, pred, n_boot, seed)
        base = base_of.get(name)
        if base is not None and base in predictions:
            out[name].update(p_value=mcnemar_p(gold, predictions[base], pred), base=base,
                             delta=accuracy(gold, pred) - accuracy(gold, predictions[base]))
    return out


def cm_actions(preds: Sequence[Prediction]) -> dict[str, Any]:
    """How often each marginalization branch fired, and how often CM needed its second call."""
    actions = [p.info.get("action") for p in preds]
    return {"actions": {a: actions.count(a) for a in sorted(set(actions), key=str)},
            "second_call_rate": actions.count("choose") / max(1, len(actions))}


def run_evaluation(dataset: Dataset | str, llm: LLM | None, methods: Sequence[str], *,
                   pref_fraction: float | None = None, pref_count: int | None = None, n_test: int | None = 200,
                   seed: int = 40, stratified: bool = False, bank_temperature: float = 0.7,
                   decoding: Decoding | None = None, n_boot: int = 1000, bank: MemoryBank | None = None,
                   split: Split | None = None, test_fraction: float = 0.5, progress=None, protocol: str = "ours",
                   n_test_other: int | None = None, responses: Sequence[str] | None = None) -> dict[str, Any]:
    """Split, fit every base method on the preference samples and predict the test split; estimate its memory bank
    once (or use ``bank``, then the same bank for every base method) and predict with each of its CM variants.

    ``methods`` names base methods ("zero_shot"), CM variants ("zero_shot+cm", "+cm_paper", "+cm_soft") or both;
    naming a base alone also evaluates its "+cm" variant. ``split`` gives the preference samples and test rows
    explicitly (e.g. a separate test file) instead of splitting ``dataset``. ``pref_fraction`` defaults to 0.05.
    ``protocol="paper"`` runs the official experiment instead (:func:`run_paper_evaluation`; it refuses the
    arguments only ours has). ``responses``: the model's own vocabulary, for methods that answer in it
    (``own_words``). Returns the results JSON (see README).
    """
    if protocol == "paper":
        ours_only = {"pref_count": pref_count is not None, "stratified": stratified, "decoding": decoding is not None,
                     "split": split is not None, "test_fraction": test_fraction != 0.5,
                     "bank_temperature": bank_temperature != 0.7}
        given = [k for k, v in ours_only.items() if v]
        if given:
            raise CMError(f"{', '.join(given)}: our protocol's setting(s); the paper protocol fixes them")
        return run_paper_evaluation(dataset, llm, methods, pref_fraction=pref_fraction or 0.01, n_test=n_test,
                                    n_test_other=n_test_other, seed=seed, n_boot=n_boot, bank=bank,
                                    progress=progress)
    if protocol != "ours":
        raise CMError(f"unknown protocol {protocol!r}; protocols: {', '.join(registry.PROTOCOLS)}")
    if n_test_other is not None:
        raise CMError("n_test_other belongs to the paper protocol (protocol='paper')")
    if isinstance(dataset, str):
        from .data import load_dataset
        dataset = load_dataset(dataset)
    pref_fraction = 0.05 if pref_fraction is None else pref_fraction
    t_start = time.time()
    decoding = decoding or Decoding(seed=seed)
    if split is None:
        split = split_dataset(dataset, pref_fraction=pref_fraction, pref_count=pref_count, n_test=n_test, seed=seed,
                              stratified=stratified, test_fraction=test_fraction)
    pref, test = split.preference.examples, split.test
    todo = registry.plan(methods)
    n_steps, step = sum(1 + len(v) for v in todo.values()), 0

    def tick(what: str) -> None:
        nonlocal step
        if progress:
            progress(step / n_steps, what)
        step += 1

    predictions: dict[str, list[str]] = {}
    extra: dict[str, dict[str, Any]] = {}
    skipped: dict[str, dict[str, str]] = {}
    base_of: dict[str, str] = {}
    banks: dict[str, Any] = {}
    failed: dict[str, int] = {}  # LLM queries that failed for good, per step (never cached; each counts as wrong)
    mark = [_failed(llm)]

    def count_failed(what: str) -> None:
        failed[what], mark[0] = _failed(llm) - mark[0], _failed(llm)

    for base_name, variants in todo.items():
        tick(base_name)
        t0 = time.time()
        own = {"responses": responses} if getattr(registry.METHODS[base_name], "uses_responses", False) else {}
        base = registry.build(base_name, labels=dataset.labels, llm=llm, decoding=decoding, **own).fit(pref)
        predictions[base_name] = [p.label for p in base.predict(test.texts)]
        extra[base_name] = {"time_s": round(time.time() - t0, 2), "kind": _kind(base_name)}
        count_failed(base_name)
        if not registry.supports_cm(base_name):  # trained on these very samples: no bank over it (registry says)
            continue
        t0 = time.time()
        base_bank = bank if bank is not None else estimate_bank(base, pref, bank_temperature, seed)
        banks[base_name] = {"stats": base_bank.stats(), "bank": base_bank.to_dict(), "given": bank is not None,
                            "time_s": round(time.time() - t0, 2)}
        count_failed(f"{base_name} bank")
        for variant in variants:
            name = base_name + variant
            tick(name)
            if registry.is_soft(name) and not base.gives_probs:
                skipped[name] = {"skipped": "the base method gives no p(y|x) on this backend"}
                continue
            t0 = time.time()
            cm = registry.build(name, labels=dataset.labels, llm=llm, decoding=decoding, bank=base_bank, **own,
                                base=base).fit(pref)
            preds = cm.predict(test.texts)
            predictions[name] = [p.label for p in preds]
            base_of[name] = base_name
            extra[name] = {**cm_actions(preds), "time_s": round(time.time() - t0, 2), "kind": _kind(base_name)}
            if getattr(cm, "shrinkage_", None):  # the prior strength the samples chose (cm_core.shrink)
                extra[name]["shrinkage"] = cm.shrinkage_
            if getattr(cm, "em_", None):  # the EM fit's prior strength (cm_core.em); its rows stay in the object
                extra[name]["em"] = {k: v for k, v in cm.em_.items() if k != "conditional"}
            count_failed(name)
    if progress:
        progress(1.0, "done")

    scored = compare(test.targets, predictions, base_of, n_boot, seed)
    results = {name: {**scored[name], **extra[name]} if name in scored else skipped[name]
               for name in [b + (v or "") for b, vs in todo.items() for v in [None, *vs]]}
    config = {"protocol": "ours", "dataset": dataset.name, "source": dataset.source, "n_labels": len(dataset.labels),
              "model": llm.identity() if llm is not None else None, "methods": list(methods),
              "pref_fraction": pref_fraction, "pref_count": len(pref), "n_test": len(test), "seed": seed,
              "test_source": test.source if test.source != dataset.source else None,
              "stratified": stratified, "bank_temperature": bank_temperature, "bank_given": bank is not None,
              "responses": list(responses) if responses else None,
              "decoding": asdict(decoding), "scoring": scoring_mode(llm, decoding)}
    calls = asdict(llm.stats) if llm is not None else {}
    return {"version": RESULTS_VERSION, "config": config, "results": results, "banks": banks,
            "gold": test.targets, "texts": test.texts, "predictions": predictions,
            "run": {"wall_time_s": round(time.time() - t_start, 2), "llm_calls": calls,
                    "failed_queries": {**failed, "total": sum(failed.values())},
                    "versions": _package_versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}}


def run_paper_evaluation(dataset: Dataset | str, llm: LLM, methods: Sequence[str], *, pref_fraction: float = 0.01,
                         n_test: int | None = 200, n_test_other: int | None = None, seed: int = paper.OFFICIAL_SEED,
                         n_boot: int = 1000, bank: MemoryBank | None = None, progress=None) -> dict[str, Any]:
    """The official experiment on one of the paper's datasets (``data_dir()/<name>/{small,large}.jsonl``).

    Test rows: the official seeded half of small, in the official order, the first ``n_test`` for zero-shot and
    the first ``n_test_other`` (default ``n_test``) for the other base methods (the issue's budget: >= 200 and
    >= 100); a CM variant runs on its base's rows. Preference rows: the official seeded draw of ``pref_fraction``
    of large (0.01, the Llama runs' setting, or 0.05). Label set: np.unique of large. ONE memory bank, estimated
    once with the bank prompt on the preference rows (or ``bank``, e.g. the official file), serves every base
    method's ``+cm_paper`` / ``+cm``. A base named alone also runs ``+cm_paper``. Same results schema as ours; the
    bank is recorded once, under ``banks["shared"]``; ``config.departures`` lists where this run departs from the
    official code.
    """
    t_start = time.time()
    if llm is None:
        raise CMError("the paper protocol's methods all need an LLM backend")
    name = dataset if isinstance(dataset, str) else dataset.name
    small, large = data_dir() / name / "small.jsonl", data_dir() / name / "large.jsonl"
    if not small.is_file():
        raise CMError(f"the paper protocol runs on the paper's datasets ({', '.join(paper.TEST_SIZES)}); "
                      f"{small} does not exist")
    if not 0 < pref_fraction < 1:
        raise CMError(f"pref_fraction must be in (0, 1), got {pref_fraction} (the paper used 0.01 and 0.05)")
    pref, test, info = paper.paper_split(small, large if large.is_file() else None, pref_fraction, seed)
    labels, failed_before = info["labels"], _failed(llm)
    todo = registry.plan(methods, default_variant="+cm_paper", protocol="paper")
    n_main = len(test) if n_test is None else n_test
    n_other = min(n_main, n_main if n_test_other is None else n_test_other)
    if n_main <= 0 or n_other <= 0:
        raise CMError(f"n_test and n_test_other must be positive, got {n_test} and {n_test_other}")
    steps = [b + (v or "") for b, vs in todo.items() for v in [None, *vs]]

    def tick(i: int, what: str) -> None:
        if progress:
            progress(i / (len(steps) + 1), what)

    banks: dict[str, Any] = {}
    bank_given = bank is not None
    if any(todo.values()):
        tick(0, "memory bank")
        t0 = time.time()
        if bank is None:
            estimator = PaperBank(llm, labels, dataset=name, seed=seed)
            bank = estimate_bank(estimator, pref, paper.PAPER_DECODING["llama_bank"].temperature, seed)
        banks["shared"] = {"stats": bank.stats(), "bank": bank.to_dict(), "given": bank_given, "used_by": list(todo),
                           "time_s": round(time.time() - t0, 2)}
    predictions: dict[str, list[str]] = {}
    results: dict[str, dict[str, Any]] = {}
    for base_name, variants in todo.items():
        rows = test[:n_main if base_name == "zero_shot" else n_other]
        texts, gold = [e.text for e in rows], [e.label for e in rows]
        tick(steps.index(base_name) + 1, base_name)
        t0 = time.time()
        base = registry.build(base_name, labels=labels, llm=llm, seed=seed, protocol="paper", dataset=name).fit(pref)
        group = {base_name: [p.label for p in base.predict(texts)]}
        extra = {base_name: {"time_s": round(time.time() - t0, 2), "kind": "llm",
                             "unknown": group[base_name].count(paper.UNKNOWN)}}
        base_of: dict[str, str] = {}
        for variant in variants:
            cm_name = base_name + variant
            tick(steps.index(cm_name) + 1, cm_name)
            if registry.is_soft(cm_name):
                results[cm_name] = {"skipped": SOFT_REASON}
                continue
            t0 = time.time()
            cm = registry.build(cm_name, labels=labels, llm=llm, seed=seed, protocol="paper", dataset=name,
                                bank=bank, base=base).fit(pref)
            cm_preds = cm.predict(texts)
            group[cm_name], base_of[cm_name] = [p.label for p in cm_preds], base_name
            extra[cm_name] = {**cm_actions(cm_preds), "time_s": round(time.time() - t0, 2), "kind": "llm"}
            if getattr(cm, "shrinkage_", None):
                extra[cm_name]["shrinkage"] = cm.shrinkage_
        scored = compare(gold, group, base_of, n_boot, seed)  # each method on its own rows
        results.update({m: {**scored[m], **extra[m]} for m in group})
        predictions.update(group)
    if progress:
        progress(1.0, "done")

    rows = test[:n_main if "zero_shot" in todo else n_other]  # every method's rows are a prefix of these
    shape = "gpt" if llm.kind == "openai" else "llama"
    used = (["gpt_base", "gpt_few_shot_choose", "gpt_choose", "gpt_refine", "llama_bank"] if shape == "gpt"
            else ["llama_base", "llama_choose", "llama_bank"])
    split = {k: info[k] for k in ("n_small", "n_large", "pref_source", "pref_test_overlap")}
    split.update(test_indices=info["test_indices"][:len(rows)], pref_indices=info["pref_indices"])
    config = {"protocol": "paper", "dataset": name, "source": f"{name}/small.jsonl + preference rows of "
              f"{info['pref_source']}", "n_labels": len(labels), "model": llm.identity(), "methods": list(methods),
              "pref_fraction": pref_fraction, "pref_count": len(pref), "n_test": len(rows), "n_test_other": n_other,
              "seed": seed, "bank_temperature": paper.PAPER_DECODING["llama_bank"].temperature,
              "bank_given": bank_given, "prompt_shape": shape,
              "decoding": {k: asdict(paper.PAPER_DECODING[k]) for k in used}, "scoring": "generate-strict",
              "split": split, "departures": paper_departures(todo, llm, info, n_main, n_other, rows, seed)}
    return {"version": RESULTS_VERSION, "config": config, "results": {m: results[m] for m in steps}, "banks": banks,
            "gold": [e.label for e in rows], "texts": [e.text for e in rows], "predictions": predictions,
            "run": {"wall_time_s": round(time.time() - t_start, 2), "llm_calls": asdict(llm.stats),
                    "failed_queries": {"total": _failed(llm) - failed_before}, "versions": _package_versions(),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}}


def paper_departures(todo: Mapping[str, Sequence[str]], llm: LLM, info: Mapping[str, Any], n_main: int,
                     n_other: int, rows: Sequence[Any], seed: int) -> list[str]:
    """Where this paper-protocol run knowingly differs from the official code (one sentence each)."""
    out = list(info["departures"])  # e.g. stackexchange: no large split
    if {"few_shot", "cot", "self_consistency"} & set(todo):
        out.append("demonstrations: the official few-shot/CoT take theirs from output/selected_data_<dataset>.json "
                   "(a separate 5 % draw of large, not shipped here) ranked by averaged-word2vec cosine; here the "
                   "5 (GPT: 4) / 1 most similar PREFERENCE rows by all-MiniLM-L6-v2 cosine, each with the same "
                   "template chain of thought (The intent of this input is related to '<label>'.) and that cosine "
                   "printed as Similarity")
    if any(todo.values()):
        out.append("bank: counts how often each label was seen with an answer (the official bank keeps the distinct "
                   "labels only; both rules use only the candidate set, so no answer changes); the re-ask lists an "
                   "entry's candidates most frequent first, ties alphabetical (officially list(set(...)), whose order "
                   "is hash-random)")
    added = sorted({v for vs in todo.values() for v in vs} & set(registry.PAPER_ADDITIONS))
    out += [registry.PAPER_ADDITIONS[v] for v in added]
    out.append(f"sampling: every request is seeded (from seed {seed} and its prompt) and the response cache answers a "
               f"repeated prompt from disk, so a rerun reproduces; {paper.DEPARTURES['sampling_rng']}")
    out += [paper.DEPARTURES["set_answer_order"], paper.DEPARTURES["unicode_escape_error"]]
    texts = [e.text for e in rows]
    if len(set(texts)) < len(texts):
        out.append("a query text that occurs more than once among the test rows is asked once and its answer reused "
                   "(the official code asks each row)")
    if min(n_main, n_other) < info["n_test"]:
        out.append(f"test rows: the first {n_main} (zero-shot) / {n_other} (other base methods) of the official "
                   f"{info['n_test']}, in the official order (the paper scores all of them)")
    if seed != paper.OFFICIAL_SEED:
        out.append(f"split seed {seed} instead of the official {paper.OFFICIAL_SEED}")
    if llm.kind == "openai":
        out.append("test rows: the GPT runs test all of small in a random.seed(10) order (gpt_test_indices); here the "
                   "Llama runs' held-out half, for every backend")
        out.append("bank: the GPT runs read a bank file given to them; here it is estimated with the Llama runs' bank "
                   "prompt and decoding on this backend, unless a bank file is given")
    else:
        model = llm.identity().get("model", "")
        if "llama-3-8b" not in str(model).lower():
            dtype = llm.identity().get("dtype")
            out.append(f"model: {llm.label}{f' ({dtype})' if dtype else ''} with the Llama runs' prompts and decoding "
                       "(the paper ran Llama-3-8B-Instruct in bf16 and GPT-3.5-turbo / GPT-4o-mini)")
    return out


def scoring_mode(llm: LLM | None, decoding: Decoding) -> str | None:
    """How labels were really chosen: the decoding mode, or the generation fallback of a backend without
    log-probabilities."""
    if llm is None:
        return None
    if decoding.mode == "score" and not llm.supports_scores:
        return "generation-fallback"
    return decoding.mode


def _failed(llm: LLM | None) -> int:
    """LLM queries the backend answered with Failed so far (see backends.base.Failed)."""
    return getattr(getattr(llm, "stats", None), "failed", 0) if llm is not None else 0


def _kind(base_name: str) -> str:
    return "llm" if registry.needs_llm(base_name) else "baseline"


def results_table(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: what reports and the demo show."""
    rows = []
    for name, r in res["results"].items():
        if "skipped" in r:
            continue
        rows.append({"method": name, "accuracy": r["accuracy"], "ci_low": r["ci95"][0], "ci_high": r["ci95"][1],
                     "macro_f1": r["macro_f1"], "p_value": r.get("p_value"), "n": r["n"], "kind": r["kind"]})
    return rows
