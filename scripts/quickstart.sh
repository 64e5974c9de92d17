#!/usr/bin/env bash
# Set up, then run kaika's main job offline: LoRA-tune the builtin gemma-3-270m (Google's Gemma 3 270M
# base model; converted once from its PyPI package) on the shipped Japanese seed tasks, then measure it
# against the base model on tasks it never saw (ELYZA-tasks-100, shipped): held-out loss, the share of
# answers that end with EOS, and three answers side by side. About 6 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/kaika train -c configs/quickstart.yaml --overwrite
echo "--- held-out loss on ELYZA-tasks-100 (reference answers), base model vs base + adapter:"
.venv/bin/kaika eval loss runs/quickstart --data elyza-tasks-100 --batch-size 8
echo "--- answers to the first 10 ELYZA tasks (greedy, repetition penalty 1.2), base vs base + adapter:"
.venv/bin/kaika eval generate runs/quickstart --tasks elyza-tasks-100 --limit 10 --max-new-tokens 128 \
    --repetition-penalty 1.2 --batch-size 10 --show 3
