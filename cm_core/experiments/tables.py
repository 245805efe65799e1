"""Markdown results tables of a grid's output folder, for the README and the notes: rows are methods, columns
datasets, one table per (model, preference setting); each cell is accuracy with its 95% bootstrap CI and, for a
CM variant, Δ and the exact McNemar p against its base.

    python -m cm_core.experiments.tables reports/misalign_codes [reports/paper ...]
    python -m cm_core.experiments.tables --readme README.md

``--readme`` refills every block of a markdown file written as ``<!-- tables FOLDER [FOLDER ...] -->`` ...
``<!-- /tables -->`` with the tables of those folders (relative to the file's directory), so the README's numbers
are always the committed runs' numbers and one command updates them.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import report
from .grid import finished_runs


def _cell(r: Mapping[str, Any]) -> str:
    ci = r.get("ci95") or [0, 0]
    text = f"{100 * r['accuracy']:.1f} [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
    if r.get("p_value") is not None:
        text += f" Δ{100 * r['delta']:+.1f} p{report.p_equals(r['p_value'])}"
        if report.is_significant(r):
            text = f"**{text}**"
    return text


def markdown_tables(runs: Sequence[Mapping[str, Any]]) -> str:
    """One markdown table per (model, preference setting)."""
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["model"], r["pref"]), []).append(r)
    parts = []
    for (model, pref), group in groups.items():
        datasets = list(dict.fromkeys(r["dataset"] for r in group))
        by_ds = {r["dataset"]: r["results"] for r in group}
        scored = {d: {m: v for m, v in res["results"].items() if "accuracy" in v} for d, res in by_ds.items()}
        methods = report.method_order({m for s in scored.values() for m in s})
        n = ", ".join(f"{d} {by_ds[d]['config']['n_test']}" for d in datasets)
        lines = [f"**{model} · preference samples: {pref}** (n_test: {n})", "",
                 "| method | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_cell(scored[d][m]) if m in scored[d] else "–"
                                                   for d in datasets) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def folder_tables(folder: str | Path, heading: str = "###", name: str | None = None) -> str:
    runs = finished_runs(folder)
    body = markdown_tables(runs) if runs else "no finished runs\n"
    return f"{heading} `{name or Path(folder).as_posix()}` ({len(runs)} finished runs)\n\n{body}"


_BLOCK = re.compile(r"(<!-- tables ([^>]*?) -->\n)(.*?)(<!-- /tables -->)", re.S)


def refill(text: str, root: str | Path) -> str:
    """``text`` with each ``<!-- tables ... -->`` block's body replaced by the named folders' tables."""
    def body(m: re.Match) -> str:
        folders = m.group(2).split()
        tables = "\n".join(folder_tables(Path(root) / f, "####", f) for f in folders)
        return f"{m.group(1)}{tables}{m.group(4)}"
    return _BLOCK.sub(body, text)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    if args[:1] == ["--readme"] and len(args) == 2:
        path = Path(args[1])
        text = path.read_text(encoding="utf-8")
        new = refill(text, path.parent)
        path.write_text(new, encoding="utf-8")
        print(f"{path}: {len(_BLOCK.findall(text))} table block(s) refilled")
        return 0
    if not args or args[0].startswith("-"):
        print(__doc__.strip().splitlines()[4].strip(), file=sys.stderr)
        return 2
    for folder in args:
        print(folder_tables(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
