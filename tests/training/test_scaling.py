"""Real multi-process training and real interruptions, through the real CLI in subprocesses.

Tolerances:
* DDP vs one process: the same 4-example global batch is split 2 × 2 over two gloo ranks, or
  2 × 2 over two accumulation steps in one process. The Trainer divides the loss by the
  global supervised-token count in both, so the gradients are the same sums in a different
  association order (the all-reduce adds the ranks' partial gradients). fp32 rounding is
  ~1e-7 relative per step; Adam's first steps normalise by sqrt(v), which can amplify the
  rounding of near-zero gradients to ~lr × 1e-3. With lr 1e-2 and LoRA B entries of ~0.1
  after 6 steps, ``atol=1e-5`` (1e-4 of the weights' scale) separates rounding from a real
  difference: a wrong batch split or data order moves weights by ~1e-2. Measured: 0.0 (two
  operands: the all-reduce sum is commutative and the association is the same).
* Resume vs uninterrupted: the same process count and shapes replay the same operations in the
  same order once optimizer, scheduler, RNG and data position are restored, so the result is
  bitwise equal on CPU (measured 0.0); ``atol=1e-6`` only leaves room for BLAS thread
  scheduling. A lost RNG state (dropout 0.1 here) or a replayed or skipped batch moves the
  weights by ~1e-3 or more.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import seed_records, write_jsonl
from kaika.config import TrainConfig
from kaika.training.faults import checkpoint_problem
from kaika.training.sft import train
from launchers import (
    ACCELERATE_CONFIGS,
    assert_same_adapter,
    env,
    log_rows,
    logged_step,
    one_thread,
    run,
    wait_for,
)
from servers import free_port

pytestmark = pytest.mark.slow

# Eight short seed tasks: all fit cutoff_len 128, so a 4-example global batch divides them evenly.
# DoRA with LoRA+: its magnitude vectors and its four optimizer groups go through DDP and resume too.
COMMON = [
    "--cutoff-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2",
    "--logging-steps", "1", "--lora-r", "8", "--lora-alpha", "16", "--lora-variant", "dora",
    "--loraplus-lr-ratio", "4",
]  # fmt: skip


def records():
    recs = seed_records(8, max_chars=100)
    assert len(recs) == 8
    return recs


def config(data: Path, out: Path, steps: int, save_steps: int, dropout: float) -> TrainConfig:
    """The in-process equivalent of ``kaika train $COMMON`` (the reference runs)."""
    cfg = TrainConfig()
    cfg.data.data, cfg.data.cutoff_len = [str(data)], 128
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, dropout
    cfg.lora.variant, cfg.lora.loraplus_lr_ratio = "dora", 4.0
    t = cfg.train
    t.output_dir, t.batch_size, t.micro_batch_size, t.lr = str(out), 4, 2, 1e-2
    t.max_steps, t.save_steps, t.logging_steps = steps, save_steps, 1
    return cfg


def cli(*args: str, launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [sys.executable]), "-m", "kaika", "train", *COMMON, *args]


def test_ddp_two_processes_match_one_process(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records())
    args = ["--data", str(data), "--max-steps", "6", "--save-steps", "100", "--lora-dropout", "0"]
    launchers = {  # both run at once: each on its own free rendezvous port, not the default 29500
        "torchrun": [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()),
        ],
        "accelerate": [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port()),
        ],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            cli(*args, "--output-dir", str(tmp_path / name), launcher=launcher),
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, launcher in launchers.items()
    }
    # Meanwhile, the reference: one process, the same global batch as 2 micro-batches × accumulation 2.
    with one_thread():
        single = train(config(data, tmp_path / "single", steps=6, save_steps=100, dropout=0.0))
    assert single.global_step == 6
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{stderr[-3000:]}"
        out = tmp_path / name
        assert_same_adapter(out, single.output_dir, atol=1e-5)
        # The global batch is what was asked; the log says how, once (rank 0 speaks, rank 1 does not).
        assert stderr.count("global batch 4 = micro batch 2 × accumulation 1 × 2 process(es)") == 1, stderr
        assert stdout.count("adapter saved to") == 1
        steps = [row["step"] for row in log_rows(out) if "loss" in row]
        assert steps == [1, 2, 3, 4, 5, 6]  # one writer
        # Each rank saved its own RNG state in the checkpoint: two processes really trained.
        ckpt = out / "checkpoints" / "checkpoint-6"
        assert {p.name for p in ckpt.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
        losses = [row["loss"] for row in log_rows(out) if "loss" in row]
        reference = [row["loss"] for row in log_rows(single.output_dir) if "loss" in row]
        assert losses == pytest.approx(reference, rel=1e-5)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cli(*args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_term_interrupt_and_resume_give_the_uninterrupted_adapter(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records())
    out = tmp_path / "run"
    # Dropout on, accumulation 2, 2 steps per epoch, checkpoints every 3 steps (mid-epoch):
    # exactness needs the RNG, the sampler's epoch and the position inside the epoch restored.
    args = ["--data", str(data), "--output-dir", str(out), "--max-steps", "12", "--save-steps", "3"]
    args += ["--lora-dropout", "0.1", "--save-total-limit", "2"]
    ckpts = out / "checkpoints"
    # A random step after the first checkpoint (KAIKA_TEST_KILL_AT=N replays a failed draw).
    kill_at = int(os.environ.get("KAIKA_TEST_KILL_AT", 0)) or random.Random().randint(4, 8)

    # 1. SIGKILL: no handler runs; whatever was being written stays as it was.
    proc = start(args)
    wait_for(proc, lambda: logged_step(out) >= kill_at, f"step {kill_at}")
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()
    complete = [c for c in ckpts.iterdir() if checkpoint_problem(c) is None]
    assert complete, f"killed at step {kill_at} with no complete checkpoint"
    # As if the kill had hit a save: a newer checkpoint with a truncated adapter and no state.
    newest = max(complete, key=lambda c: int(c.name.split("-")[1]))
    torn = ckpts / f"checkpoint-{int(newest.name.split('-')[1]) + 1}"
    if not torn.exists():
        shutil.copytree(newest, torn)
        (torn / "trainer_state.json").unlink()
        with (torn / "adapter_model.safetensors").open("r+b") as f:
            f.truncate(500)

    # 2. --resume, then SIGTERM: a checkpoint at the end of the current step, exit 128 + 15.
    proc = start([*args, "--resume"])
    wait_for(proc, lambda: logged_step(out) >= kill_at + 2, f"step {kill_at + 2}")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert f"{torn.name} is incomplete" in stderr and not torn.exists()
    assert "stopped by SIGTERM at step" in stderr and "--resume to continue" in stderr
    term_step = int(stderr.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert checkpoint_problem(ckpts / f"checkpoint-{term_step}") is None
    assert not (out / "adapter_model.safetensors").exists()  # stopped early: no final adapter

    # 3. --resume, then Ctrl-C (SIGINT): the same, exit 128 + 2.
    if term_step < 11:
        proc = start([*args, "--resume"])
        wait_for(proc, lambda: logged_step(out) >= term_step + 1, f"step {term_step + 1}")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
        int_step = int(stderr.split("stopped by SIGINT at step ")[1].split(":")[0])
        assert checkpoint_problem(ckpts / f"checkpoint-{int_step}") is None

    # 4. --resume to the end.
    done = run(cli(*args, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]

    # The reference, uninterrupted, in this process (same seed, same config).
    with one_thread():
        ref = train(config(data, tmp_path / "ref", steps=12, save_steps=3, dropout=0.1))
    assert_same_adapter(out, ref.output_dir, atol=1e-6, context=f"KAIKA_TEST_KILL_AT={kill_at}")
    # The log reads as one run: each step once, the same losses as the uninterrupted run.
    rows = [row for row in log_rows(out) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, 13))
    reference = [row["loss"] for row in log_rows(ref.output_dir) if "loss" in row]
    assert [row["loss"] for row in rows] == pytest.approx(reference, rel=1e-6, abs=1e-6)
