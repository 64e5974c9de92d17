#!/usr/bin/env bash
# The q/k/v sweep of docs/qkv.md on the CPU: builtin tiny-bloom-ja (random weights) on a fixed,
# seeded sample of Dolly-ja. Offline; about 40 minutes on 2 heavily shared CPU cores at the defaults
# (1,000 records, 60 held out; 20 steps of 8 examples, cutoff 128 tokens).
#   benchmarks/qkv_sweep_cpu.sh [DOLLY_JSONL] [N_RECORDS] [STEPS] [SWEEP_CONFIG] [OUTPUT_DIR]
# Results: OUTPUT_DIR (runs/sweep-qkv-tiny)/results.{md,csv} and eval_loss_vs_params.png. SWEEP_CONFIG
# configs/sweeps/qkv-bloom-ja-tiny.yaml runs it on the pretrained bloom-ja-tiny, two seeds each.
set -euo pipefail
cd "$(dirname "$0")/.."
dolly=${1:-../shared/data/dolly_15k_ja/databricks-dolly-15k-ja.jsonl}
n=${2:-1000}
steps=${3:-20}
config=${4:-configs/sweeps/qkv-tiny-bloom-ja.yaml}
output=${5:-runs/sweep-qkv-tiny}
sample=runs/data/dolly-ja-sample-$n.jsonl
mkdir -p runs/data
# The same N records for every run and every machine: a seeded sample of the file's lines.
.venv/bin/python - "$dolly" "$n" "$sample" <<'PY'
import random, sys
src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = [line for line in open(src, encoding="utf-8") if line.strip()]
open(dst, "w", encoding="utf-8").writelines(random.Random(0).sample(lines, n))
print(f"{dst}: {n} of {len(lines)} records")
PY
exec .venv/bin/kaika sweep "$config" \
  --data "$sample" --val-set-size 60 --cutoff-len 128 --max-steps "$steps" \
  --batch-size 8 --micro-batch-size 8 \
  --output-dir "$output"
