#!/usr/bin/env bash
# One command on a fresh machine: install, then run the main job offline on the embedded model
# (zero-shot vs zero-shot+CM and the embedding baselines on BANKING77, results in results/banking77.json).
set -euo pipefail
cd "$(dirname "$0")"
pip install -q -r requirements.txt
pip install -q --no-deps -r requirements-nodeps.txt
python -m cm_core evaluate --dataset "${DATASET:-banking77}" --model embedded \
  --methods zero_shot,zero_shot+cm,zero_shot+cm_paper,zero_shot+cm_soft,label_similarity,label_similarity+cm,knn,logreg \
  --pref-fraction 0.05 --n-test "${N_TEST:-50}" --seed 40 --output "results/${DATASET:-banking77}.json"
