"""Experiments: what the report notebooks call, and a runner for grids of models × datasets × preference sizes.

Notebooks (notebooks/evaluate.ipynb, notebooks/bank.ipynb) are thin: a papermill ``parameters`` cell, then
calls to :func:`evaluate_run` / :func:`inspect_bank` and to :mod:`cm_core.report`.

    python -m cm_core.experiments --grid notebooks/grids/ci.json --out reports

executes both notebooks for every cell of the grid with papermill, keeps each executed notebook in
``<out>/runs/<model>_<dataset>_<pref>/``, renders each to ``<out>/<id>_{evaluate,bank}.html`` without code, and
writes ``<out>/index.html``: the results in the paper's layout (methods × datasets) linking every report.

Re-running a finished grid takes seconds: a run whose parameters, library code, report code and notebooks are
unchanged is not executed again; after a change of the report code or notebooks the notebooks run again but take
the results JSON of an identical configuration and library code as it is; after a change of the library the
results are recomputed, with every LLM answer from the response cache (``cache_dir``). ``--force`` executes and
recomputes everything (still through the cache).

A grid is a JSON file (keys in :data:`GRID_KEYS`)::

    {"name": "ci", "models": ["embedded"], "datasets": ["massive_scenario", "banking77"],
     "pref_counts": [10], "n_test": 15, "methods": ["zero_shot", "label_similarity", "knn", "logreg"],
     "seed": 40, "cache_dir": ".cm_cache", "timeout": 1800}
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .errors import CMError, run_command

NOTEBOOKS = ("evaluate", "bank")
DEFAULT_METHODS = ["zero_shot", "zero_shot+cm_paper", "zero_shot+cm_soft", "label_similarity",
                   "label_similarity+cm", "knn", "logreg"]
GRID_KEYS = {
    "name": "a title for index.html",
    "description": "free text shown on index.html",
    "models": "model specs: embedded | openai:MODEL | hf:ID (default [\"embedded\"])",
    "datasets": "dataset names or files (required)",
    "pref_fractions": "preference samples as fractions of the dataset, e.g. [0.01, 0.02, 0.05]",
    "pref_counts": "preference samples as counts, e.g. [10] (with or instead of pref_fractions)",
    "n_test": "test queries per run (default 200)",
    "methods": "method names (list or comma-separated string)",
    "seed": "split and sampling seed (default 40)",
    "temperature": "sampling temperature of the memory bank (default 0.7)",
    "decoding": "score | generate (default score)",
    "list_labels": "show all labels in the prompt (default false, as the CLI)",
    "calibrate": "content-free calibration of scores (default true)",
    "base_url": "OpenAI-compatible server for openai:MODEL specs",
    "bank_method": "base method whose bank bank.ipynb inspects (default: the first base method)",
    "cache_dir": "response cache folder, relative to the working directory (default .cm_cache)",
    "timeout": "seconds one notebook cell may run (papermill execution_timeout, default 7200)",
    "threads": "CPU threads of torch/BLAS in the kernels (OMP_NUM_THREADS; default: the library's choice)",
    "jobs": "grid cells run at once, each in its own kernel (default 1; 2 with threads 1 suits a 2-core CPU)",
}
_LIBRARY_EXCLUDE = {"experiments.py", "report.py", "cli.py", "__main__.py"}


# --------------------------------------------------------------------------- helpers

def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def default_notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def code_fingerprint() -> str:
    """Hash of the library code that shapes results (not the report or CLI code); part of a run's identity."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*.py")):
        if p.name in _LIBRARY_EXCLUDE and p.parent == pkg:
            continue
        h.update(str(p.relative_to(pkg)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_stamp(params: Mapping[str, Any], nb_dir: Path) -> str:
    """Identity of one executed run: its parameters, the library code, the report code and the notebooks. A run
    whose stamp is unchanged is up to date and is not executed again."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256(json.dumps({k: v for k, v in sorted(params.items()) if k not in ("repo_root", "reuse", "cache_dir")},
                                  sort_keys=True, default=str).encode())
    h.update(code_fingerprint().encode())
    for p in [pkg / "report.py", pkg / "experiments.py"] + [Path(nb_dir) / f"{n}.ipynb" for n in NOTEBOOKS]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _methods_list(methods: str | Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        methods = methods.split(",")
    out = [m.strip() for m in methods if m and m.strip()]
    if not out:
        raise CMError("no methods given")
    return out


def _default_bank_method(methods: Sequence[str]) -> str:
    from .registry import BASELINES, split_method_name
    bases = list(dict.fromkeys(split_method_name(m)[0] for m in methods))
    llm = [b for b in bases if b not in BASELINES]
    return (llm or bases)[0]


def make_request(*, model: str, dataset: str, pref_fraction: float | None, pref_count: int | None,
                 temperature: float, n_test: int | None, methods: Sequence[str], seed: int, decoding: str,
                 list_labels: bool, calibrate: bool, base_url: str | None) -> dict[str, Any]:
    """Everything that determines a run's results (the library code included): equal requests, equal results."""
    return {"model": model, "base_url": base_url, "dataset": dataset,
            "pref_fraction": None if pref_count is not None else pref_fraction, "pref_count": pref_count,
            "temperature": temperature, "n_test": n_test, "methods": list(methods), "seed": seed,
            "decoding": decoding, "list_labels": bool(list_labels), "calibrate": bool(calibrate),
            "code": code_fingerprint()}


def _load_reusable(results_path, request: Mapping[str, Any]) -> dict | None:
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


def _write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def _decoding(decoding: str, seed: int, list_labels: bool, calibrate: bool):
    from .methods import Decoding
    if decoding not in ("score", "generate"):
        raise CMError(f"decoding must be 'score' or 'generate', got {decoding!r}")
    return Decoding(mode=decoding, calibrate=calibrate, list_labels=list_labels, seed=seed)


# --------------------------------------------------------------------------- what the notebooks call

def evaluate_run(*, model: str = "embedded", dataset: str, pref_fraction: float | None = 0.05,
                 pref_count: int | None = None, temperature: float = 0.7, n_test: int | None = 200,
                 methods: str | Sequence[str] = tuple(DEFAULT_METHODS), seed: int = 40, decoding: str = "score",
                 list_labels: bool = False, calibrate: bool = True, cache_dir: str | os.PathLike = ".cm_cache",
                 results_path: str | os.PathLike | None = None, base_url: str | None = None,
                 reuse: bool = True) -> dict[str, Any]:
    """Evaluate every base method and its CM variants (:func:`cm_core.evaluate.run_evaluation`), save the results
    JSON to ``results_path`` and return it. With ``reuse``, a results JSON written by an identical request (same
    parameters and library code) is returned as it is, without loading a model."""
    from .backends import make_backend
    from .data import load_dataset
    from .evaluate import run_evaluation
    from .registry import BASELINES, split_method_name

    methods = _methods_list(methods)
    for m in methods:
        split_method_name(m)
    request = make_request(model=model, dataset=dataset, pref_fraction=pref_fraction, pref_count=pref_count,
                           temperature=temperature, n_test=n_test, methods=methods, seed=seed, decoding=decoding,
                           list_labels=list_labels, calibrate=calibrate, base_url=base_url)
    if reuse:
        res = _load_reusable(results_path, request)
        if res is not None:
            return res
    if pref_count is not None:
        pref_fraction = None
    dec = _decoding(decoding, seed, list_labels, calibrate)
    ds = load_dataset(dataset)
    needs_llm = any(split_method_name(m)[0] not in BASELINES for m in methods)
    llm = make_backend(model, cache_dir=cache_dir, base_url=base_url) if needs_llm else None
    try:
        res = run_evaluation(ds, llm, methods, pref_fraction=pref_fraction, pref_count=pref_count, n_test=n_test,
                             seed=seed, bank_temperature=temperature, decoding=dec)
    finally:
        if llm is not None:
            llm.close()
    res["request"] = request
    if results_path:
        _write_json(results_path, res)
    return res


def inspect_bank(*, model: str = "embedded", dataset: str, pref_fraction: float | None = 0.05,
                 pref_count: int | None = None, temperature: float = 0.7, n_test: int | None = 200,
                 methods: str | Sequence[str] = tuple(DEFAULT_METHODS), seed: int = 40, decoding: str = "score",
                 list_labels: bool = False, calibrate: bool = True, cache_dir: str | os.PathLike = ".cm_cache",
                 results_path: str | os.PathLike | None = None, base_url: str | None = None, reuse: bool = True,
                 bank_method: str | None = None) -> dict[str, Any]:
    """The memory bank of ``bank_method`` (default: the first base method) on this split, and how well it covers
    the labels and the test queries. Taken from the results JSON of an identical evaluation when there is one,
    else estimated here exactly as the evaluation does (so its LLM calls come from the response cache).

    Returns plain data: method, bank (MemoryBank dict), stats, coverage, test_pairs [[base answer, gold]],
    config, run, source ("results" or "estimated").
    """
    from .bank import MemoryBank
    from .registry import BASELINES, split_method_name

    methods = _methods_list(methods)
    bank_method = bank_method or _default_bank_method(methods)
    split_method_name(bank_method)
    request = make_request(model=model, dataset=dataset, pref_fraction=pref_fraction, pref_count=pref_count,
                           temperature=temperature, n_test=n_test, methods=methods, seed=seed, decoding=decoding,
                           list_labels=list_labels, calibrate=calibrate, base_url=base_url)
    res = _load_reusable(results_path, request) if reuse else None
    if res is not None and bank_method in res.get("banks", {}) and bank_method in res.get("predictions", {}):
        bank = MemoryBank.from_dict(res["banks"][bank_method]["bank"])
        test_pairs = [[b, g] for b, g in zip(res["predictions"][bank_method], res["gold"])]
        config, run, source = res["config"], res["run"], "results"
    else:
        bank, test_pairs, config, run = _estimate_bank(
            model=model, dataset=dataset, pref_fraction=None if pref_count is not None else pref_fraction, pref_count=pref_count, temperature=temperature,
            n_test=n_test, seed=seed, dec=_decoding(decoding, seed, list_labels, calibrate), cache_dir=cache_dir,
            base_url=base_url, bank_method=bank_method, needs_llm=bank_method not in BASELINES)
        config["methods"] = [bank_method]
        source = "estimated"
    return {"method": bank_method, "bank": bank.to_dict(), "stats": bank.stats(),
            "coverage": bank_coverage(bank, test_pairs, config.get("n_labels")), "test_pairs": test_pairs,
            "config": config, "run": run, "source": source, "request": request}


def _estimate_bank(*, model, dataset, pref_fraction, pref_count, temperature, n_test, seed, dec, cache_dir, base_url,
                   bank_method, needs_llm):
    from dataclasses import asdict

    from .backends import make_backend
    from .cm import CM
    from .data import load_dataset, split_dataset
    from .evaluate import _package_versions
    from .registry import build_method

    t0 = time.time()
    ds = load_dataset(dataset)
    split = split_dataset(ds, pref_fraction=pref_fraction, pref_count=pref_count, n_test=n_test, seed=seed)
    llm = make_backend(model, cache_dir=cache_dir, base_url=base_url) if needs_llm else None
    try:
        base = build_method(bank_method, llm, ds.labels, dec)
        base.fit(split.preference.examples)
        cm = CM(base, temperature=temperature, seed=seed).fit(split.preference.examples, fit_base=False)
        base_test = [p.label for p in base.predict(split.test.texts)]
    finally:
        if llm is not None:
            llm.close()
    config = {"dataset": ds.name, "source": ds.source, "n_labels": len(ds.labels),
              "model": llm.identity() if llm is not None else None, "pref_fraction": pref_fraction,
              "pref_count": len(split.preference), "n_test": len(split.test), "seed": seed,
              "bank_temperature": temperature, "decoding": asdict(dec), "scoring": dec.mode}
    run = {"wall_time_s": round(time.time() - t0, 2), "llm_calls": asdict(llm.stats) if llm is not None else {},
           "versions": _package_versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return cm.bank_, [[b, g] for b, g in zip(base_test, split.test.targets)], config, run


def bank_coverage(bank, test_pairs: Sequence[Sequence[str]], n_labels: int | None) -> dict[str, Any]:
    """Label coverage of the bank, and what the hard CM form does to the test queries' base answers."""
    labels = {lab for row in bank.counts.values() for lab in row}
    hits = [b for b, _ in test_pairs if b in bank]
    n = len(test_pairs)
    return {"n_labels": n_labels or len(labels), "labels_covered": len(labels),
            "label_coverage": len(labels) / n_labels if n_labels else 1.0,
            "n_test": n, "test_hits": len(hits), "test_coverage": len(hits) / n if n else 0.0,
            "test_map": sum(1 for b in hits if len(bank.counts[b]) == 1),
            "test_choose": sum(1 for b in hits if len(bank.counts[b]) > 1), "test_keep": n - len(hits)}


# --------------------------------------------------------------------------- grids

def load_grid(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a grid file (JSON; YAML only where PyYAML happens to be installed)."""
    p = Path(path)
    if not p.is_file():
        raise CMError(f"grid file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise CMError(f"{p}: YAML grids need PyYAML; write the grid as JSON instead") from None
        grid = yaml.safe_load(text)
    else:
        try:
            grid = json.loads(text)
        except json.JSONDecodeError as e:
            raise CMError(f"{p}: malformed JSON ({e.msg}, line {e.lineno})") from None
    return check_grid(grid, str(p))


def check_grid(grid: Any, source: str = "<grid>") -> dict[str, Any]:
    from .registry import split_method_name
    if not isinstance(grid, dict):
        raise CMError(f"{source}: a grid must be a JSON object")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise CMError(f"{source}: unknown key(s) {unknown}; known: {sorted(GRID_KEYS)}")
    g = dict(grid)
    g.setdefault("name", Path(source).stem)
    g.setdefault("models", ["embedded"])
    for key in ("models", "datasets"):
        if isinstance(g.get(key), str):
            g[key] = [g[key]]
        if not g.get(key) or not all(isinstance(x, str) and x for x in g[key]):
            raise CMError(f"{source}: '{key}' must be a non-empty list of strings")
    fr, cn = g.get("pref_fractions"), g.get("pref_counts")
    if fr is None and cn is None:
        g["pref_fractions"] = [0.05]
    for key, ok in (("pref_fractions", lambda x: isinstance(x, (int, float)) and 0 < x <= 1),
                    ("pref_counts", lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0)):
        if key in g and g[key] is not None:
            if not isinstance(g[key], list) or not g[key] or not all(ok(x) for x in g[key]):
                raise CMError(f"{source}: '{key}' must be a non-empty list of "
                              f"{'fractions in (0, 1]' if key == 'pref_fractions' else 'positive integers'}")
    g["methods"] = _methods_list(g.get("methods", DEFAULT_METHODS))
    for m in g["methods"]:
        split_method_name(m)
    g.setdefault("n_test", 200)
    g.setdefault("seed", 40)
    g.setdefault("temperature", 0.7)
    g.setdefault("decoding", "score")
    g.setdefault("list_labels", False)
    g.setdefault("calibrate", True)
    g.setdefault("cache_dir", ".cm_cache")
    g.setdefault("timeout", 7200)
    for key in ("timeout", "threads", "jobs", "n_test", "seed"):
        v = g.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and key != "seed")):
            raise CMError(f"{source}: '{key}' must be a positive integer, got {v!r}")
    if g.get("bank_method"):
        split_method_name(g["bank_method"])
    return g


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def expand_grid(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The grid's cells, models × datasets × preference sizes, each with its id and notebook parameters."""
    prefs = [("fraction", f) for f in grid.get("pref_fractions") or []] + \
            [("count", c) for c in grid.get("pref_counts") or []]
    cells = []
    for model in grid["models"]:
        for dataset in grid["datasets"]:
            for mode, value in prefs:
                tag = f"{value:g}" if mode == "fraction" else f"n{value}"
                ds_name = Path(dataset).stem if os.sep in dataset or "/" in dataset else dataset
                cells.append({
                    "id": f"{_slug(model)}_{_slug(ds_name)}_{tag}", "model": model, "dataset": dataset,
                    "pref_mode": mode, "pref": f"{100 * value:g}% of the data" if mode == "fraction"
                    else f"{value} samples",
                    "params": {"model": model, "base_url": grid.get("base_url"), "dataset": dataset,
                               "pref_fraction": value if mode == "fraction" else None,
                               "pref_count": value if mode == "count" else None,
                               "temperature": grid["temperature"], "n_test": grid["n_test"],
                               "methods": list(grid["methods"]), "seed": grid["seed"], "decoding": grid["decoding"],
                               "list_labels": grid["list_labels"], "calibrate": grid["calibrate"],
                               "bank_method": grid.get("bank_method")}})
    return cells


@contextlib.contextmanager
def _kernel_env(root: Path, threads: int | None = None) -> Iterator[None]:
    """Environment the notebook kernels inherit: the repository on PYTHONPATH, no progress bars, inline figures,
    and with ``threads`` the CPU threads of torch / BLAS (1 is much faster on a CPU that other jobs share)."""
    saved = dict(os.environ)
    parts = [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(root)]
    os.environ.update({"PYTHONPATH": os.pathsep.join(parts), "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                       "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                       "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    if threads:
        os.environ.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_kernel(kernel: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        raise CMError(f"no Jupyter kernel named {kernel!r}: install one with `python -m ipykernel install --user "
                      f"--name {kernel}`, see `jupyter kernelspec list`") from None


def execute_notebook(src: Path, dst: Path, params: Mapping[str, Any], *, cwd: Path, kernel: str = "python3",
                     timeout: int | None = None) -> str | None:
    """Run one notebook with papermill; the executed notebook is written to ``dst`` even when a cell fails.
    Returns None on success, else the error as one line."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError
    declared = pm.inspect_notebook(str(src))
    wanted = {k: v for k, v in params.items() if k in declared}
    try:
        pm.execute_notebook(str(src), str(dst), parameters=wanted, kernel_name=kernel, cwd=str(cwd),
                            execution_timeout=timeout, progress_bar=False, log_output=False)
    except PapermillExecutionError as e:
        return f"{e.ename}: {e.evalue}".strip()
    except Exception as e:  # kernel died, cell timeout (nbclient.exceptions.CellTimeoutError), ...
        return f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
    return None


def run_grid(grid: Mapping[str, Any], out_dir: str | os.PathLike = "reports", *, cache_dir: str | None = None,
             timeout: int | None = None, kernel: str = "python3", notebooks_dir: str | os.PathLike | None = None,
             force: bool = False, only: str | None = None, threads: int | None = None, jobs: int | None = None,
             grid_source: str = "", log=print) -> list[dict[str, Any]]:
    """Execute the grid; write executed notebooks, HTML reports and index.html under ``out_dir``. Returns one
    record per cell (status "ok" or "failed", error, paths relative to ``out_dir``, the results dict).

    ``jobs`` > 1 runs that many cells at once, each in its own process and kernel (with ``threads=1`` this uses
    the cores better than one cell with several threads); they share the response cache safely.
    """
    out = Path(out_dir).resolve()
    nb_dir = Path(notebooks_dir).resolve() if notebooks_dir else default_notebooks_dir()
    for name in NOTEBOOKS:
        if not (nb_dir / f"{name}.ipynb").is_file():
            raise CMError(f"notebook not found: {nb_dir / f'{name}.ipynb'}")
    check_kernel(kernel)
    cache = Path(cache_dir or grid["cache_dir"]).resolve()
    timeout = int(timeout or grid.get("timeout") or 7200)
    threads = threads or grid.get("threads")
    jobs = jobs or grid.get("jobs") or 1
    all_cells = expand_grid(grid)
    cells = [c for c in all_cells if not only or only in c["id"]]
    if not cells:
        raise CMError(f"no grid cell matches {only!r}")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t_grid = time.time()
    root = repo_root()
    common = {"cache_dir": str(cache), "reuse": not force, "repo_root": str(root)}
    tasks = [dict(cell=c, out=str(out), nb_dir=str(nb_dir), common=common, kernel=kernel, timeout=timeout,
                  tag=f"[{i}/{len(cells)}]") for i, c in enumerate(cells, 1)]
    with _kernel_env(root, threads):
        if jobs > 1 and len(tasks) > 1:
            import concurrent.futures as cf
            import multiprocessing as mp
            with cf.ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=mp.get_context("spawn")) as ex:
                records = list(ex.map(_run_cell_logged, tasks))
        else:
            records = [run_cell(**t, log=log) for t in tasks]
    records = [_with_results(r, out) for r in records]
    # index.html covers the whole grid: cells not run this time (--only) show their last finished run, if any
    ran = {r["id"]: r for r in records}
    shown = [ran.get(c["id"]) or _previous_record(c, out) for c in all_cells]
    index = out / "index.html"
    index.write_text(render_index(grid, [r for r in shown if r], grid_source=grid_source,
                                  seconds=time.time() - t_grid), encoding="utf-8")
    log(f"wrote {index} ({sum(r['status'] == 'ok' for r in records)} of {len(records)} runs ok, "
        f"{time.time() - t_grid:.0f}s)")
    return records


def _run_cell_logged(task: dict) -> dict:
    return run_cell(**task, log=lambda msg: print(msg, flush=True))


def run_cell(*, cell: Mapping[str, Any], out: str, nb_dir: str, common: Mapping[str, Any], kernel: str,
             timeout: int, tag: str = "", log=print) -> dict[str, Any]:
    """Execute evaluate.ipynb then bank.ipynb for one grid cell; render both to HTML; write runs/<id>/run.json."""
    from .report import notebook_to_html
    out_p, nb_p = Path(out), Path(nb_dir)
    run_dir = out_p / "runs" / cell["id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.json"
    params = {**cell["params"], **common, "results_path": str(results_path)}
    stamp = run_stamp(params, nb_p)
    if common.get("reuse", True):
        prev = _previous_record(cell, out_p, load_results=False)
        if prev and prev.get("stamp") == stamp and prev.get("status") == "ok" and results_path.is_file() and all(
                (out_p / f).is_file() for f in [*prev["notebooks"].values(), *prev["html"].values()]):
            log(f"{tag} {cell['id']}: up to date (same parameters, code and notebooks), not run again".strip())
            return {**prev, "up_to_date": True}
    rec = {k: cell[k] for k in ("id", "model", "dataset", "pref_mode", "pref")}
    rec.update(status="ok", error=None, notebooks={}, html={}, seconds={}, stamp=stamp)
    for name in NOTEBOOKS:
        dst, page = run_dir / f"{name}.ipynb", out_p / f"{cell['id']}_{name}.html"
        if rec["status"] != "ok":  # not run after a failure: drop what an earlier run left
            dst.unlink(missing_ok=True)
            page.unlink(missing_ok=True)
            rec["seconds"][name] = None
            continue
        t0 = time.time()
        err = execute_notebook(nb_p / f"{name}.ipynb", dst, params, cwd=run_dir, kernel=kernel, timeout=timeout)
        rec["seconds"][name] = round(time.time() - t0, 1)
        if dst.is_file():  # papermill writes the executed notebook even when a cell failed
            rec["notebooks"][name] = dst.relative_to(out_p).as_posix()
            try:
                notebook_to_html(dst, page, title=f"{name} · {cell['id']}")
                rec["html"][name] = page.name
            except Exception as e:  # a report that cannot be rendered is a failure, not a crash
                err = err or f"HTML export failed: {type(e).__name__}: {e}"
        if err:
            rec.update(status="failed", error=f"{name}.ipynb: {err}")
        log(f"{tag} {cell['id']}: {name} {'ok' if not err else 'FAILED: ' + err} ({rec['seconds'][name]}s)".strip())
    if results_path.is_file():
        rec["results_json"] = results_path.relative_to(out_p).as_posix()
    _write_json(run_dir / "run.json", rec)
    return rec


def _with_results(rec: dict, out: Path) -> dict:
    path = out / rec["results_json"] if rec.get("results_json") else None
    if rec.get("status") == "ok" and path is not None and path.is_file():
        rec["results"] = json.loads(path.read_text(encoding="utf-8"))
    return rec


def _previous_record(cell: Mapping[str, Any], out: Path, load_results: bool = True) -> dict | None:
    path = out / "runs" / cell["id"] / "run.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        return _with_results(rec, out) if load_results else rec
    except (OSError, json.JSONDecodeError, KeyError):
        return None


# --------------------------------------------------------------------------- index.html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#f6f6f6}
td:first-child,th:first-child{text-align:left}
table.paper th.variant{font-weight:normal;padding-left:2em;background:#fff}
table.paper tr.sep th,table.paper tr.sep td{border-top:2px solid #888}
small{color:#666}.failed{color:#b00}.note{color:#555;font-size:90%}
"""


def render_index(grid: Mapping[str, Any], records: Sequence[Mapping[str, Any]], *, grid_source: str = "",
                 seconds: float | None = None) -> str:
    from . import __version__
    from .report import figure_png_base64, fraction_figure, paper_table_html, verdict
    esc = html.escape
    ok = [r for r in records if r.get("results")]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(str(grid.get('name')))} · CM results"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Consistent Marginalization · {esc(str(grid.get('name')))}</h1>"]
    if grid.get("description"):
        parts.append(f"<p>{esc(str(grid['description']))}</p>")
    parts.append(
        f"<p class='note'>Grid {esc(grid_source)}: models {esc(', '.join(grid['models']))}; datasets "
        f"{esc(', '.join(grid['datasets']))}; n_test {grid['n_test']}; seed {grid['seed']}; methods "
        f"{esc(', '.join(grid['methods']))}. {len(ok)} of {len(records)} runs finished"
        + (f" in {seconds:.0f} s" if seconds is not None else "")
        + f"; cm_core {__version__} (code {code_fingerprint()}); generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>")
    parts.append("<h2>Accuracy (%) with 95% bootstrap CI</h2><p class='note'>Rows: base methods, each followed by "
                 "its CM variants, then the embedding baselines fitted on the same preference samples. "
                 "<b>Bold</b>: a CM variant significantly better than its base (exact McNemar test, p &lt; 0.05, "
                 "positive Δ); hover a cell for Δ and p. Dataset headers link to the run's report.</p>")
    parts.append(paper_table_html(ok, link=lambda r: r["html"].get("evaluate")))
    fig = fraction_figure(ok)
    if fig is not None:
        parts.append("<h2>Accuracy against the number of preference samples</h2>"
                     f"<img alt='accuracy vs preference fraction' src='data:image/png;base64,"
                     f"{figure_png_base64(fig)}'>")
    verdicts = [f"<li><a href='{esc(r['html']['evaluate'])}'>{esc(r['id'])}</a>: {esc(verdict(r['results']))}</li>"
                for r in ok if "evaluate" in r["html"]]
    if verdicts:
        parts.append("<h2>Which method wins</h2><ul>" + "".join(verdicts) + "</ul>")
    parts.append("<h2>Runs</h2><table><thead><tr><th>run</th><th>model</th><th>dataset</th><th>preference</th>"
                 "<th>n_test</th><th>status</th><th>wall time</th><th>LLM calls</th><th>reports</th><th>files</th>"
                 "</tr></thead><tbody>")
    for r in records:
        res = r.get("results")
        links = " · ".join(f"<a href='{esc(r['html'][n])}'>{n}</a>" for n in NOTEBOOKS if n in r["html"])
        files = " · ".join([f"<a href='{esc(r['notebooks'][n])}'>{n}.ipynb</a>" for n in NOTEBOOKS
                            if n in r["notebooks"]] + ([f"<a href='{esc(r['results_json'])}'>results.json</a>"]
                                                       if r.get("results_json") else []))
        if res:
            run = res.get("run", {})
            calls = run.get("llm_calls") or {}
            n_calls = calls.get("score_calls", 0) + calls.get("generate_calls", 0)
            status = "ok" + (" <small>(results reused)</small>" if run.get("reused_from") else "")
            wall = f"{run.get('wall_time_s', 0):.1f} s"
            ncalls = f"{n_calls} <small>(+{calls.get('cache_hits', 0)} cached)</small>"
            n_test = res["config"].get("n_test")
        else:
            status = f"<span class='failed'>failed</span><br><small>{esc(str(r.get('error') or ''))}</small>"
            wall, ncalls, n_test = "", "", ""
        parts.append(f"<tr><td>{esc(r['id'])}</td><td>{esc(r['model'])}</td><td>{esc(r['dataset'])}</td>"
                     f"<td>{esc(r['pref'])}</td><td>{n_test}</td><td>{status}</td><td>{wall}</td><td>{ncalls}</td>"
                     f"<td>{links}</td><td>{files}</td></tr>")
    parts.append("</tbody></table><p class='note'>Wall time and LLM calls are those of the run that computed the "
                 "results; LLM calls answered from the response cache are counted apart.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cm_core.experiments",
                                 description="Run a grid of models × datasets × preference sizes through the report "
                                             "notebooks (papermill) and write HTML reports and an index.")
    ap.add_argument("--grid", required=True, help="grid file (JSON), e.g. notebooks/grids/ci.json")
    ap.add_argument("--out", default="reports", help="output folder (default: reports)")
    ap.add_argument("--cache-dir", default=None, help="response cache folder (default: the grid's cache_dir)")
    ap.add_argument("--timeout", type=int, default=None, help="seconds one notebook cell may run")
    ap.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    ap.add_argument("--notebooks", default=None, help="folder holding evaluate.ipynb and bank.ipynb")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch/BLAS in the notebook kernels (OMP_NUM_THREADS); 1 is fastest on a "
                         "CPU shared with other jobs")
    ap.add_argument("--jobs", type=int, default=None,
                    help="grid cells to run at once, each in its own kernel (default: the grid's jobs, else 1; use "
                         "with --threads 1 on 2+ cores)")
    ap.add_argument("--only", default=None, help="run only the cells whose id contains this text")
    ap.add_argument("--force", action="store_true",
                    help="execute every run again and recompute its results, even when it is up to date (LLM "
                         "answers still come from the response cache)")
    ap.add_argument("--list", action="store_true", help="print the grid's cells and exit")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def body() -> int:
        grid = load_grid(a.grid)
        if a.list:
            for c in expand_grid(grid):
                if not a.only or a.only in c["id"]:
                    print(c["id"])
            return 0
        records = run_grid(grid, a.out, cache_dir=a.cache_dir, timeout=a.timeout, kernel=a.kernel,
                           notebooks_dir=a.notebooks, force=a.force, only=a.only, threads=a.threads, jobs=a.jobs,
                           grid_source=a.grid)
        failed = [r for r in records if r["status"] != "ok"]
        for r in failed:
            print(f"FAILED {r['id']}: {r['error']}", file=sys.stderr)
        return 1 if failed else 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
