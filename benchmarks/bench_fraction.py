"""Accuracy against preference fraction (0.01, 0.02, 0.05) for an LLM+CM variant, logistic regression and kNN,
with the time each takes to adapt to a new user (fit on that user's preference samples, cold caches).

    python -m benchmarks.bench_fraction --datasets clinc,banking77 --n-test 200
Writes benchmarks/results/fraction.json and benchmarks/results/fraction.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cm_core.backends import make_backend
from cm_core.data import load_dataset, split_dataset
from cm_core.embeddings import get_embedder
from cm_core.evaluate import run_evaluation
from cm_core.methods import Decoding
from cm_core.registry import build


def decoding(seed: int) -> Decoding:
    """The library's one default (labels scored as replies, not listed in the prompt), as the CLI and the report
    grid use it, so the answers at fraction 0.05 are those of the reports."""
    return Decoding(seed=seed)


def adaptation_seconds(name: str, llm, labels, samples, seed: int) -> float:
    """Wall time of fitting on one user's samples with nothing cached (embeddings and LLM answers recomputed)."""
    get_embedder()._memo.clear()
    method = build(name, labels=labels, llm=llm, decoding=decoding(seed), seed=seed)
    t0 = time.perf_counter()
    method.fit(samples)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="clinc,banking77")
    ap.add_argument("--fractions", default="0.01,0.02,0.05")
    ap.add_argument("--llm-method", default="zero_shot_knn+cm_soft")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=40)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of other datasets already in fraction.json (run datasets one at a time)")
    a = ap.parse_args()
    llm = make_backend("embedded")
    uncached = make_backend("embedded", use_cache=False)
    methods = [a.llm_method, "logreg", "knn"]
    rows = []
    for dname in a.datasets.split(","):
        ds = load_dataset(dname)
        for frac in map(float, a.fractions.split(",")):
            res = run_evaluation(ds, llm, methods, pref_fraction=frac, n_test=a.n_test, seed=a.seed,
                                 decoding=decoding(a.seed))
            samples = split_dataset(ds, pref_fraction=frac, n_test=a.n_test, seed=a.seed).preference.examples
            for m in methods:
                r = res["results"][m]
                secs = adaptation_seconds(m, uncached if "zero_shot" in m else None, ds.labels, samples, a.seed)
                rows.append({"dataset": dname, "pref_fraction": frac, "pref_count": len(samples), "method": m,
                             "accuracy": r["accuracy"], "ci95": r["ci95"], "n": r["n"], "adapt_s": round(secs, 2)})
                print(f"{dname:10s} frac={frac:.2f} ({len(samples):3d} samples) {m:24s} acc={r['accuracy']:.3f} "
                      f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] adapt={secs:.1f}s", flush=True)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.append and (out / "fraction.json").is_file():
        done = {r["dataset"] for r in rows}
        old = json.loads((out / "fraction.json").read_text())
        rows = [r for r in old["rows"] if r["dataset"] not in done] + rows
    (out / "fraction.json").write_text(json.dumps({"model": llm.identity(), "seed": a.seed, "n_test": a.n_test,
                                                   "rows": rows}, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import pandas as pd
    import seaborn as sns
    df = pd.DataFrame(rows)
    g = sns.relplot(df, x="pref_fraction", y="accuracy", hue="method", col="dataset", kind="line", marker="o",
                    height=3.5)
    g.set(xticks=sorted(df.pref_fraction.unique()))
    g.figure.suptitle(f"Accuracy vs preference fraction (embedded SmolLM2-135M, n_test={a.n_test}, seed={a.seed})",
                      y=1.03)
    g.savefig(out / "fraction.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / 'fraction.json'} and {out / 'fraction.png'}")


if __name__ == "__main__":
    main()
