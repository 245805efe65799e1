"""Optimized (one prefill + one pass over the label trie) vs naive (one forward pass per label) candidate scoring.

Measured side by side in one run on this machine with the embedded model; prints the ratio and writes JSON.
    python -m benchmarks.bench_scoring --queries 4 --naive-queries 1 --output benchmarks/results/scoring.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cm_core import prompts
from cm_core.backends import ScoreRequest, make_backend
from cm_core.data import load_dataset, split_dataset


def bench(llm, dataset: str, n_queries: int, n_naive: int, seed: int) -> dict:
    """Mean seconds per query of each path; naive runs on the first ``n_naive`` of the same queries (it costs one
    forward pass per label: a minute per clinc query here), and both must agree on those."""
    ds = load_dataset(dataset)
    texts = split_dataset(ds, pref_count=1, n_test=max(n_queries, n_naive), seed=seed).test.texts
    reqs = [ScoreRequest.of(prompts.zero_shot(t, None), ds.labels) for t in texts]
    llm.score(reqs[:1])  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    fast = llm.score(reqs[:n_queries])
    t_fast = (time.perf_counter() - t0) / n_queries
    t0 = time.perf_counter()
    slow = [llm.naive_score(r) for r in reqs[:n_naive]]
    t_naive = (time.perf_counter() - t0) / n_naive
    diff = max(abs(a.logprob - b.logprob) for fa, sa in zip(fast, slow) for a, b in zip(fa, sa))
    return {"dataset": dataset, "labels": len(ds.labels), "queries": n_queries, "naive_queries": n_naive,
            "optimized_s_per_query": t_fast, "naive_s_per_query": t_naive,
            "speedup": t_naive / t_fast, "max_abs_logprob_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="clinc,banking77")
    ap.add_argument("--queries", type=int, default=4, help="queries scored by the trie (one pass each)")
    ap.add_argument("--naive-queries", type=int, default=1, help="of those, how many also scored naively")
    ap.add_argument("--seed", type=int, default=40)
    ap.add_argument("--output", default="benchmarks/results/scoring.json")
    a = ap.parse_args()
    llm = make_backend("embedded", use_cache=False)
    rows = [bench(llm, d, a.queries, min(a.naive_queries, a.queries), a.seed) for d in a.datasets.split(",")]
    for r in rows:
        print(f"{r['dataset']:12s} {r['labels']:4d} labels  optimized {r['optimized_s_per_query']:.2f} s/query  "
              f"naive {r['naive_s_per_query']:.2f} s/query  speedup x{r['speedup']:.1f}  "
              f"max |diff| {r['max_abs_logprob_diff']:.1e}")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps({"model": llm.identity(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
