"""Experiments: the API the report notebooks call, and a runner for grids of models × datasets × preference sizes.

The notebooks (notebooks/evaluate.ipynb, notebooks/bank.ipynb) are thin: a ``parameters`` cell, then calls to
:func:`evaluate_run` / :func:`inspect_bank` and to :mod:`cm_core.report`.

    python -m cm_core.experiments --grid notebooks/grids/ci.json --out reports

executes both notebooks for every cell of the grid, renders each to HTML without code, and writes
``<out>/index.html``: the results in the paper's layout (methods × datasets) linking every report.

Re-running a finished grid takes seconds: a run whose parameters, library code, report code and notebooks are
unchanged is not executed again; after a change of the report code or notebooks the notebooks run again but take
the results JSON of an identical request as it is; after a change of the library the results are recomputed, with
every LLM answer from the response cache (``cache_dir``). A grid is a JSON file with the keys of :data:`GRID_KEYS`.

One module per job:

- :mod:`.notebook_api`: ``evaluate_run``, ``inspect_bank``, the request that identifies a run's results;
- :mod:`.fingerprint`: which files make a run what it is (results reuse, up-to-date runs);
- :mod:`.grid`: grid files, executing the notebooks, the command line;
- :mod:`.index_page`: index.html, from ``templates/index.html.j2``.
"""
from .fingerprint import NOTEBOOKS, code_fingerprint, run_stamp
from .grid import GRID_KEYS, check_grid, expand_grid, load_grid, main, run_cell, run_grid
from .index_page import render_index
from .notebook_api import (DEFAULT_METHODS, bank_coverage, default_bank_method, evaluate_run, inspect_bank,
                           load_reusable, make_request)

__all__ = ["evaluate_run", "inspect_bank", "bank_coverage", "make_request", "load_reusable", "default_bank_method",
           "DEFAULT_METHODS", "NOTEBOOKS", "GRID_KEYS", "load_grid", "check_grid", "expand_grid", "run_grid",
           "run_cell", "main", "render_index", "code_fingerprint", "run_stamp"]
