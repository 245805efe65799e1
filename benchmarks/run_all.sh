#!/usr/bin/env bash
# The CPU benchmarks of issue 5 on the embedded model, sized to finish in under 15 minutes on 2 idle cores.
# Each script measures its alternatives side by side in one run and writes JSON under benchmarks/results/;
# the wall time of each step goes to benchmarks/results/run_all.json.
# A fresh response cache under benchmarks/results/.cache keeps the timings cold; bench_adaptation runs before
# bench_throughput so that the latter's banks (not timed there) reuse the preference-sample answers it computed.
set -euo pipefail
cd "$(dirname "$0")/.."
export CM_CACHE_DIR="${CM_CACHE_DIR:-$PWD/benchmarks/results/.cache}"
rm -f "$CM_CACHE_DIR/responses.sqlite"*
steps=()
step() {  # step NAME COMMAND...: run it and keep its wall time
    local name=$1 t0
    shift
    t0=$(date +%s)
    "$@"
    steps+=("\"$name\": $(( $(date +%s) - t0 ))")
    echo "== $name: $(( $(date +%s) - t0 )) s" >&2
}
start=$(date +%s)
step scoring python -m benchmarks.bench_scoring --queries 4 --naive-queries 1
step adaptation python -m benchmarks.bench_adaptation --dataset banking77 --pref-fraction 0.02 --n-test 50 --epochs 2
# throughput on banking77 only: clinc's bank would cost another 90 preference-sample answers (~3 min) here; run
# bench_throughput --datasets clinc for it (benchmarks/README.md has both)
step throughput python -m benchmarks.bench_throughput --datasets banking77 --n-test 16 --pref-fraction 0.02
total=$(( $(date +%s) - start ))
joined=$(IFS=,; echo "${steps[*]}")
printf '{"total_s": %d, "steps_s": {%s}, "date": "%s", "host_cores": %d}\n' "$total" "$joined" \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)" > benchmarks/results/run_all.json
echo "all benchmarks: $total s"
