"""Each process's peak memory and the step time of one LoRA run at bloom-560m dims, by engine and base.

    .venv/bin/python benchmarks/engine_memory.py                         # all rows, ~15 min on 2 cores
    .venv/bin/python benchmarks/engine_memory.py --rows ddp fsdp2 zero3   # some of them

Every row is the same ``kaika train`` (LoRA r 8 on query_key_value, micro batch 2, global batch 4,
cutoff 256, 4 optimizer steps, float32, the shipped seed tasks) on the same randomly initialised model
with bloom-560m's dimensions (24 layers, hidden 1,024, vocabulary 250,880; written once, float32),
launched as a user launches it:

  one          one process
  4bit, 8bit   one process, the base quantized by bitsandbytes (--quantization)
  ddp          torchrun, 2 processes: a whole copy of the model in each
  fsdp2        accelerate launch, configs/accelerate/fsdp.yaml: each rank loads and keeps half
  zero3        accelerate launch, configs/accelerate/deepspeed_zero3.yaml: partitioned as it loads

Memory is read from each training process's /proc/PID/smaps_rollup every 50 ms until it exits, in
three phases: loading (until the first step is logged), the steps, and after them (the final
save-and-verify, which loads a fresh base on rank 0). Three measures, because they disagree here: RSS
counts every resident page the process maps, the pages of the memory-mapped checkpoint included, which
several processes on one machine share through the page cache; PSS divides such shared pages among the
processes that map them (the sum over processes is the machine's memory); anonymous memory is what the
process allocated itself (copies, activations, optimizer state). Step time is the mean of the
logged steps after the first. On a CPU the processes share the machine's cores, so
the several-process rows say nothing of speed, only of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_TASKS = ROOT / "data" / "alpaca_jp_seed_tasks" / "seed_tasks_ja.jsonl"
CONFIGS = ROOT / "configs" / "accelerate"
ROWS = ["one", "8bit", "4bit", "ddp", "fsdp2", "zero3"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--work", default="/tmp/kaika-engine-memory")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "engine-memory-560m.json"))
    return p.parse_args(argv)


def base_model(work: Path) -> Path:
    out = work / "bloom-560m-dims"
    if not (out / "config.json").is_file():
        import torch
        from transformers import BloomConfig, BloomForCausalLM

        from kaika.modeling.builtin import train_tokenizer

        tokenizer = train_tokenizer()  # ids < 8,192: valid in BLOOM's vocabulary
        config = BloomConfig(vocab_size=250_880, hidden_size=1024, n_layer=24, n_head=16,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        torch.manual_seed(0)
        BloomForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def launcher(row: str, port: int) -> list[str]:
    if row == "ddp":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
        ]
    if row in ("fsdp2", "zero3"):
        config = {"fsdp2": "fsdp.yaml", "zero3": "deepspeed_zero3.yaml"}[row]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                "--num_processes", "2", "--main_process_port", str(port)]  # fmt: skip
    return [sys.executable]


def is_worker(cmdline: list[str]) -> bool:
    """A process that runs kaika itself (not torchrun's or accelerate's launcher around it)."""
    text = " ".join(cmdline)
    return (
        "kaika" in text and "torch.distributed.run" not in text and "accelerate.commands.launch" not in text
    )


METRICS = {"Rss:": "rss", "Pss:": "pss", "Anonymous:": "anon"}


def read_memory(pid: int) -> dict[str, int]:
    """RSS, PSS (shared pages divided among the processes that map them) and anonymous memory, bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split()[0] if line else ""
        if key in METRICS:
            found[METRICS[key]] = int(line.split()[1]) * 1024
    return found


def watch(proc: subprocess.Popen, log: Path, steps: int) -> dict[int, dict[str, dict[str, int]]]:
    """Every 50 ms until ``proc`` ends: each kaika process's memory, the most of each metric in each phase
    (loading until the first step is logged, the steps, after them: {pid: {phase: {metric: bytes}}})."""
    import psutil

    root = psutil.Process(proc.pid)
    memory: dict[int, dict[str, dict[str, int]]] = {}
    while proc.poll() is None:
        try:
            logged = len(log.read_text().splitlines()) if log.is_file() else 0
        except OSError:
            logged = 0
        phase = "load" if logged == 0 else "steps" if logged < steps else "after"
        for p in [root, *root.children(recursive=True)]:
            try:
                if not is_worker(p.cmdline()):
                    continue
                now = read_memory(p.pid)
            except (psutil.NoSuchProcess, OSError):
                continue
            phases = memory.setdefault(p.pid, {k: dict.fromkeys(METRICS.values(), 0) for k in PHASES})
            for metric, value in now.items():
                phases[phase][metric] = max(phases[phase][metric], value)
                phases["whole run"][metric] = max(phases["whole run"][metric], value)
        time.sleep(0.05)
    return memory


PHASES = ("load", "steps", "after", "whole run")


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = base_model(work)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": "bloom-560m dims (random weights, float32)",
        "rows": [],
    }
    out = Path(args.json)
    for row in args.rows:
        result = measure(row, base, work, args.steps)
        report["rows"].append(result)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result), flush=True)
    print(table(report["rows"]))


def measure(row: str, base: Path, work: Path, steps: int) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = work / f"run-{row}"
    cmd = [
        *launcher(row, port), "-m", "kaika", "train", "--base-model", str(base), "--data", str(SEED_TASKS),
        "--cutoff-len", "256", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", str(steps),
        "--save-steps", "1000", "--logging-steps", "1", "--dtype", "float32", "--output-dir", str(run), "--overwrite",
        "--lora-target", "query_key_value",
    ]  # fmt: skip
    if row in ("4bit", "8bit"):
        cmd += ["--quantization", row]
    shutil.rmtree(run, ignore_errors=True)  # the phases are read off this run's log
    env = {**os.environ, "OMP_NUM_THREADS": "1" if row in ("ddp", "fsdp2", "zero3") else "2"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = watch(proc, run / "trainer_log.jsonl", steps)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    logged = []
    if (run / "trainer_log.jsonl").is_file():
        logged = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r][1:]
    return {
        "row": row,
        "rc": proc.returncode,
        # per process (rank order unknown: the one that verifies, rank 0, holds the most afterwards)
        "memory_gib": sorted(
            (
                {ph: {k: round(v / 2**30, 2) for k, v in vals.items()} for ph, vals in m.items()}
                for m in memory.values()
            ),
            key=lambda m: m["after"]["rss"],
        ),
        "tokens_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "seconds": round(seconds, 1),
        "error": stderr[-1500:] if proc.returncode else "",
    }


def table(rows: list[dict]) -> str:
    """One line per row: per process, RSS / PSS / anonymous (GiB) while loading, during the steps, after."""
    lines = [
        "| row | process | loading: RSS / PSS / anon | steps: RSS / PSS / anon | after: RSS / PSS / anon | tokens/s |",
        "|---|--:|---|---|---|--:|",
    ]
    for r in rows:
        for i, m in enumerate(r["memory_gib"]):
            cells = [" / ".join(f"{m[ph][k]:.2f}" for k in ("rss", "pss", "anon")) for ph in PHASES[:3]]
            lines.append(
                f"| {r['row'] if i == 0 else ''} | {i} | {' | '.join(cells)} | {r['tokens_per_s'] if i == 0 else ''} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
