"""``kaika dpo`` killed and resumed, and over two processes, through the real CLI in subprocesses.

The tolerances are those of tests/training/test_scaling.py, for the same reasons: a resume replays
the same operations (bitwise equal on CPU, ``atol=1e-6`` for BLAS thread scheduling); DDP over two
gloo ranks sums the same gradients in another association (``atol=1e-5``, 1e-4 of the weights'
scale). A replayed or skipped batch, or a reference that moved, shifts the weights by ~1e-3 or more.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import seed_records, write_jsonl
from kaika.config import TrainConfig
from kaika.training.sft import train
from launchers import env
from servers import free_port

pytestmark = pytest.mark.slow

COMMON = [
    "--cutoff-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "5e-3",
    "--logging-steps", "1", "--dtype", "float32",
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """Preference pairs (the seed tasks' answers over the next task's) and an SFT run to continue."""
    root = tmp_path_factory.mktemp("pref")
    tasks = seed_records(13, 120)
    pairs = [{"instruction": a["instruction"], "chosen": a["output"], "rejected": b["output"]}
             for a, b in zip(tasks, tasks[1:], strict=False)]  # fmt: skip
    data = write_jsonl(root / "pairs.jsonl", pairs[:12])
    cfg = TrainConfig()
    cfg.model.dtype = "float32"
    cfg.data.data, cfg.data.cutoff_len = [str(write_jsonl(root / "sft.jsonl", tasks))], 128
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.micro_batch_size, t.lr = str(root / "sft"), 3, 4, 4, 1e-2
    train(cfg)
    return data, root / "sft"


def cli(*args: str, launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [sys.executable]), "-m", "kaika", "dpo", *COMMON, *args]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol: float, sft: Path) -> None:
    ta, tb, start = adapter(a), adapter(b), adapter(sft)
    assert ta.keys() == tb.keys() == start.keys()
    assert max((ta[k] - start[k]).abs().max() for k in ta) > 1e-3  # DPO moved the SFT adapter
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=atol, msg=key)


def log_rows(out: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or a line half-written
        return []


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(inputs, tmp_path):
    data, sft = inputs
    args = ["--from", str(sft), "--data", str(data), "--max-steps", "8", "--save-steps", "3"]
    ref = subprocess.run(
        cli(*args, "--output-dir", str(tmp_path / "ref")), env=env(), capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "run"
    proc = subprocess.Popen(cli(*args, "--output-dir", str(out)), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while max((r["step"] for r in log_rows(out)), default=0) < 5:  # past checkpoint-3, mid-epoch
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()

    done = subprocess.run(
        cli(*args, "--output-dir", str(out), "--resume"), env=env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_adapter(out, tmp_path / "ref", atol=1e-6, sft=sft)
    rows = [r for r in log_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))  # each step once
    reference = [r for r in log_rows(tmp_path / "ref") if "loss" in r]
    for key in ("loss", "reward_margin", "logp_chosen", "logp_rejected"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in reference], rel=1e-6, abs=1e-6)


def test_ddp_two_processes_match_one_process(inputs, tmp_path):
    data, sft = inputs
    args = ["--from", str(sft), "--data", str(data), "--max-steps", "4", "--save-steps", "100"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]  # fmt: skip
    ddp = subprocess.Popen(cli(*args, "--output-dir", str(tmp_path / "ddp"), launcher=torchrun), env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    single = subprocess.run(
        cli(*args, "--output-dir", str(tmp_path / "one")), env=env(), capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-3000:]
    stdout, stderr = ddp.communicate(timeout=600)
    assert ddp.returncode == 0, stderr[-3000:]
    assert stderr.count("global batch 4 = micro batch 2 × accumulation 1 × 2 process(es)") == 1, stderr
    assert stdout.count("adapter saved to") == 1
    ckpt = tmp_path / "ddp" / "checkpoints" / "checkpoint-4"
    assert {p.name for p in ckpt.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert_same_adapter(tmp_path / "ddp", tmp_path / "one", atol=1e-5, sft=sft)
    losses = [r["loss"] for r in log_rows(tmp_path / "ddp") if "loss" in r]
    reference = [r["loss"] for r in log_rows(tmp_path / "one") if "loss" in r]
    assert losses == pytest.approx(reference, rel=1e-5)
