"""Which files make a run what it is, as two hashes.

``code_fingerprint``: the library code that shapes results. It is part of a results request, so a saved results
JSON is reused only while that code is unchanged; presentation code (this package, report.py, the command lines)
is left out, so editing a report does not recompute results.

``run_stamp``: one grid cell's parameters, that code, the presentation code and the notebooks. An unchanged
stamp means the executed notebooks and their HTML are up to date and are not run again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

PACKAGE = Path(__file__).resolve().parent  # cm_core/experiments
LIBRARY = PACKAGE.parent  # cm_core
NOTEBOOKS = ("evaluate", "bank")  # the report notebooks, in the order a grid cell executes them
# shape what a report shows, not the results
PRESENTATION = (LIBRARY / "report.py", LIBRARY / "cli.py", LIBRARY / "__main__.py")
# notebook parameters that say where things are or whether to reuse them, not what is computed
_NOT_IDENTITY = ("repo_root", "reuse", "cache_dir")


def repo_root() -> Path:
    return LIBRARY.parent


def default_notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern)
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _hash_files(h, files: Iterable[Path], base: Path) -> None:
    for p in files:
        h.update(p.relative_to(base).as_posix().encode())
        h.update(p.read_bytes())


def code_fingerprint() -> str:
    """Hash of cm_core's Python files except this package and the presentation code."""
    h = hashlib.sha256()
    _hash_files(h, [p for p in _files(LIBRARY, "*.py") if p not in PRESENTATION and PACKAGE not in p.parents],
                LIBRARY)
    return h.hexdigest()[:16]


def run_stamp(params: Mapping[str, Any], nb_dir: str | Path) -> str:
    """Hash of a grid cell's parameters, the library code, this package (template included), report.py and the
    notebooks in ``nb_dir``."""
    identity = {k: v for k, v in sorted(params.items()) if k not in _NOT_IDENTITY}
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    h.update(code_fingerprint().encode())
    _hash_files(h, [LIBRARY / "report.py", *_files(PACKAGE, "*")], LIBRARY)
    for name in NOTEBOOKS:
        h.update(Path(nb_dir, f"{name}.ipynb").read_bytes())
    return h.hexdigest()[:16]
