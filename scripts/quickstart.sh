#!/usr/bin/env bash
# Set up, then run kaika's main job offline: LoRA-train the builtin tiny-bloom-ja on the shipped
# Japanese seed tasks, and answer a few Japanese instructions with base + adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/kaika train -c configs/quickstart.yaml --overwrite
echo "--- answers from base + adapter (runs/quickstart):"
.venv/bin/kaika generate runs/quickstart --file examples/prompts_ja.jsonl --max-new-tokens 32
