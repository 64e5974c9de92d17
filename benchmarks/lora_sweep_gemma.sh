#!/usr/bin/env bash
# The LoRA sweep of docs/real-models.md: configs/sweeps/lora-gemma-3-270m.yaml (held-out loss on
# ELYZA-tasks-100), then each run's greedy answers to 10 ELYZA tasks (stop rate, repetition).
# Offline; 1.5 to 2 hours on 2 CPU cores (each run 6-16 min, then 10 answers per run). Results: runs/sweep-lora-gemma/results.md and stops.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out=runs/sweep-lora-gemma
.venv/bin/kaika sweep configs/sweeps/lora-gemma-3-270m.yaml "$@"
echo "| run | stop rate | repetition | mean new tokens |" > "$out/stops.md"
echo "|---|--:|--:|--:|" >> "$out/stops.md"
for run in "$out"/runs/*/; do
  name=$(basename "$run")
  .venv/bin/kaika -q eval generate "$run" --tasks elyza-tasks-100 --limit 10 --max-new-tokens 128 \
      --repetition-penalty 1.2 --batch-size 10 --no-base-also --output-dir "$run/eval/elyza10" > /dev/null
  .venv/bin/python - "$run/eval/elyza10/summary.json" "$name" >> "$out/stops.md" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["models"]["adapter"]
print(f"| {sys.argv[2]} | {m['stop_rate']:.2f} | {m['repetition']:.3f} | {m['mean_new_tokens']:.1f} |")
PY
done
cat "$out/results.md" "$out/stops.md"
