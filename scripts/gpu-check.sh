#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): on a machine with one CUDA GPU, in about 8 minutes,
# gemma-3-270m in bf16 (train + verify + merge + generate), 4-bit and 8-bit QLoRA, fp16 with its
# GradScaler, and the throughput benchmark's kaika and TRL rows at bloom-560m dims with MFU against
# the card's measured bf16 rate; one JSON (benchmarks/results/gpu-check.json by default).
#   scripts/gpu-check.sh                        # uses .venv (or $PYTHON) as it is: install kaika and
#                                               # its extras there first (scripts/gpu-kit.sh packs them)
#   scripts/gpu-check.sh --device cpu --small   # the same steps on tiny shapes, on a CPU
# Extra arguments go to benchmarks/gpu_check.py (--json PATH, --skip STEP…).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
