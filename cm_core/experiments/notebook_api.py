"""What the report notebooks call: :func:`evaluate_run` (one evaluation, saved to a results JSON and reused while
its request is unchanged) and :func:`inspect_bank` (one base method's memory bank, read from that evaluation).

Both go through :func:`cm_core.evaluate.run_evaluation`: there is one estimation pipeline, so the bank a report
shows is the bank the evaluation's CM variants used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import registry
from ..bank import MemoryBank
from ..errors import CMError
from ..misalign import SCHEMES, misaligned
from .fingerprint import code_fingerprint

DEFAULT_METHODS = ("zero_shot", "zero_shot+cm_paper", "zero_shot+cm_soft", "label_similarity",
                   "label_similarity+cm", "knn", "logreg")
PAPER_DEFAULT_METHODS = ("zero_shot", "zero_shot+cm_paper", "zero_shot+cm")  # the official code's rule, the formula


def methods_list(methods: str | Sequence[str]) -> list[str]:
    """Method names from a list or a comma-separated string (a notebook parameter may be either)."""
    if isinstance(methods, str):
        methods = methods.split(",")
    out = [m.strip() for m in methods if m and m.strip()]
    if not out:
        raise CMError("no methods given")
    return out


def default_bank_method(methods: Sequence[str], protocol: str = "ours") -> str:
    """The first base method that uses the LLM (its bank is the interesting one), else the first base method."""
    bases = list(dict.fromkeys(registry.split_method_name(m, protocol)[0] for m in methods))
    return next((b for b in bases if registry.needs_llm(b, protocol)), bases[0])


def make_request(*, dataset: str, model: str = "embedded", base_url: str | None = None,
                 pref_fraction: float | None = 0.05, pref_count: int | None = None, temperature: float = 0.7,
                 n_test: int | None = 200, methods: str | Sequence[str] | None = None, seed: int = 40,
                 decoding: str = "score", list_labels: bool | None = None, calibrate: bool = True,
                 protocol: str = "ours", n_test_other: int | None = None, rename: str | None = None) -> dict[str, Any]:
    """Everything that determines a run's results, the library code included: equal requests, equal results.

    The one place the notebook parameters get their defaults and are checked (method names, decoding), before
    any model loads. ``pref_count`` overrides ``pref_fraction``; ``list_labels`` None lets the decoding decide.
    ``protocol`` "paper" runs the official experiment (its own splits, prompts and decoding: our protocol's settings
    must stay at their defaults there; ``n_test_other`` is its test budget for the base methods after zero-shot).
    ``rename`` (ours only): the vocabulary-misalignment setting (:mod:`cm_core.misalign`), the dataset's labels
    renamed by that scheme and ``own_words`` answering in the original names.
    """
    if protocol not in registry.PROTOCOLS:
        raise CMError(f"protocol must be one of {', '.join(registry.PROTOCOLS)}, got {protocol!r}")
    if methods is None:
        methods = PAPER_DEFAULT_METHODS if protocol == "paper" else DEFAULT_METHODS
    methods = methods_list(methods)
    if protocol == "paper":
        ours_only = {"pref_count": pref_count is not None, "temperature": temperature != 0.7,
                     "decoding": decoding != "score", "list_labels": list_labels is not None,
                     "calibrate": calibrate is not True, "rename": rename is not None}
        given = [k for k, v in ours_only.items() if v]
        if given:
            raise CMError(f"{', '.join(given)}: our protocol's settings; the paper protocol fixes them")
    elif n_test_other is not None:
        raise CMError("n_test_other belongs to the paper protocol")
    for m in methods:
        registry.split_method_name(m, protocol)
    if rename is not None and rename not in SCHEMES:
        raise CMError(f"rename must be one of {', '.join(SCHEMES)} or None, got {rename!r}")
    if decoding not in ("score", "generate"):
        raise CMError(f"decoding must be 'score' or 'generate', got {decoding!r}")
    if list_labels is not None and not isinstance(list_labels, bool):
        raise CMError(f"list_labels must be true, false or null (auto), got {list_labels!r}")
    return {"model": model, "base_url": base_url, "dataset": dataset,
            "pref_fraction": None if pref_count is not None else pref_fraction, "pref_count": pref_count,
            "temperature": temperature, "n_test": n_test, "methods": methods, "seed": seed,
            "decoding": decoding, "list_labels": list_labels, "calibrate": bool(calibrate),
            "protocol": protocol, "n_test_other": n_test_other, "rename": rename, "code": code_fingerprint()}


def load_reusable(results_path: str | os.PathLike | None, request: Mapping[str, Any]) -> dict | None:
    """The results JSON at ``results_path`` if an identical request wrote it, marked as reused; else None."""
    if not results_path or not Path(results_path).is_file():
        return None
    try:
        res = json.loads(Path(results_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(res, dict) or res.get("request") != dict(request) or "results" not in res:
        return None
    res.setdefault("run", {})["reused_from"] = str(results_path)
    return res


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write through a temporary file, so a concurrent reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def _evaluate(request: Mapping[str, Any], cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Run the evaluation a request describes; the model is loaded only when a method needs it."""
    from ..backends import make_backend
    from ..data import load_dataset
    from ..evaluate import run_evaluation
    from ..methods import Decoding

    r = request
    needs_llm = any(registry.needs_llm(m, r["protocol"]) for m in r["methods"])
    llm = make_backend(r["model"], cache_dir=cache_dir, base_url=r["base_url"]) if needs_llm else None
    try:
        if r["protocol"] == "paper":  # the official splits of the named dataset, read by the paper protocol
            return run_evaluation(r["dataset"], llm, r["methods"], protocol="paper", pref_fraction=r["pref_fraction"],
                                  n_test=r["n_test"], n_test_other=r["n_test_other"], seed=r["seed"])
        dec = Decoding(mode=r["decoding"], calibrate=r["calibrate"], list_labels=r["list_labels"], seed=r["seed"])
        ds, responses = load_dataset(r["dataset"]), None
        if r.get("rename"):
            ds, responses = misaligned(ds, r["rename"])
        res = run_evaluation(ds, llm, r["methods"], pref_fraction=r["pref_fraction"], pref_count=r["pref_count"],
                             n_test=r["n_test"], seed=r["seed"], bank_temperature=r["temperature"], decoding=dec,
                             responses=responses)
        res["config"]["rename"] = r.get("rename")
        return res
    finally:
        if llm is not None:
            llm.close()


def evaluate_run(*, cache_dir: str | os.PathLike = ".cm_cache", results_path: str | os.PathLike | None = None,
                 reuse: bool = True, **params: Any) -> dict[str, Any]:
    """Evaluate every base method and its CM variants, save the results JSON to ``results_path`` and return it.

    ``params`` are :func:`make_request`'s (model, dataset, pref_fraction, pref_count, temperature, n_test, methods,
    seed, decoding, list_labels, calibrate, base_url). With ``reuse``, a results JSON that an identical request
    wrote is returned as it is, without loading a model; LLM answers come from the response cache in ``cache_dir``.
    """
    request = make_request(**params)
    if reuse:
        res = load_reusable(results_path, request)
        if res is not None:
            return res
    res = _evaluate(request, cache_dir)
    res["request"] = request
    if results_path:
        write_json(results_path, res)
    return res


def inspect_bank(*, bank_method: str | None = None, cache_dir: str | os.PathLike = ".cm_cache",
                 results_path: str | os.PathLike | None = None, reuse: bool = True, **params: Any) -> dict[str, Any]:
    """The memory bank of ``bank_method`` (default: :func:`default_bank_method`) on this split, and how well it
    covers the labels and the test queries.

    Read from the results JSON of an identical evaluation when there is one (``source`` "results"); else the same
    evaluation runs for ``bank_method`` alone (the base and its +cm variant; LLM answers from the response cache,
    nothing written to ``results_path``) and the bank is read from it (``source`` "evaluated").

    Returns plain data: method, bank (MemoryBank dict), stats, coverage, test_pairs [[base answer, gold]],
    config, run, source, request.
    """
    request = make_request(**params)
    bank_method = bank_method or default_bank_method(request["methods"], request["protocol"])
    if registry.split_method_name(bank_method, request["protocol"])[1] is not None:
        raise CMError(f"bank_method names a base method (e.g. 'zero_shot'), got {bank_method!r}")
    key = "shared" if request["protocol"] == "paper" else bank_method  # the paper's one bank serves every method
    res, source = (load_reusable(results_path, request) if reuse else None), "results"
    if res is None or key not in res.get("banks", {}) or bank_method not in res.get("predictions", {}):
        res, source = _evaluate({**request, "methods": [bank_method]}, cache_dir), "evaluated"
    bank = MemoryBank.from_dict(res["banks"][key]["bank"])
    test_pairs = [[b, g] for b, g in zip(res["predictions"][bank_method], res["gold"])]
    return {"method": bank_method, "bank": bank.to_dict(), "stats": bank.stats(),
            "coverage": bank_coverage(bank, test_pairs, res["config"].get("n_labels")), "test_pairs": test_pairs,
            "config": res["config"], "run": res["run"], "source": source, "request": request}


def bank_coverage(bank: MemoryBank, test_pairs: Sequence[Sequence[str]], n_labels: int | None) -> dict[str, Any]:
    """Label coverage of the bank, and what the hard CM form does to the test queries' base answers."""
    covered = bank.stats()["distinct_labels"]
    hits = [b for b, _ in test_pairs if b in bank]
    n = len(test_pairs)
    return {"n_labels": n_labels or covered, "labels_covered": covered,
            "label_coverage": covered / n_labels if n_labels else 1.0,
            "n_test": n, "test_hits": len(hits), "test_coverage": len(hits) / n if n else 0.0,
            "test_map": sum(1 for b in hits if len(bank.counts[b]) == 1),
            "test_choose": sum(1 for b in hits if len(bank.counts[b]) > 1), "test_keep": n - len(hits)}
