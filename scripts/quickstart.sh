#!/usr/bin/env bash
# Set up, then run kaika's main job offline: LoRA-tune the builtin gemma-3-270m (Google's Gemma 3 270M
# base model; converted once from its PyPI package) on the shipped Japanese seed tasks, then measure it
# against the base model on what it never saw, in one command and one report: JCommonsenseQA accuracy
# (100 items, by log-likelihood), the loss on ELYZA-tasks-100's reference answers, and answers to 10
# ELYZA tasks (stop rate, metrics, three side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/kaika train -c configs/quickstart.yaml --overwrite
echo "--- base model vs base + adapter: JCommonsenseQA, ELYZA-tasks-100 loss, 10 ELYZA answers (greedy):"
.venv/bin/kaika eval suite runs/quickstart --suite quickstart --max-new-tokens 128 \
    --repetition-penalty 1.2 --batch-size 10 --show 3
