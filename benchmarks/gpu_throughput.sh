#!/usr/bin/env bash
# The training benchmark on one CUDA GPU: bloom-560m and bloom-1b1 dimensions, bf16, every variant
# (TRL's rows need the bench extra: pip install -e ".[bench]").
# Sized to finish within about 8 minutes on a recent data-centre GPU (each variant is its own
# process: model build, 3 warm-up steps, 10 measured steps). MFU is against the card's bf16 GEMM
# rate measured at the start of the run. Extra arguments go to train_throughput.py, e.g.
#   benchmarks/gpu_throughput.sh --micro-batch 8
#   benchmarks/gpu_throughput.sh --device cpu --dtypes float32 --sizes tiny --steps 1 --warmup 1 --records 64
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" benchmarks/train_throughput.py \
  --device cuda --dtypes bfloat16 --sizes 560m 1b1 --variants baseline kaika kaika-no-chunks kaika-eager-attention trl trl-best --steps 10 --warmup 3 \
  --json benchmarks/results/gpu_throughput.json "$@"
