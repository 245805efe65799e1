#!/usr/bin/env bash
# The CPU benchmarks of issue 5 on the embedded model, sized to finish in about 15 minutes on 2 idle cores.
# Each script measures its alternatives side by side in one run and writes JSON under benchmarks/results/.
# A fresh response cache under benchmarks/results/.cache keeps these timings independent of earlier runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CM_CACHE_DIR="${CM_CACHE_DIR:-$PWD/benchmarks/results/.cache}"
rm -f "$CM_CACHE_DIR/responses.sqlite"*
start=$(date +%s)
python -m benchmarks.bench_scoring --queries 2
python -m benchmarks.bench_throughput --datasets banking77,clinc --n-test 12 --pref-fraction 0.02
python -m benchmarks.bench_adaptation --dataset banking77 --pref-fraction 0.02 --n-test 50 --epochs 2
echo "all benchmarks: $(( $(date +%s) - start )) s"
