"""Grids of models × datasets × preference sizes: the grid file, running its cells through the report notebooks
with papermill, and the command line ``python -m cm_core.experiments --grid FILE --out DIR``.

Each cell's executed notebooks stay in ``<out>/runs/<id>/``, their HTML (no code) in ``<out>/<id>_{evaluate,bank}
.html``, and ``<out>/index.html`` links them all. A cell whose :func:`run_stamp` is unchanged is not run again;
``--force`` runs and recomputes everything (LLM answers still come from the response cache).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .. import registry
from ..errors import CMError, run_command
from .fingerprint import NOTEBOOKS, default_notebooks_dir, repo_root, run_stamp
from .index_page import render_index
from .notebook_api import make_request, write_json

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
    "list_labels": "show all labels in the prompt: true | false | null (default null: only when the model must "
                   "write a label, i.e. decoding generate)",
    "calibrate": "content-free calibration of scores (default true)",
    "protocol": "ours (calibrated scoring, soft CM, de-duplicated splits; default) | paper (the official experiment: "
                "its splits, prompts, decoding, strict scoring and one shared zero-shot bank)",
    "n_test_other": "paper protocol: test queries of the base methods after zero-shot (default: n_test)",
    "rename": "ours protocol: codes | nicknames, the vocabulary-misalignment setting (the user's labels renamed, "
              "own_words answering in the original names; cm_core/misalign.py). Default null: the labels as they are",
    "base_url": "OpenAI-compatible server for openai:MODEL specs",
    "bank_method": "base method whose bank bank.ipynb inspects (default: the first base method using the LLM)",
    "cache_dir": "response cache folder, relative to the working directory (default .cm_cache)",
    "timeout": "seconds one notebook cell may run (papermill execution_timeout, default 7200)",
    "threads": "CPU threads of torch/BLAS in the kernels (OMP_NUM_THREADS; default: the library's choice)",
    "jobs": "grid cells run at once, each in its own kernel (default 1; 2 with threads 1 suits a 2-core CPU)",
    "sections": "output folders of other grids, relative to --out (e.g. [\"paper\", \"misalign_codes\"]): index.html "
                "shows each one's results table as a section and links its own index",
}


# --------------------------------------------------------------------------- the grid file

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
    """The grid with its defaults filled in; one CMError naming the key for anything malformed."""
    if not isinstance(grid, dict):
        raise CMError(f"{source}: a grid must be a JSON object")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise CMError(f"{source}: unknown key(s) {unknown}; known: {sorted(GRID_KEYS)}")
    g = {"name": Path(source).stem, "models": ["embedded"], "n_test": 200, "seed": 40, "temperature": 0.7,
         "decoding": "score", "list_labels": None, "calibrate": True, "cache_dir": ".cm_cache", "timeout": 7200,
         "protocol": "ours", **grid}
    for key in ("models", "datasets"):
        if isinstance(g.get(key), str):
            g[key] = [g[key]]
        if not g.get(key) or not all(isinstance(x, str) and x for x in g[key]):
            raise CMError(f"{source}: '{key}' must be a non-empty list of strings")
    if g.get("pref_fractions") is None and g.get("pref_counts") is None:
        g["pref_fractions"] = [0.05]
    for key, ok in (("pref_fractions", lambda x: isinstance(x, (int, float)) and 0 < x <= 1),
                    ("pref_counts", lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0)):
        if g.get(key) is not None and (not isinstance(g[key], list) or not g[key] or not all(map(ok, g[key]))):
            raise CMError(f"{source}: '{key}' must be a non-empty list of "
                          f"{'fractions in (0, 1]' if key == 'pref_fractions' else 'positive integers'}")
    try:  # what the notebooks will check: method names, decoding, list_labels
        g["methods"] = make_request(dataset=g["datasets"][0], methods=g.get("methods"),
                                    decoding=g["decoding"], list_labels=g["list_labels"], protocol=g["protocol"],
                                    temperature=g["temperature"], calibrate=g["calibrate"],
                                    n_test_other=g.get("n_test_other"), rename=g.get("rename"))["methods"]
    except CMError as e:
        raise CMError(f"{source}: {e}") from None
    for key in ("timeout", "threads", "jobs", "n_test", "seed", "n_test_other"):
        v = g.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and key != "seed")):
            raise CMError(f"{source}: '{key}' must be a positive integer, got {v!r}")
    sections = g.get("sections")
    if sections is not None and (not isinstance(sections, list) or not all(
            isinstance(x, str) and x and not Path(x).is_absolute() and ".." not in Path(x).parts for x in sections)):
        raise CMError(f"{source}: 'sections' must be a list of folders inside --out, got {sections!r}")
    if not isinstance(g["calibrate"], bool):
        raise CMError(f"{source}: 'calibrate' must be true or false, got {g['calibrate']!r}")
    if g.get("bank_method") and registry.split_method_name(g["bank_method"])[1] is not None:
        raise CMError(f"{source}: 'bank_method' must be a base method, got {g['bank_method']!r}")
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
                protocol = grid.get("protocol", "ours")
                prefix = "" if protocol == "ours" else f"{protocol}_"  # ours keeps the ids it always had
                prefix += f"{grid['rename']}_" if grid.get("rename") else ""
                cells.append({
                    "id": f"{prefix}{_slug(model)}_{_slug(ds_name)}_{tag}", "model": model, "dataset": dataset,
                    "protocol": protocol,
                    "pref_mode": mode, "pref": f"{100 * value:g}% of the data" if mode == "fraction"
                    else f"{value} samples",
                    "params": {"model": model, "base_url": grid.get("base_url"), "dataset": dataset,
                               "pref_fraction": value if mode == "fraction" else None,
                               "pref_count": value if mode == "count" else None,
                               "temperature": grid["temperature"], "n_test": grid["n_test"],
                               "methods": list(grid["methods"]), "seed": grid["seed"], "decoding": grid["decoding"],
                               "list_labels": grid["list_labels"], "calibrate": grid["calibrate"],
                               "bank_method": grid.get("bank_method"), "protocol": protocol,
                               "n_test_other": grid.get("n_test_other"), "rename": grid.get("rename")}})
    return cells


# --------------------------------------------------------------------------- executing notebooks

@contextlib.contextmanager
def _kernel_env(root: Path, threads: int | None = None) -> Iterator[None]:
    """Environment the notebook kernels inherit: the repository on PYTHONPATH, no progress bars, inline figures,
    and with ``threads`` the CPU threads of torch / BLAS (1 is much faster on a CPU that other jobs share)."""
    saved = dict(os.environ)
    parts = [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(root)]
    os.environ.update({"PYTHONPATH": os.pathsep.join(parts), "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                       "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                       "MPLBACKEND": "module://matplotlib_inline.backend_inline",
                       "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
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


def make_portable(path: Path, root: Path) -> None:
    """Strip what only the machine that ran a notebook knows from it (or from a results JSON): paths under the
    repository become repository-relative, and a notebook's stderr streams (library warnings that name
    site-packages files) are dropped. Errors stay: a failed cell keeps its traceback."""
    text = path.read_text(encoding="utf-8")
    for prefix in (str(root) + os.sep, str(root)):
        escaped = json.dumps(prefix)[1:-1]
        text = text.replace(escaped, "" if prefix.endswith(os.sep) else ".")
    if path.suffix == ".ipynb":
        nb = json.loads(text)
        for cell in nb.get("cells", []):
            if "outputs" in cell:
                cell["outputs"] = [o for o in cell["outputs"]
                                   if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


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
    index = write_index(grid, out, {r["id"]: r for r in records}, grid_source, seconds=time.time() - t_grid)
    log(f"wrote {index} ({sum(r['status'] == 'ok' for r in records)} of {len(records)} runs ok, "
        f"{time.time() - t_grid:.0f}s)")
    return records


def write_index(grid: Mapping[str, Any], out: Path, ran: Mapping[str, dict] | None = None, grid_source: str = "",
                seconds: float | None = None) -> Path:
    """``<out>/index.html`` over the whole grid (a cell not run this time shows its last finished run, if any),
    with the tables of the grids named in ``sections``, read from their own output folders."""
    ran = ran or {}
    shown = [ran.get(c["id"]) or _previous_record(c, out) for c in expand_grid(grid)]
    sections = []
    for folder in grid.get("sections") or []:
        sections.append({"folder": folder, "records": finished_runs(out / folder)})
    index = out / "index.html"
    index.write_text(render_index(grid, [r for r in shown if r], grid_source=grid_source, seconds=seconds,
                                  sections=sections), encoding="utf-8")
    return index


def _run_cell_logged(task: dict) -> dict:
    return run_cell(**task, log=lambda msg: print(msg, flush=True))


def run_cell(*, cell: Mapping[str, Any], out: str, nb_dir: str, common: Mapping[str, Any], kernel: str,
             timeout: int, tag: str = "", log=print) -> dict[str, Any]:
    """Execute evaluate.ipynb then bank.ipynb for one grid cell; render both to HTML; write runs/<id>/run.json."""
    from ..report import notebook_to_html
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
            make_portable(dst, Path(common["repo_root"]))
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
        make_portable(results_path, Path(common["repo_root"]))
        rec["results_json"] = results_path.relative_to(out_p).as_posix()
    write_json(run_dir / "run.json", rec)
    return rec


def finished_runs(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The finished runs stored in a grid's output folder (``runs/*/run.json``), each with its results."""
    out = Path(out)
    records = [_with_results(json.loads(p.read_text(encoding="utf-8")), out)
               for p in sorted(out.glob("runs/*/run.json"))]
    return [r for r in records if r.get("results")]


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


# --------------------------------------------------------------------------- command line

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
    ap.add_argument("--index-only", action="store_true",
                    help="render index.html from the runs already in --out (and its sections), running nothing")
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
        if a.index_only:
            print(f"wrote {write_index(grid, Path(a.out).resolve(), grid_source=a.grid)}")
            return 0
        records = run_grid(grid, a.out, cache_dir=a.cache_dir, timeout=a.timeout, kernel=a.kernel,
                           notebooks_dir=a.notebooks, force=a.force, only=a.only, threads=a.threads, jobs=a.jobs,
                           grid_source=a.grid)
        failed = [r for r in records if r["status"] != "ok"]
        for r in failed:
            print(f"FAILED {r['id']}: {r['error']}", file=sys.stderr)
        return 1 if failed else 0

    return run_command(body)
