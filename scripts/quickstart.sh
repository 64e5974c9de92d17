#!/usr/bin/env bash
# Set up, then run kaika's main job offline: LoRA-train the builtin bloom-ja-tiny (a small BLOOM
# pretrained on Sōseki, shipped in the package) on the shipped Japanese seed tasks, and answer a few
# Japanese instructions with the base model alone, then with base + adapter (sampled: greedy decoding
# of a model this small degenerates into one repeated token).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/kaika train -c configs/quickstart.yaml --overwrite
echo "--- answers from the base model alone (bloom-ja-tiny, before instruction tuning):"
.venv/bin/kaika generate runs/quickstart --base-only --file examples/prompts_ja.jsonl --max-new-tokens 48 --temperature 0.7 --top-p 0.9 --repetition-penalty 1.3
echo "--- answers from base + adapter (runs/quickstart):"
.venv/bin/kaika generate runs/quickstart --file examples/prompts_ja.jsonl --max-new-tokens 48 --temperature 0.7 --top-p 0.9 --repetition-penalty 1.3
