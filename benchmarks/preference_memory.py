"""Peak memory and time of a ``kaika dpo`` step against a ``kaika train`` step, at bloom-560m dimensions.

    .venv/bin/python benchmarks/preference_memory.py                 # 560m dims, bf16, micro batch 2
    .venv/bin/python benchmarks/preference_memory.py --size small --dtype float32

Each variant runs in its own subprocess (so its peak RSS, or peak CUDA memory, is its own) on a
random BLOOM of bigscience/bloom-560m's dimensions (vocabulary 250,880) with kaika's default LoRA,
on the same records: the first pairs of the shipped ``seed-prefs-ja``, tokenized with the builtin
tiny-bloom-ja tokenizer. The same micro batch counts records: an SFT example is a prompt and its
chosen answer; a DPO pair is the prompt with both answers (two sequences).

* ``sft``: kaika's SFT step (chunked loss on the answer tokens);
* ``dpo``: TRL's DPO step as ``kaika dpo`` builds it, the reference (the base, adapter off) run
  every step under no_grad;
* ``dpo-precomputed``: ``--precompute-ref``: the reference log-probabilities computed once before
  training (that pass's time is reported apart), none in the step.

Printed: peak memory and seconds per step, and each as a ratio to ``sft`` measured in the same run.
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

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from train_throughput import SIZES, VOCAB, peak_rss, reset_peak_rss  # noqa: E402

VARIANTS = ("sft", "dpo", "dpo-precomputed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="560m", choices=sorted(SIZES))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--micro-batch", type=int, default=2, help="records per step (pairs for DPO)")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--output", help="write the rows as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def records(n: int, tokenizer, cutoff: int):
    from kaika.data.preference import encode_pairs, load_pairs
    from kaika.data.prompts import load_template

    pairs = load_pairs(["seed-prefs-ja"])[:n]
    rows, _ = encode_pairs(pairs, load_template("alpaca_ja"), tokenizer, cutoff)
    return pairs, rows


def child(args) -> dict:
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    from kaika.config import DpoConfig, LoraArgs
    from kaika.data.tokenize import IGNORE_INDEX, PadCollator, resolve_pad_token
    from kaika.modeling.builtin import train_tokenizer
    from kaika.modeling.lora import apply_lora
    from kaika.training import preference
    from kaika.training.loss import FastLoss
    from kaika.training.trainer import KaikaTrainer, training_arguments

    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    resolve_pad_token(tokenizer)
    n = args.micro_batch * (args.steps + 1)
    _, rows = records(n, tokenizer, args.cutoff_len)
    dtype = getattr(torch, args.dtype)
    config = BloomConfig(vocab_size=VOCAB, **SIZES[args.size], eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = apply_lora(BloomForCausalLM(config).to(dtype), LoraArgs())
    out = Path(tempfile.mkdtemp())
    cfg = DpoConfig()
    cfg.data.cutoff_len = args.cutoff_len
    cfg.train.output_dir, cfg.train.micro_batch_size, cfg.train.batch_size = (
        str(out),
        args.micro_batch,
        args.micro_batch,
    )
    cfg.dpo.precompute_ref = args.child == "dpo-precomputed"
    start = time.perf_counter()
    if args.child == "sft":
        examples = [{"input_ids": r["prompt_ids"] + r["chosen_ids"],
                     "labels": [IGNORE_INDEX] * len(r["prompt_ids"]) + r["chosen_ids"]} for r in rows]  # fmt: skip
        trainer = KaikaTrainer(
            model=model,
            fast_loss=FastLoss(),
            args=training_arguments(cfg.train, out, dtype, False, 1),
            train_dataset=examples,
            data_collator=PadCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
        )
        batches = [
            PadCollator(tokenizer.pad_token_id)(examples[i : i + args.micro_batch])
            for i in range(0, n, args.micro_batch)
        ]
    else:
        trainer = preference.build_trainer(cfg, None, model, tokenizer, rows, [])
        data = trainer.train_dataset
        batches = [trainer.data_collator([data[j] for j in range(i, i + args.micro_batch)])
                   for i in range(0, n, args.micro_batch)]  # fmt: skip
    setup_s = time.perf_counter() - start  # the precompute pass, for dpo-precomputed
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    trainer.training_step(model, batches[0])  # warm-up: allocator and kernels
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    reset_peak_rss()
    times = []
    for batch in batches[1:]:
        t = time.perf_counter()
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        times.append(time.perf_counter() - t)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    return {"variant": args.child, "peak_rss_bytes": peak_rss(), "s_per_step": sum(times) / len(times),
            "tokens_per_step": tokens / len(times), "setup_s": setup_s}  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--size", args.size, "--dtype", args.dtype,
               "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--cutoff-len", str(args.cutoff_len)]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if run.returncode:
            sys.exit(f"{variant} failed:\n{run.stderr[-3000:]}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{variant}: peak {r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['s_per_step']:.2f} s/step", flush=True
        )
    sft = rows[0]
    print(
        f"\n{args.size} dims, {args.dtype}, micro batch {args.micro_batch} records, cutoff {args.cutoff_len}"
    )
    print("| variant | peak RSS GiB | × SFT memory | s/step | × SFT time | tokens/step | setup s |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        r["memory_ratio"] = r["peak_rss_bytes"] / sft["peak_rss_bytes"]
        r["time_ratio"] = r["s_per_step"] / sft["s_per_step"]
        print(f"| {r['variant']} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['memory_ratio']:.2f} | "
              f"{r['s_per_step']:.2f} | {r['time_ratio']:.2f} | {r['tokens_per_step']:.0f} | {r['setup_s']:.1f} |")  # fmt: skip
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
