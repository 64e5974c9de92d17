#!/usr/bin/env python3
"""``kaika pretrain`` throughput and MFU: continued pretraining (LoRA, and --full) on the Sōseki text,
at bloom-ja-tiny dimensions (the shipped model) and bloom-560m dimensions (random weights, BLOOM's
250,880-token vocabulary), documents packed with a block-diagonal ALiBi mask or as one stream.

Each configuration is one `kaika pretrain` command in its own process, as a user runs it; tokens/s is
the mean of the logged rates after the first log (`trainer_log.jsonl`), and MFU divides its useful
FLOPs by the GEMM rate of the run's dtype measured at the start of the same run
(`train_throughput.gemm_rate`).

    python scripts/prepare_soseki.py ../shared/data/aozora_soseki runs/soseki
    .venv/bin/python benchmarks/pretrain_throughput.py --json benchmarks/results/cpu-pretrain.json

The Sōseki works are longer than a row, so there a row rarely holds two documents; for short ones
(several per row, where the block-diagonal mask has many blocks) give e.g. Dolly-ja's answers:
``--data runs/data/dolly-ja-sample-1000.jsonl --text-field output`` (benchmarks/qkv_sweep_cpu.sh
writes that sample).

Useful FLOPs per token (every position is trained in pretraining): LoRA 4·P + 3·A + 4·V·h, full
6·P + 3·A + 6·V·h, with P the decoder's linear parameters, V·h the output layer, and A = 4·L·d·n the
attention over the n tokens a position may attend to (taken as the whole row: an upper bound for
document packing, whose blocks can be shorter).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import train_throughput as tt  # noqa: E402  (the GEMM rate, the machine and the model's dimensions)

SIZES = {"bloom-ja-tiny": None, "560m": tt.SIZES["560m"]}  # None: the shipped model itself


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--packing", nargs="+", default=["document", "stream"], choices=["document", "stream"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--data", default=str(ROOT / "runs" / "soseki" / "train.jsonl"))
    p.add_argument("--text-field", default="text", help="the records' text field (e.g. output for Dolly)")
    p.add_argument("--rows", type=int, default=4, help="rows per step (micro batch = batch)")
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="steps per run; the first log is not counted")
    p.add_argument("--logging-steps", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "pretrain_throughput.json"))
    return p.parse_args(argv)


def base_model(size: str, work: Path) -> str:
    """The shipped bloom-ja-tiny, or a random BLOOM of bloom-560m's dimensions saved with its tokenizer."""
    if SIZES[size] is None:
        return "bloom-ja-tiny"
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    from kaika.modeling.builtin import builtin_model_path

    out = work / size
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=tt.VOCAB, **SIZES[size])).save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(builtin_model_path("bloom-ja-tiny")).save_pretrained(out)
    return str(out)


def dims_of(base: str) -> dict[str, int]:
    from kaika.config import ModelArgs
    from kaika.modeling.load import load_model

    return tt.model_dims(load_model(ModelArgs(base_model=base, dtype="float32")))


def flops_per_token(dims: dict[str, int], mode: str, row: int) -> float:
    attention = 4 * dims["layers"] * dims["attention"] * row
    if mode == "full":
        return 6 * dims["body"] + 3 * attention + 6 * dims["vocab"] * dims["hidden"]
    return 4 * dims["body"] + 3 * attention + 4 * dims["vocab"] * dims["hidden"]


def run(args, base: str, mode: str, packing: str, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "kaika", "pretrain", "--base-model", base, "--data", args.data,
        "--text-field", args.text_field,
        "--cutoff-len", str(args.cutoff_len), "--packing", packing, "--dtype", args.dtype,
        "--batch-size", str(args.rows), "--micro-batch-size", str(args.rows), "--max-steps", str(args.steps),
        "--logging-steps", str(args.logging_steps), "--save-steps", "100000", "--eval-steps", "100000",
        "--lr", "1e-4", "--output-dir", str(out), "--no-verify",
    ] + (["--full"] if mode == "full" else [])  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    rates = [r["tokens_per_s"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
             if "tokens_per_s" in r][1:]  # fmt: skip
    return {
        "tokens_per_s": sum(rates) / len(rates),
        "logs": len(rates),
        "wall_s": time.perf_counter() - start,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if not Path(args.data).is_file():
        raise SystemExit(
            f"{args.data}: run scripts/prepare_soseki.py ../shared/data/aozora_soseki runs/soseki first"
        )
    peak = tt.gemm_rate("cpu", args.dtype)
    print(f"{args.dtype} GEMM rate: {peak / 1e9:.0f} GFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size in args.sizes:
            base = base_model(size, work)
            dims = dims_of(base)
            for mode in args.modes:
                for packing in args.packing:
                    r = run(args, base, mode, packing, work / f"{size}-{mode}-{packing}")
                    mfu = r["tokens_per_s"] * flops_per_token(dims, mode, args.cutoff_len) / peak
                    rows.append({"size": size, "mode": mode, "packing": packing, **r, "mfu": mfu})
                    print(
                        f"| {size} | {mode} | {packing} | {r['tokens_per_s']:,.0f} | {100 * mfu:.1f} % |",
                        flush=True,
                    )
    for size in args.sizes:
        for mode in args.modes:
            by = {r["packing"]: r["tokens_per_s"] for r in rows if r["size"] == size and r["mode"] == mode}
            if len(by) == 2:
                print(
                    f"{size} {mode}: document's time per token ÷ stream's = {by['stream'] / by['document']:.2f}"
                )
    report = {
        "machine": tt.machine("cpu"),
        "dtype": args.dtype,
        "gemm_gflops": peak / 1e9,
        "args": vars(args),
        "runs": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
