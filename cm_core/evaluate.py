"""Evaluation: accuracy and macro-F1 with bootstrap 95% CIs, a paired test of each CM variant against its base,
and the whole experiment (split, fit, predict, score) as one function returning plain JSON-able data.
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
from . import registry
from .cm import estimate_bank
from .data import Dataset, Split, split_dataset
from .methods import Decoding, Prediction

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


def run_evaluation(dataset: Dataset, llm: LLM | None, methods: Sequence[str], *, pref_fraction: float | None = 0.05,
                   pref_count: int | None = None, n_test: int | None = 200, seed: int = 40,
                   stratified: bool = False, bank_temperature: float = 0.7, decoding: Decoding | None = None,
                   n_boot: int = 1000, bank: MemoryBank | None = None, split: Split | None = None,
                   test_fraction: float = 0.5, progress=None) -> dict[str, Any]:
    """Split, fit every base method on the preference samples and predict the test split; estimate its memory bank
    once (or use ``bank``, then the same bank for every base method) and predict with each of its CM variants.

    ``methods`` names base methods ("zero_shot"), CM variants ("zero_shot+cm", "+cm_paper", "+cm_soft") or both;
    naming a base alone also evaluates its "+cm" variant. ``split`` gives the preference samples and test rows
    explicitly (e.g. a separate test file) instead of splitting ``dataset``. Returns the results JSON (see README).
    """
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
    for base_name, variants in todo.items():
        tick(base_name)
        t0 = time.time()
        base = registry.build(base_name, labels=dataset.labels, llm=llm, decoding=decoding).fit(pref)
        predictions[base_name] = [p.label for p in base.predict(test.texts)]
        extra[base_name] = {"time_s": round(time.time() - t0, 2), "kind": _kind(base_name)}
        t0 = time.time()
        base_bank = bank if bank is not None else estimate_bank(base, pref, bank_temperature, seed)
        banks[base_name] = {"stats": base_bank.stats(), "bank": base_bank.to_dict(), "given": bank is not None,
                            "time_s": round(time.time() - t0, 2)}
        for variant in variants:
            name = base_name + variant
            tick(name)
            if registry.is_soft(name) and not base.gives_probs:
                skipped[name] = {"skipped": "the base method gives no p(y|x) on this backend"}
                continue
            t0 = time.time()
            cm = registry.build(name, labels=dataset.labels, llm=llm, decoding=decoding, bank=base_bank,
                                base=base).fit(pref)
            preds = cm.predict(test.texts)
            predictions[name] = [p.label for p in preds]
            base_of[name] = base_name
            extra[name] = {**cm_actions(preds), "time_s": round(time.time() - t0, 2), "kind": _kind(base_name)}
    if progress:
        progress(1.0, "done")

    scored = compare(test.targets, predictions, base_of, n_boot, seed)
    results = {name: {**scored[name], **extra[name]} if name in scored else skipped[name]
               for name in [b + (v or "") for b, vs in todo.items() for v in [None, *vs]]}
    config = {"dataset": dataset.name, "source": dataset.source, "n_labels": len(dataset.labels),
              "model": llm.identity() if llm is not None else None, "methods": list(methods),
              "pref_fraction": pref_fraction, "pref_count": len(pref), "n_test": len(test), "seed": seed,
              "test_source": test.source if test.source != dataset.source else None,
              "stratified": stratified, "bank_temperature": bank_temperature, "bank_given": bank is not None,
              "decoding": asdict(decoding), "scoring": scoring_mode(llm, decoding)}
    calls = asdict(llm.stats) if llm is not None else {}
    return {"version": RESULTS_VERSION, "config": config, "results": results, "banks": banks,
            "gold": test.targets, "texts": test.texts, "predictions": predictions,
            "run": {"wall_time_s": round(time.time() - t_start, 2), "llm_calls": calls,
                    "versions": _package_versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}}


def scoring_mode(llm: LLM | None, decoding: Decoding) -> str | None:
    """How labels were really chosen: the decoding mode, or the generation fallback of a backend without
    log-probabilities."""
    if llm is None:
        return None
    if decoding.mode == "score" and not llm.supports_scores:
        return "generation-fallback"
    return decoding.mode


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
