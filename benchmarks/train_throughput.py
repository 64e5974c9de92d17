"""LoRA training throughput and memory: the alpaca-lora recipe against kaika, on BLOOM-shaped models.

    .venv/bin/python benchmarks/train_throughput.py                    # CPU: small + bloom-560m dims
    .venv/bin/python benchmarks/train_throughput.py --sizes small --steps 3
    benchmarks/gpu_throughput.sh                                       # GPU: bloom-560m + bloom-1b1 dims, bf16

Every variant trains the same randomly initialised model (``BloomConfig`` with the real dimensions,
nothing downloaded), the same LoRA (r=8, alpha 16, dropout 0.05 on ``query_key_value``), on the same
fixed sample of Japanese Dolly records with the same seed, through transformers' ``Trainer``. Each
variant runs in its own subprocess so that peak memory is its own. Reported per variant:
real (non-pad) and supervised tokens/s, padding fraction, peak RSS (CPU) or peak CUDA memory,
seconds per optimizer step, useful FLOP/s against the GEMM rate measured at the start of the run,
and ratios to the baseline. Timings exclude ``--warmup`` steps.

Variants:
  baseline      alpaca-lora's finetune.py with current libraries: Trainer, padding to the longest in
                the batch (multiple of 8, left, as alpaca-lora sets it), uniformly shuffled batches,
                the model's own loss over full-vocabulary logits
  kaika         kaika's defaults: logits at labelled positions only, chunked fused cross-entropy,
                length-grouped batches, fused (SDPA) attention with ALiBi as an additive bias
  kaika-*       kaika with one lever off
  trl, trl-best TRL's SFTTrainer (pinned: the bench extra) with its defaults, and with its best
                settings that apply here (TRL_SETTINGS says which and why)

Tokens: text is tokenized with kaika's builtin byte-level BPE (8,192 ids, trained on Japanese
prose; ids are valid in BLOOM's 250,880-token vocabulary). Its tokens per character differ from
BLOOM's own tokenizer, which cannot be downloaded here; the distribution of lengths and the share of
prompt tokens are what matter for the comparison, and both come from real Japanese records.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly_15k_ja" / "databricks-dolly-15k-ja.jsonl"
VOCAB = 250_880  # BLOOM's vocabulary; the output layer's size is the point of the exercise

# BloomConfig dimensions. 560m and 1b1 are those of bigscience/bloom-560m and bloom-1b1.
SIZES = {
    "tiny": dict(n_layer=2, hidden_size=64, n_head=4),
    "small": dict(n_layer=6, hidden_size=512, n_head=8),
    "560m": dict(n_layer=24, hidden_size=1024, n_head=16),
    "1b1": dict(n_layer=24, hidden_size=1536, n_head=16),
}


@dataclass(frozen=True)
class Variant:
    fast_loss: bool  # the model's full-logits loss when False (both levers below off)
    label_positions_only: bool
    chunked: bool
    group_by_length: bool
    padding_side: str = "right"
    gradient_checkpointing: bool = False
    attention: str = (
        "sdpa"  # kaika's fused BLOOM attention (kaika.modeling.attention); "eager": transformers' own
    )
    packing: bool = False  # whole examples packed into rows of up to cutoff_len (micro batch counts rows)
    trl: str = ""  # "default" / "best": TRL's SFTTrainer instead (the fields above do not apply)
    fused_gelu: bool = True  # BLOOM's GELU as one fused kernel (kaika.modeling.attention.fuse_gelu)
    lora: tuple = ()  # the LoRA family: peft LoraConfig fields beyond plain LoRA, as (name, value) pairs
    loraplus: float = 0.0  # LoRA+: lr ratio of B to A (kaika's LoraPlus optimizer)


# TRL's SFTTrainer as a user would run it on this data (prompt-completion records: loss on the
# completion only, EOS appended by TRL). "default": SFTConfig's defaults (gradient checkpointing on,
# random batches, no padding multiple), dtype set as for every variant. "best": its settings that apply
# to BLOOM on this hardware: gradient checkpointing off (memory is not the constraint at micro batch 4),
# length-grouped batches, padding to a multiple of 8. Not applicable: padding_free and packing (they
# need FlashAttention, which BLOOM has not and the CPU cannot run; BLOOM ignores position_ids, so a
# packed row would attend across examples) and use_liger_kernel (Triton, CUDA only).
TRL_SETTINGS = {
    "default": {},
    "best": {
        "gradient_checkpointing": False,
        "train_sampling_strategy": "group_by_length",
        "pad_to_multiple_of": 8,
    },
}
TRL_VERSION = "1.16.0"  # pinned: pip install -e ".[bench]"

VARIANTS = {
    "baseline": Variant(False, False, False, False, padding_side="left", attention="eager", fused_gelu=False),
    "kaika": Variant(True, True, True, True),
    "kaika-no-grouping": Variant(True, True, True, False),
    "kaika-no-chunks": Variant(True, True, False, True),
    "kaika-all-positions": Variant(True, False, True, True),
    "kaika-plain-loss": Variant(False, False, False, True),
    "kaika-eager-attention": Variant(True, True, True, True, attention="eager"),
    "kaika-packing": Variant(True, True, True, True, packing=True),
    "kaika-bloom-gelu": Variant(True, True, True, True, fused_gelu=False),
    "kaika-checkpointing": Variant(True, True, True, True, gradient_checkpointing=True),
    # The LoRA family (docs/lora-variants.md), each kaika's defaults otherwise: what a step costs.
    "kaika-rslora": Variant(True, True, True, True, lora=(("use_rslora", True),)),
    "kaika-dora": Variant(True, True, True, True, lora=(("use_dora", True),)),
    "kaika-pissa": Variant(True, True, True, True, lora=(("init_lora_weights", "pissa"),)),
    "kaika-loraplus": Variant(True, True, True, True, loraplus=16.0),
    "trl": Variant(True, True, True, False, trl="default", fused_gelu=False),
    "trl-best": Variant(True, True, True, True, trl="best", fused_gelu=False),
}
# What a plain run measures: kaika-checkpointing trades time for memory, and kaika-packing puts more
# tokens in each micro batch (its memory is not comparable at the same micro batch): opt-in (--variants).
FAMILY = [
    "kaika-rslora",
    "kaika-dora",
    "kaika-pissa",
    "kaika-loraplus",
]  # opt-in: --variants kaika kaika-dora …
DEFAULT_VARIANTS = [
    v for v in VARIANTS if v not in ("kaika-checkpointing", "kaika-packing", "kaika-bloom-gelu", *FAMILY)
]


# --------------------------------------------------------------------------- parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["small", "560m"], choices=sorted(SIZES) + [GEMMA])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--micro-batch", type=int, default=4, help="examples per step (no accumulation)")
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--records", type=int, default=512, help="size of the fixed sample of Dolly records")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
        help="weights dtypes, each variant run in each (default: float32 and bfloat16 on CPU, bfloat16 on CUDA)",
    )  # fmt: skip
    p.add_argument("--data", default=str(DOLLY), help="Alpaca-style JSONL (default: Japanese Dolly)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if trl_version() is None and any(VARIANTS[v].trl for v in args.variants):
        print('TRL is not installed: its rows are left out (pip install -e ".[bench]" to compare with it)')
        args.variants = [v for v in args.variants if not VARIANTS[v].trl]
    dtypes = args.dtypes or (["bfloat16"] if device == "cuda" else ["float32", "bfloat16"])
    # The machine's peak for each dtype, measured now: each variant's MFU is against its own dtype's.
    gemm = {dtype: gemm_rate(device, dtype) for dtype in dtypes}
    print(
        f"{machine(device)}; " + ", ".join(f"{d} GEMM {r / 1e9:.1f} GFLOP/s" for d, r in gemm.items()),
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="kaika-bench-"))
    data = {}
    for size in args.sizes:
        tok = tokenizer_of(size)
        if tok not in data:
            data[tok] = prepare_data(args, work, tok)
            print(f"{tok}: {data[tok]['summary']}", flush=True)
    runs = []
    for size in args.sizes:
        for dtype in dtypes:
            for name in args.variants:
                spec = {
                    "size": size,
                    "variant": name,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "micro_batch": args.micro_batch,
                    "cutoff_len": args.cutoff_len,
                    "seed": args.seed,
                    "device": device,
                    "dtype": dtype,
                    "work": str(work / tokenizer_of(size)),
                }
                started = time.perf_counter()
                row = run_child(spec)
                row.update(
                    size=size, variant=name, dtype=dtype, wall_s=round(time.perf_counter() - started, 1)
                )
                if "error" not in row:
                    row["mfu"] = row["useful_flops_per_s"] / gemm[dtype]
                runs.append(row)
                print(f"  {size:>12} {dtype:<8} {name:<20} {describe(row)}", flush=True)
                # After each variant, so that a run cut short keeps the rows it has.
                write_report(args, device, gemm, data, runs)
    print()
    print(table(runs, device))
    print(f"\nwritten: {write_report(args, device, gemm, data, runs)}")


def write_report(args, device: str, gemm: dict[str, float], data: dict, runs: list[dict]) -> Path:
    add_ratios(runs)
    report = {
        "machine": machine(device),
        "device": device,
        "gemm_flops_per_s": gemm,
        "trl": trl_version(),
        "data": {t: {k: v for k, v in d.items() if k != "summary"} for t, d in data.items()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "json")},
        "variants": {k: asdict(v) for k, v in VARIANTS.items() if k in args.variants},
        "runs": runs,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out


def machine(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"
    )


def gemm_rate(device: str, dtype: str) -> float:
    """Best-of FLOP/s of a square matrix product in ``dtype``: the machine's attainable dense rate."""
    import torch

    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(6 if device == "cuda" else 4):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10 if device == "cuda" else 1):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / (10 if device == "cuda" else 1))
    return 2 * n**3 / best


GEMMA = "gemma-3-270m"  # the builtin: a current model's vocabulary (262,144) and its real weights


def tokenizer_of(size: str) -> str:
    return GEMMA if size == GEMMA else "bpe"


def trl_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("trl")
    except Exception:
        return None


def load_tokenizer(name: str):
    if name == GEMMA:
        from transformers import AutoTokenizer

        from kaika.modeling.builtin import builtin_model_path

        return AutoTokenizer.from_pretrained(builtin_model_path(GEMMA))
    from kaika.modeling.builtin import train_tokenizer

    return train_tokenizer()


def prepare_data(args, root: Path, name: str) -> dict:
    """A fixed random sample of records, encoded once by kaika (prompt masked, EOS kept) for all
    variants; for TRL the same kept records as prompt-completion text (TRL tokenizes them itself)."""
    from kaika.data.examples import encode_records
    from kaika.data.prompts import load_template
    from kaika.data.records import load_records
    from kaika.data.tokenize import encode_example, resolve_pad_token

    work = root / name
    work.mkdir(parents=True)
    records = load_records([args.data])
    sample = random.Random(args.seed).sample(records, min(args.records, len(records)))
    tokenizer = load_tokenizer(name)
    resolve_pad_token(tokenizer)
    template = load_template("alpaca_ja")
    feats, report = encode_records(sample, template, tokenizer, args.cutoff_len)
    texts = []
    for r in sample:
        prompt = template.format(r["instruction"], r["input"])
        if encode_example(tokenizer, prompt, r["output"], args.cutoff_len) is not None:
            texts.append({"prompt": prompt, "completion": r["output"]})
    assert len(texts) == len(feats)
    tokenizer.save_pretrained(work / "tokenizer")
    (work / "features.json").write_text(json.dumps(feats), encoding="utf-8")
    (work / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    lengths = sorted(len(f["input_ids"]) for f in feats)
    supervised = sum(sum(x != -100 for x in f["labels"]) for f in feats)
    tokens = sum(lengths)
    return {
        "source": str(args.data),
        "examples": len(feats),
        "tokens_per_char": round(report.tokens_per_character, 3),
        "mean_length": round(tokens / len(feats), 1),
        "median_length": lengths[len(lengths) // 2],
        "truncated": report.truncated,
        "supervised_share": round(supervised / tokens, 3),
        "summary": f"data: {report.summary()}; supervised share {supervised / tokens:.2f}",
    }


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT ") :])


def add_ratios(runs: list[dict]) -> None:
    """Ratios within one run, at the same size and dtype: to the alpaca-lora baseline, and to TRL's
    best settings (``vs_trl_*``)."""
    for ref, prefix in (("baseline", ""), ("trl-best", "vs_trl_")):
        base = {(r["size"], r["dtype"]): r for r in runs if r["variant"] == ref and "error" not in r}
        for r in runs:
            b = base.get((r["size"], r["dtype"]))
            if b is None or "error" in r:
                continue
            r[prefix + "speedup_supervised"] = r["supervised_tokens_per_s"] / b["supervised_tokens_per_s"]
            r[prefix + "speedup_real"] = r["real_tokens_per_s"] / b["real_tokens_per_s"]
            r[prefix + "speedup_supervised_cpu_time"] = (
                r["supervised_tokens_per_cpu_s"] / b["supervised_tokens_per_cpu_s"]
            )
            r[prefix + "memory_ratio"] = r["peak_memory_bytes"] / b["peak_memory_bytes"]


def describe(row: dict) -> str:
    if "error" in row:
        return "FAILED " + row["error"]
    return (
        f"{row['s_per_step']:.2f} s/step, {row['supervised_tokens_per_s']:.1f} supervised tok/s, "
        f"peak {row['peak_memory_bytes'] / 2**30:.2f} GiB ({row['wall_s']:.0f} s)"
    )


def table(runs: list[dict], device: str) -> str:
    nan = float("nan")
    mem = "peak CUDA GiB" if device == "cuda" else "peak RSS GiB"
    head = (
        f"| size | dtype | variant | s/step | real tok/s | supervised tok/s | padding | {mem} | useful GFLOP/s "
        "| MFU (own dtype) | × supervised tok/s | × per CPU-s | × peak memory | × TRL-best tok/s | × TRL-best memory |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['dtype']} | {r['variant']} | failed: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['variant']} | {r['s_per_step']:.2f} | {r['real_tokens_per_s']:.1f} "
            f"| {r['supervised_tokens_per_s']:.1f} | {r['padding_fraction']:.1%} "
            f"| {r['peak_memory_bytes'] / 2**30:.2f} | {r['useful_flops_per_s'] / 1e9:.1f} | {r['mfu']:.1%} "
            f"| {r.get('speedup_supervised', nan):.2f} | {r.get('speedup_supervised_cpu_time', nan):.2f} "
            f"| {r.get('memory_ratio', nan):.2f} | {r.get('vs_trl_speedup_supervised', nan):.2f} "
            f"| {r.get('vs_trl_memory_ratio', nan):.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- child


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_dims(model) -> dict[str, int]:
    """What the FLOP count needs, read off the model: decoder layers, the parameters of their linear
    layers (LoRA excluded), the width of attention (heads × head dim), vocabulary and hidden size."""
    import torch

    cfg = model.config
    layers = getattr(cfg, "n_layer", None) or cfg.num_hidden_layers
    heads = getattr(cfg, "n_head", None) or cfg.num_attention_heads
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    body = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name and "lm_head" not in name
    )
    return {
        "layers": layers,
        "body": body,
        "attention": heads * head_dim,
        "vocab": cfg.vocab_size,
        "hidden": hidden,
    }


def step_flops(dims: dict[str, int], lengths, labels) -> float:
    """Useful FLOPs of one LoRA step (frozen base): the same formula for every variant.

    Per real token: forward 2·P through the body's linear layers (P their parameters; 12·L·h² for
    BLOOM) and 4·L·d·n in attention over the n real tokens it may attend to (d = heads × head dim;
    its row, or its example in a packed row); backward to activations costs the same again for the
    linear layers (no weight gradients) and twice for attention. Per supervised token: the output
    layer, 2·V·h forward and 2·V·h backward. Pad positions and logits nobody needs are not useful work.
    """
    n = lengths.double()  # real tokens per attention block (row, or packed example)
    real = float(n.sum())
    attention = float((n * n).sum()) * 4 * dims["layers"] * dims["attention"]
    supervised = float((labels[:, 1:] != -100).sum())
    return 4 * dims["body"] * real + 3 * attention + 4 * dims["vocab"] * dims["hidden"] * supervised


def build_model(spec: dict, tokenizer, variant: Variant):
    """The model to train and its LoRA config: a random BLOOM of the size's dimensions, or the
    builtin gemma-3-270m's real weights."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

    from kaika.modeling.attention import fuse_gelu, set_attention

    dtype = getattr(torch, spec["dtype"])
    if spec["size"] == GEMMA:
        from kaika.modeling.builtin import builtin_model_path

        attn = "eager" if variant.attention == "eager" and not variant.trl else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(
            builtin_model_path(GEMMA), dtype=dtype, attn_implementation=attn
        )
        targets = ["q_proj", "v_proj"]  # kaika's table for gemma3
    else:
        config = BloomConfig(
            vocab_size=VOCAB,
            **SIZES[spec["size"]],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.device(
            spec["device"]
        ):  # initialised where it trains: seconds, not minutes, for 1b1 on GPU
            model = BloomForCausalLM(config).to(dtype=dtype)
        if not variant.trl:  # TRL gets the model as transformers builds it
            set_attention(model, variant.attention)
        if variant.fused_gelu:
            fuse_gelu(model)
        targets = ["query_key_value"]
    model.to(spec["device"])
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=targets,
        task_type="CAUSAL_LM",
        **dict(variant.lora),
    )
    return model, lora


def child(spec: dict) -> None:
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from kaika.data.packing import PackedExamplesCollator, enable_packed_attention, pack_examples
    from kaika.training.loss import FastLoss
    from kaika.training.trainer import KaikaTrainer

    variant = VARIANTS[spec["variant"]]
    work = Path(spec["work"])
    cuda = spec["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    tokenizer.padding_side = variant.padding_side
    feats = json.loads((work / "features.json").read_text(encoding="utf-8"))
    set_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    model, lora = build_model(spec, tokenizer, variant)
    if variant.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if not variant.trl:
        model = get_peft_model(model, lora)
    dims = model_dims(model)
    total_steps = spec["warmup"] + spec["steps"]
    common_args = dict(
        output_dir=str(work / "out" / spec["variant"]),
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1,
        max_steps=total_steps,
        learning_rate=3e-4,
        warmup_steps=0,
        seed=spec["seed"],
        data_seed=spec["seed"],
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
        # Weights are in the dtype; on CUDA bf16 autocast on top, as kaika does. On CPU kaika runs
        # bf16 weights without autocast; TRL's bf16 flag (its default) turns CPU autocast on.
        bf16=dtype == torch.bfloat16 and (cuda or bool(variant.trl)),
        fp16=False,
    )
    if variant.trl:
        args = trl_config(spec, common_args)
    else:
        args = TrainingArguments(
            **common_args,
            remove_unused_columns=False,
            train_sampling_strategy="group_by_length" if variant.group_by_length else "random",
        )
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            reset_peak_rss()

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            steps.append({"start": time.perf_counter(), "cpu_start": time.process_time()})

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            steps[-1]["seconds"] = time.perf_counter() - steps[-1]["start"]
            steps[-1]["cpu_seconds"] = time.process_time() - steps[-1]["cpu_start"]

    class Counted:
        """Records what each micro-batch holds, as the model sees it."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            if "attention_mask" in inputs:
                mask = inputs["attention_mask"]
                lengths = mask.sum(1)
            else:  # packed rows: the collator's padding is the last segment of each row
                mask = inputs.pop("real_mask")
                blocks = []
                for pos, r in zip(inputs["position_ids"], mask.sum(1).tolist(), strict=True):
                    starts = [*(pos[:r] == 0).nonzero()[:, 0].tolist(), r]
                    blocks += [b - a for a, b in zip(starts, starts[1:], strict=False)]
                lengths = torch.tensor(blocks)
            steps[-1].update(
                padded=mask.numel(),
                real=int(mask.sum()),
                supervised=int((labels[:, 1:] != -100).sum()),
                flops=step_flops(dims, lengths, labels),
            )
            return super().training_step(model, inputs, num_items_in_batch)

    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=-100)
    if variant.packing:
        feats = pack_examples(feats, spec["cutoff_len"])
        enable_packed_attention(model)
        packed = PackedExamplesCollator(tokenizer.pad_token_id)

        def collator(rows):
            batch = packed(rows)
            length = torch.tensor([len(r["input_ids"]) for r in rows])
            batch["real_mask"] = (torch.arange(batch["input_ids"].shape[1])[None] < length[:, None]).long()
            return batch

    common = dict(
        model=model,
        args=args,
        train_dataset=feats,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    if variant.trl:
        from datasets import Dataset
        from trl import SFTTrainer

        texts = json.loads((work / "texts.json").read_text(encoding="utf-8"))
        trainer = type("Measured", (Counted, SFTTrainer), {})(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(texts),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[Clock()],
        )
    elif variant.fast_loss:
        levers = FastLoss(variant.label_positions_only, variant.chunked)
        trainer = type("Measured", (Counted, KaikaTrainer), {})(fast_loss=levers, **common)
        trainer.loraplus_lr_ratio = variant.loraplus
        assert trainer.fast_loss is not None
    else:
        trainer = type("Measured", (Counted, Trainer), {})(**common)
    result = trainer.train()
    measured = steps[spec["warmup"] :]
    seconds = sum(s["seconds"] for s in measured)
    cpu_seconds = sum(s["cpu_seconds"] for s in measured)
    supervised = sum(s["supervised"] for s in measured)
    padded = sum(s["padded"] for s in measured)
    real = sum(s["real"] for s in measured)
    row = {
        "s_per_step": seconds / len(measured),
        "real_tokens_per_s": real / seconds,
        "supervised_tokens_per_s": supervised / seconds,
        # Per second of this process's CPU time (all its threads): less disturbed by other load.
        "cpu_s_per_step": cpu_seconds / len(measured),
        "supervised_tokens_per_cpu_s": supervised / cpu_seconds,
        "padding_fraction": 1 - real / padded,
        "useful_flops_per_s": sum(s["flops"] for s in measured) / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss(),
        "peak_rss_bytes": peak_rss(),
        "lora_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n}),
        "train_loss": result.training_loss,
        "steps": [{k: v for k, v in s.items() if k not in ("start", "cpu_start")} for s in steps],
    }
    (work / f"result-{spec['size']}-{spec['variant']}.json").write_text(json.dumps(row))
    print("RESULT " + json.dumps(row), flush=True)


def trl_config(spec: dict, common: dict):
    from trl import SFTConfig

    settings = dict(TRL_SETTINGS[VARIANTS[spec["variant"]].trl])
    sampling = settings.pop("train_sampling_strategy", "random")
    return SFTConfig(
        **common,
        max_length=spec["cutoff_len"],
        dataset_num_proc=None,
        train_sampling_strategy=sampling,
        **settings,
    )


if __name__ == "__main__":
    main()
