"""Evaluation: accuracy and macro-F1 with bootstrap 95% CIs, a paired test of each CM variant against its base,
and the whole experiment (split, fit, predict, score) as one function returning plain JSON-able data.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import f1_score

from .backends.base import LLM
from .bank import MemoryBank
from .cm import CM
from .data import Dataset, split_dataset
from .methods import Decoding, Method, Prediction
from .registry import BASELINES, CM_VARIANTS, build_chooser, build_method, split_method_name

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


def run_evaluation(dataset: Dataset, llm: LLM | None, methods: Sequence[str], *, pref_fraction: float | None = 0.05,
                   pref_count: int | None = None, n_test: int | None = 200, seed: int = 40,
                   stratified: bool = False, bank_temperature: float = 0.7, decoding: Decoding | None = None,
                   n_boot: int = 1000, bank: MemoryBank | None = None, progress=None) -> dict[str, Any]:
    """Split, fit every base method and its CM variants on the preference samples, predict the test split.

    ``methods`` names base methods ("zero_shot"), CM variants ("zero_shot+cm", "+cm_paper", "+cm_soft") or both;
    naming a base alone also evaluates its "+cm" variant. Returns the results JSON (see README).
    """
    t_start = time.time()
    decoding = decoding or Decoding(seed=seed)
    split = split_dataset(dataset, pref_fraction=pref_fraction, pref_count=pref_count, n_test=n_test, seed=seed,
                          stratified=stratified)
    pref, test = split.preference, split.test
    gold = test.targets

    wanted: dict[str, list[str]] = {}  # base -> variants
    for name in methods:
        base, variant = split_method_name(name)
        wanted.setdefault(base, [])
        if variant and variant not in wanted[base]:
            wanted[base].append(variant)
    for base, variants in wanted.items():
        if not variants:
            variants.append("+cm")

    results: dict[str, Any] = {}
    predictions: dict[str, list[str]] = {}
    banks: dict[str, Any] = {}
    steps = [(b, v) for b, vs in wanted.items() for v in [None, *vs]]
    for step, (base_name, variant) in enumerate(steps):
        if progress:
            progress(step / len(steps), f"{base_name}{variant or ''}")
        if variant is None:
            t0 = time.time()
            base = build_method(base_name, llm, dataset.labels, decoding)
            base.fit(pref.examples)
            preds = base.predict(test.texts)
            predictions[base_name] = [p.label for p in preds]
            results[base_name] = {**summarize(gold, predictions[base_name], n_boot, seed),
                                  "time_s": round(time.time() - t0, 2), "kind": _kind(base_name)}
            fitted_base, first_bank = base, None
            continue
        t0 = time.time()
        form, single = CM_VARIANTS[variant]
        chooser = build_chooser(base_name, fitted_base, llm, dataset.labels, decoding)
        cm = CM(fitted_base, chooser, form=form, single=single, temperature=bank_temperature, seed=seed,
                bank=bank or first_bank)
        cm.fit(pref.examples, fit_base=False)
        first_bank = cm.bank_
        if form == "soft" and not _has_probs(fitted_base, test.texts[:1]):
            results[base_name + variant] = {"skipped": "the base method gives no p(y|x) on this backend"}
            continue
        preds = cm.predict(test.texts)
        name = base_name + variant
        predictions[name] = [p.label for p in preds]
        actions = [p.info.get("action") for p in preds]
        results[name] = {**summarize(gold, predictions[name], n_boot, seed),
                         "p_value": mcnemar_p(gold, predictions[base_name], predictions[name]),
                         "base": base_name, "delta": accuracy(gold, predictions[name]) - results[base_name]["accuracy"],
                         "actions": {a: actions.count(a) for a in sorted(set(actions))},
                         "second_call_rate": actions.count("choose") / max(1, len(actions)),
                         "time_s": round(time.time() - t0, 2), "kind": _kind(base_name)}
        banks[base_name] = {"stats": cm.bank_.stats(), "bank": cm.bank_.to_dict()}
    if progress:
        progress(1.0, "done")

    config = {"dataset": dataset.name, "source": dataset.source, "n_labels": len(dataset.labels),
              "model": llm.identity() if llm is not None else None, "methods": list(methods),
              "pref_fraction": pref_fraction, "pref_count": len(pref), "n_test": len(test), "seed": seed,
              "stratified": stratified, "bank_temperature": bank_temperature, "decoding": asdict(decoding),
              "scoring": ("generation-fallback" if llm is not None and decoding.mode == "score"
                          and not llm.supports_scores else decoding.mode)}
    calls = asdict(llm.stats) if llm is not None else {}
    return {"version": RESULTS_VERSION, "config": config, "results": results, "banks": banks,
            "gold": gold, "texts": test.texts, "predictions": predictions,
            "run": {"wall_time_s": round(time.time() - t_start, 2), "llm_calls": calls,
                    "versions": _package_versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}}


def _kind(base_name: str) -> str:
    return "baseline" if base_name in BASELINES else "llm"


def _has_probs(method: Method, texts) -> bool:
    preds: list[Prediction] = method.predict(texts)
    return bool(preds and preds[0].probs)


def results_table(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: what reports and the demo show."""
    rows = []
    for name, r in res["results"].items():
        if "skipped" in r:
            continue
        rows.append({"method": name, "accuracy": r["accuracy"], "ci_low": r["ci95"][0], "ci_high": r["ci95"][1],
                     "macro_f1": r["macro_f1"], "p_value": r.get("p_value"), "n": r["n"], "kind": r["kind"]})
    return rows
