#!/usr/bin/env bash
# One point of the quickstart's settings search (README, "The quickstart, honestly"; results in
# benchmarks/results/quickstart-search-gemma-3-270m.json): LoRA-tune gemma-3-270m on the seed tasks,
# then ELYZA-tasks-100 loss and 20 greedy answers, base vs adapter. GEN passes decoding options.
#   GEN="--repetition-penalty 1.2" benchmarks/quickstart_search.sh qv-1e-3 1e-3 2 auto 16
# usage: quickstart_search.sh NAME LR EPOCHS TARGET R [more kaika train options]
set -e
cd "$(dirname "$0")/.."
name=$1; lr=$2; ep=$3; tgt=$4; r=$5; shift 5
export HF_HUB_OFFLINE=1
mkdir -p "${OUT:-runs/quickstart-search}"
start=$(date +%s)
.venv/bin/kaika -q train --base-model gemma-3-270m --data seed-tasks-ja --val-set-size 0 --cutoff-len 256 \
  --lora-r $r --lora-alpha $((2*r)) --lora-target $tgt --epochs $ep --lr $lr --batch-size 16 --micro-batch-size 8 \
  --warmup-steps 2 --logging-steps 2 --save-steps 1000 --output-dir ${OUT:-runs/quickstart-search}/$name --overwrite "$@" > ${OUT:-runs/quickstart-search}/$name.train.log 2>&1
mid=$(date +%s)
.venv/bin/kaika -q eval loss ${OUT:-runs/quickstart-search}/$name --data elyza-tasks-100 --batch-size 8 --json ${OUT:-runs/quickstart-search}/$name.loss.json > ${OUT:-runs/quickstart-search}/$name.loss.txt 2>&1
.venv/bin/kaika -q eval generate ${OUT:-runs/quickstart-search}/$name --tasks elyza-tasks-100 --limit 20 --max-new-tokens 128 --batch-size 10 ${GEN:-} --output-dir ${OUT:-runs/quickstart-search}/$name.gen > ${OUT:-runs/quickstart-search}/$name.gen.txt 2>&1
end=$(date +%s)
echo "$name train $((mid-start))s eval $((end-mid))s"; cat ${OUT:-runs/quickstart-search}/$name.loss.txt; grep -E "stop rate|chrF|repetition|mean new" ${OUT:-runs/quickstart-search}/$name.gen.txt
