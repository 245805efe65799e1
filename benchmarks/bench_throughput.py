"""Queries per second of a base method vs the same method +CM (hard and soft), measured in one run with no
response cache, and how often CM needs its second LLM call (several bank candidates) per dataset.

    python -m benchmarks.bench_throughput --datasets banking77,clinc --n-test 20
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cm_core.backends import make_backend
from cm_core.cm import CM
from cm_core.data import load_dataset, split_dataset
from cm_core.methods import Decoding
from cm_core.registry import build_chooser, build_method


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="banking77,clinc")
    ap.add_argument("--method", default="zero_shot")
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--pref-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=40)
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
        dec = Decoding(seed=a.seed, list_labels=False)
        bank = CM(build_method(a.method, cached, ds.labels, dec), temperature=0.7, seed=a.seed) \
            .fit(split.preference.examples).bank_
        base = build_method(a.method, fresh, ds.labels, dec).fit(split.preference.examples)
        texts = split.test.texts
        base.predict(texts[:1])  # warm-up, and the content-free calibration call (computed once per label set)
        t0 = time.perf_counter()
        base.predict(texts)
        t_base = time.perf_counter() - t0
        row = {"dataset": dname, "labels": len(ds.labels), "queries": len(texts), "base_qps": len(texts) / t_base}
        for form in ("hard", "soft"):
            cm = CM(base, build_chooser(a.method, base, fresh, ds.labels, dec), form=form, bank=bank)
            cm.fit(split.preference.examples, fit_base=False)
            t0 = time.perf_counter()
            preds = cm.predict(texts)
            t_cm = time.perf_counter() - t0
            row[f"cm_{form}_qps"] = len(texts) / t_cm
            row[f"cm_{form}_ratio"] = t_base / t_cm
            if form == "hard":
                row["second_call_rate"] = sum(p.info["action"] == "choose" for p in preds) / len(preds)
        rows.append(row)
        print(f"{dname:12s} base {row['base_qps']:.2f} q/s  +cm {row['cm_hard_qps']:.2f} q/s "
              f"(x{row['cm_hard_ratio']:.2f})  +cm_soft {row['cm_soft_qps']:.2f} q/s (x{row['cm_soft_ratio']:.2f})  "
              f"second call on {row['second_call_rate']:.0%} of queries", flush=True)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps({"model": fresh.identity(), "method": a.method, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
