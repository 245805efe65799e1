"""Markdown results tables of a grid's output folder, for the README and the notes: rows are methods, columns
datasets, one table per (model, preference setting); each cell is accuracy with its 95% bootstrap CI and, for a
CM variant, Δ and the exact McNemar p against its base.

    python -m cm_core.experiments.tables reports/misalign_codes [reports/paper ...]
"""
from __future__ import annotations

import sys
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


def main(argv: Sequence[str] | None = None) -> int:
    folders = list(argv if argv is not None else sys.argv[1:])
    if not folders:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for folder in folders:
        runs = finished_runs(folder)
        print(f"### {folder} ({len(runs)} finished runs)\n")
        print(markdown_tables(runs) if runs else "no finished runs\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
