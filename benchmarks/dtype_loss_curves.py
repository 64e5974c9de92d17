"""bf16 against fp32 on one training run: is the bf16 loss curve within bf16's own noise of fp32's?

Trains the same LoRA (same data, seed, batches, steps) twice through ``kaika train``, with the base in
float32 and in bfloat16 (LoRA weights and optimizer state are float32 in both), then compares the
per-step training losses. The first step's loss is computed from identical weights on an identical
batch, so its difference is bf16's rounding alone: the noise floor. The later steps show whether
the two runs drift apart. Also reports time per run, held-out loss and tokens/s.

    .venv/bin/python benchmarks/dtype_loss_curves.py                      # gemma-3-270m, seed tasks
    .venv/bin/python benchmarks/dtype_loss_curves.py --base-model bloom-ja-tiny --steps 20

Results: docs/performance.md ("bf16 on the CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(base: str, dtype: str, data: str, steps: int, out: Path) -> dict:
    args = [
        sys.executable, "-m", "kaika", "-q", "train", "--base-model", base, "--dtype", dtype, "--data", data,
        "--val-set-size", "15", "--cutoff-len", "256", "--lora-target", "all-linear", "--lora-r", "16",
        "--lora-alpha", "32", "--lr", "1e-3", "--batch-size", "16", "--micro-batch-size", "8",
        "--max-steps", str(steps), "--logging-steps", "1", "--eval-steps", str(steps), "--save-steps", "100000",
        "--output-dir", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(args, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first includes warm-up
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {
        "seconds": seconds,
        "losses": losses,
        "eval_loss": evals[-1],
        "tokens_per_s": sum(speed) / len(speed),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="gemma-3-270m")
    p.add_argument("--data", default="seed-tasks-ja")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="Also write the results here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {d: run(a.base_model, d, a.data, a.steps, Path(tmp) / d) for d in ("float32", "bfloat16")}
    f32, b16 = res["float32"]["losses"], res["bfloat16"]["losses"]
    rel = [abs(x - y) / y for x, y in zip(b16, f32, strict=True)]
    print(f"{a.base_model}, {a.steps} steps of 16 examples (LoRA all-linear r16, lr 1e-3)")
    print("step  fp32 loss  bf16 loss  |Δ|/fp32")
    for i, (x, y, r) in enumerate(zip(f32, b16, rel, strict=True), 1):
        print(f"{i:4d}  {x:9.4f}  {y:9.4f}  {r:8.2%}")
    print(f"noise floor (step 1, same weights): {rel[0]:.2%}; largest over the run: {max(rel):.2%}")
    for d, r in res.items():
        print(
            f"{d}: {r['seconds']:.0f} s, {r['tokens_per_s']:.0f} tokens/s, held-out loss {r['eval_loss']:.4f}"
        )
    print(f"bf16 / fp32 tokens/s: {res['bfloat16']['tokens_per_s'] / res['float32']['tokens_per_s']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
