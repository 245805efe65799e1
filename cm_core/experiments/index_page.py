"""``index.html`` of a grid: its results in the paper's layout, linking every run's reports and files.

Rendered from ``templates/index.html.j2`` with autoescaping on: grid names and descriptions, run ids and error
messages come from files and exceptions and are escaped; only the HTML that :mod:`cm_core.report` builds itself
is inserted as it is.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2

from .. import report
from .fingerprint import NOTEBOOKS, code_fingerprint

TEMPLATES = Path(__file__).resolve().parent / "templates"
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_index(grid: Mapping[str, Any], records: Sequence[Mapping[str, Any]], *, grid_source: str = "",
                 seconds: float | None = None, sections: Sequence[Mapping[str, Any]] = ()) -> str:
    """The page for ``grid`` (as :func:`cm_core.experiments.grid.check_grid` returns it) over run records (as
    :func:`cm_core.experiments.grid.run_cell` returns them, with their results dicts). ``sections``: other grids'
    finished runs (``{"folder", "records"}``), each shown as its own results table linking into its folder."""
    from .. import __version__
    ok = [r for r in records if r.get("results")]
    fig = report.fraction_figure(ok)
    return _ENV.get_template("index.html.j2").render(
        grid=grid, grid_source=grid_source, n_ok=len(ok), n_runs=len(records), seconds=seconds,
        version=__version__, code=code_fingerprint(), generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        paper_table=report.paper_table_html(ok, link=lambda r: r["html"].get("evaluate")),
        fraction_png=report.figure_png_base64(fig) if fig is not None else None,
        verdicts=[{"href": r["html"]["evaluate"], "id": r["id"],
                   "text": f"{report.verdict(r['results'])} {report.cm_verdict(r['results'])}"}
                  for r in ok if "evaluate" in r["html"]],
        runs=[_run_row(r) for r in records], sections=[_section(s) for s in sections])


def _section(section: Mapping[str, Any]) -> dict[str, Any]:
    """Another grid's results, summarized from its runs' results: what made them and its table."""
    folder, recs = section["folder"], section["records"]
    configs = [r["results"]["config"] for r in recs]
    protocols = sorted({c.get("protocol", "ours") for c in configs})
    renames = sorted({c["rename"] for c in configs if c.get("rename")})
    return {"folder": folder, "href": f"{folder}/index.html", "n_runs": len(recs), "protocols": protocols,
            "setting": report.rename_text(configs[0]) if renames else "",
            "table": report.paper_table_html(recs, link=lambda r: f"{folder}/{r['html']['evaluate']}"
                                             if "evaluate" in r.get("html", {}) else None)}


def _run_row(r: Mapping[str, Any]) -> dict[str, Any]:
    """One line of the runs table: plain values, the template escapes them."""
    files = [(f"{n}.ipynb", r["notebooks"][n]) for n in NOTEBOOKS if n in r["notebooks"]]
    if r.get("results_json"):
        files.append(("results.json", r["results_json"]))
    row = {"id": r["id"], "model": r["model"], "dataset": r["dataset"], "pref": r["pref"],
           "reports": [(n, r["html"][n]) for n in NOTEBOOKS if n in r["html"]], "files": files,
           "ok": bool(r.get("results")), "error": str(r.get("error") or "")}
    if row["ok"]:
        run = r["results"].get("run", {})
        calls = run.get("llm_calls") or {}
        row.update(n_test=r["results"]["config"].get("n_test"), reused=bool(run.get("reused_from")),
                   wall_s=run.get("wall_time_s", 0), cached=calls.get("cache_hits", 0),
                   calls=calls.get("score_calls", 0) + calls.get("generate_calls", 0))
    return row
