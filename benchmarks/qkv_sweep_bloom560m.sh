#!/usr/bin/env bash
# The q/k/v sweep of docs/qkv.md on a real model: bigscience/bloom-560m (bf16) on ONE CUDA GPU, with
# Dolly-ja from the hub (kunishou/databricks-dolly-15k-ja). Eight runs — fused / q,v / q,k,v /
# all-linear at ranks 4 and 16 — of 150 steps × 16 examples (cutoff 256), same data and seed; budgeted
# for about ten minutes on one recent data-centre GPU (A100/H100 class). Needs the hub or the model and
# data in the local HF cache. Not run by kaika's CI (no GPU, no hub there).
#   benchmarks/qkv_sweep_bloom560m.sh [extra kaika sweep options, e.g. --max-steps 300]
# Results: runs/sweep-qkv-bloom-560m/results.{md,csv} and eval_loss_vs_params.png.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "qkv_sweep_bloom560m.sh: needs a CUDA GPU (torch.cuda.is_available() is False)" >&2
  exit 2
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU: the budget assumes no DDP
start=$(date +%s)
.venv/bin/kaika sweep configs/sweeps/qkv-bloom-560m.yaml "$@"
echo "qkv_sweep_bloom560m.sh: $(( $(date +%s) - start )) s in all"
