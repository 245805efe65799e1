"""Queries per second of a base method vs the same method +CM (hard and soft), measured in one run with no
response cache (interleaved repeats, fastest kept), how often CM needs its second LLM call (several bank
candidates) per dataset, and what one second call costs.

    python -m benchmarks.bench_throughput --datasets banking77,clinc --n-test 20
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cm_core.backends import make_backend
from cm_core.data import load_dataset, split_dataset
from cm_core.methods import Decoding
from cm_core.cm import estimate_bank
from cm_core.registry import build


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="banking77,clinc")
    ap.add_argument("--method", default="zero_shot")
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--pref-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved timed passes per variant; the fastest kept")
    ap.add_argument("--output", default="benchmarks/results/throughput.json")
    a = ap.parse_args()
    # only to estimate the bank (its cost is adaptation, not inference; run_all.sh has bench_adaptation fill the
    # cache with the banking77 preference-sample answers first)
    cached = make_backend("embedded")
    fresh = make_backend("embedded", use_cache=False)
    rows = []
    for dname in a.datasets.split(","):
        ds = load_dataset(dname)
        split = split_dataset(ds, pref_fraction=a.pref_fraction, n_test=a.n_test, seed=a.seed)
        dec = Decoding(seed=a.seed)
        pref = split.preference.examples
        bank = estimate_bank(build(a.method, labels=ds.labels, llm=cached, decoding=dec).fit(pref), pref, 0.7, a.seed)
        base = build(a.method, labels=ds.labels, llm=fresh, decoding=dec).fit(pref)
        texts = split.test.texts
        base.predict(texts[:1])  # warm-up, and the content-free calibration call (computed once per label set)
        variants = {"base": base}
        for form, suffix in (("hard", "+cm"), ("soft", "+cm_soft")):  # fitting with a given bank only prepares
            cm = build(a.method + suffix, labels=ds.labels, llm=fresh, decoding=dec, bank=bank, base=base)
            variants[f"cm_{form}"] = cm.fit(pref)  # the choices (adaptation, untimed)
        # interleaved repeats, the fastest of each kept: a pass is ~25 s here, and another process waking up
        # for a few seconds would otherwise decide the ratio
        best: dict[str, float] = {}
        for _ in range(a.repeats):
            for name, method in variants.items():
                t0 = time.perf_counter()
                preds = method.predict(texts)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
                if name == "cm_hard":
                    rate = sum(p.info["action"] == "choose" for p in preds) / len(preds)
        row = {"dataset": dname, "labels": len(ds.labels), "queries": len(texts), "repeats": a.repeats,
               "base_qps": len(texts) / best["base"]}
        for form in ("hard", "soft"):
            row[f"cm_{form}_qps"] = len(texts) / best[f"cm_{form}"]
            row[f"cm_{form}_ratio"] = best["base"] / best[f"cm_{form}"]
        row["second_call_rate"] = rate
        # what one second call costs, from the two timings: CM's extra time per query / share of queries asking
        row["second_call_s"] = (best["cm_hard"] - best["base"]) / len(texts) / rate if rate else None
        rows.append(row)
        print(f"{dname:12s} base {row['base_qps']:.2f} q/s  +cm {row['cm_hard_qps']:.2f} q/s "
              f"(x{row['cm_hard_ratio']:.2f})  +cm_soft {row['cm_soft_qps']:.2f} q/s (x{row['cm_soft_ratio']:.2f})  "
              f"second call on {row['second_call_rate']:.0%} of queries"
              + (f", {row['second_call_s']:.2f} s each" if row["second_call_s"] is not None else ""), flush=True)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps({"model": fresh.identity(), "method": a.method, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
