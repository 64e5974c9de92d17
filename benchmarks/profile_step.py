"""Where a LoRA training step spends its time: torch.profiler over kaika's step, by operator.

    .venv/bin/python benchmarks/profile_step.py --size 560m --dtype bfloat16
    .venv/bin/python benchmarks/profile_step.py --size 560m --dtype float32 --top 25

The model, LoRA, data and loss are those of ``train_throughput.py``'s ``kaika`` variant (a random
BLOOM of the size's dimensions, r=8 on query_key_value, one micro batch of the benchmark's Dolly
sample, kaika's chunked loss); one warm-up step, then ``--steps`` profiled forward + backward +
optimizer steps. Prints the operators by self CPU time, the share of the step each takes, and the
time grouped by what it is (matrix products, attention, casts, norms, GELU, the loss, the optimizer).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_throughput as tt  # noqa: E402

GROUPS = {  # operator name fragments → what they are
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax"),
    "casts/copies": ("aten::to", "aten::copy_", "aten::_to_copy", "aten::contiguous", "aten::clone"),
    "layer norm": ("layer_norm",),
    "gelu": ("gelu", "aten::tanh", "aten::pow"),
    "loss": ("logsumexp", "log_softmax", "cross_entropy", "nll_loss", "aten::gather"),
    "optimizer": ("adamw", "_foreach", "lerp", "addcdiv", "aten::sqrt"),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="560m", choices=sorted(tt.SIZES) + [tt.GEMMA])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", help="also write the grouped times here")
    args = p.parse_args()

    import torch
    from peft import get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from kaika.data.examples import encode_records
    from kaika.data.prompts import load_template
    from kaika.data.records import load_records
    from kaika.data.tokenize import PadCollator, resolve_pad_token
    from kaika.training.loss import FastLoss, causal_lm_loss_sum

    tok = tt.load_tokenizer(tt.tokenizer_of(args.size))
    resolve_pad_token(tok)
    records = random.Random(args.seed).sample(load_records([str(tt.DOLLY)]), 64)
    feats, _ = encode_records(records, load_template("alpaca_ja"), tok, args.cutoff_len)
    feats.sort(key=lambda f: len(f["input_ids"]))  # a length-grouped batch, as kaika draws them
    batch = PadCollator(tok.pad_token_id)(feats[len(feats) // 2 : len(feats) // 2 + args.micro_batch])
    spec = {"size": args.size, "dtype": args.dtype, "device": "cpu"}
    torch.manual_seed(args.seed)
    model, lora = tt.build_model(spec, tok, tt.VARIANTS["kaika"])
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    levers = FastLoss(True, True)

    def step() -> None:
        loss_sum, count = causal_lm_loss_sum(model, batch, levers)
        (loss_sum / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(
        f"{args.size} {args.dtype}: {seconds:.2f} s/step, batch {tuple(batch['input_ids'].shape)}, "
        f"{int(batch['attention_mask'].sum())} real tokens, LoRA dtypes "
        f"{sorted({str(p.dtype) for n, p in model.named_parameters() if 'lora_' in n})}"
    )
    print(f"\n{'operator':<48} {'self ms/step':>12} {'share':>7} {'calls':>7}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(
            f"{e.key[:48]:<48} {e.self_cpu_time_total / 1e3 / args.steps:>12.1f} "
            f"{e.self_cpu_time_total / total:>7.1%} {e.count // args.steps:>7}"
        )
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    print(f"\n{'group':<16} {'ms/step':>9} {'share':>7}")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{g:<16} {t / 1e3 / args.steps:>9.1f} {t / total:>7.1%}")
    if args.json:
        out = {"size": args.size, "dtype": args.dtype, "s_per_step": seconds,
               "groups_ms": {g: t / 1e3 / args.steps for g, t in groups.items()}}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
