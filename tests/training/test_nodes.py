"""Several nodes, as users launch them, on 127.0.0.1: two ``torchrun --nnodes 2`` launchers (c10d
rendezvous, one process each), then ``accelerate launch --num_machines 2``.

A node dies (SIGKILL of its launcher and worker) mid-run: the other stops within seconds with a
message that says what happened and what to do, instead of hanging in its next collective. Both
nodes then resume with accelerate and train the adapter one process trains with the same global
batch, uninterrupted (tolerance: tests/training/test_scaling.py's DDP bound; measured 0.0). Nodes that
were given different commands stop before the first step, naming the difference.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from helpers import seed_records, write_jsonl
from kaika.config import TrainConfig
from kaika.training.faults import checkpoint_problem
from kaika.training.sft import train
from launchers import (
    ACCELERATE_CONFIGS,
    assert_same_adapter,
    kaika,
    kill_tree,
    log_rows,
    logged_step,
    one_thread,
    start,
    wait_for,
)
from servers import free_port

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = [
    "--cutoff-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2", "--logging-steps", "1",
    "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--dtype", "float32",
    "--max-steps", str(STEPS), "--save-steps", "2",
]  # fmt: skip


def torchrun_node(rank: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "kaika-test",
        "--node_rank", str(rank),
    ]  # fmt: skip


def accelerate_node(rank: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"),
        "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("nodes") / "train.jsonl", seed_records(8, max_chars=100))


def reference(data: Path, out: Path) -> Path:
    cfg = TrainConfig()
    cfg.model.dtype = "float32"
    cfg.data.data, cfg.data.cutoff_len = [str(data)], 128
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.0
    t = cfg.train
    t.output_dir, t.batch_size, t.micro_batch_size, t.lr = str(out), 4, 2, 1e-2
    t.max_steps, t.save_steps, t.logging_steps = STEPS, 2, 1
    with one_thread():
        return train(cfg).output_dir


def test_a_dead_node_stops_the_other_and_both_resume_to_the_one_process_adapter(data, tmp_path):
    out = tmp_path / "run"
    args = [*COMMON, "--data", str(data), "--output-dir", str(out)]
    port = free_port()
    nodes = [start(kaika("train", *args, launcher=torchrun_node(rank, port))) for rank in (0, 1)]
    wait_for(nodes[0], lambda: logged_step(out) > 2 and checkpoint_problem(out / "checkpoints" / "checkpoint-2") is None,
             "step 3")  # fmt: skip

    killed = time.monotonic()
    kill_tree(nodes[1])
    _, stderr = nodes[0].communicate(timeout=120)
    stopped = time.monotonic() - killed
    assert nodes[0].returncode != 0
    assert stopped < 60, f"the surviving node took {stopped:.0f} s to stop"
    assert "lost another process of the run" in stderr and "with --resume" in stderr, stderr[-3000:]
    assert "127.0.0.1" in stderr.split("lost another process of the run")[1][:400]  # the peer, named
    assert not (out / "adapter_model.safetensors").exists()

    # Both nodes back, launched with accelerate this time: the run continues from its last checkpoint.
    port = free_port()
    nodes = [
        start(kaika("train", *args, "--resume", launcher=accelerate_node(rank, port))) for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    assert "resuming from" in outputs[0][1] and "on 2 nodes" in outputs[0][1]

    ref = reference(data, tmp_path / "reference")
    assert_same_adapter(out, ref, atol=1e-5)
    assert [r["step"] for r in log_rows(out) if "loss" in r] == list(range(1, STEPS + 1))


def test_nodes_given_different_commands_stop_before_the_first_step_naming_the_difference(data, tmp_path):
    out = tmp_path / "run"
    port = free_port()
    lrs = {0: "1e-2", 1: "1e-3"}  # as if one node ran an older copy of the command
    nodes = [
        start(
            kaika(
                "train",
                *COMMON,
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--lr",
                lrs[rank],
                launcher=torchrun_node(rank, port),
            )
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    stderr = outputs[0][1]
    assert "do not agree, so it stopped before the first step" in stderr, stderr[-3000:]
    assert "learning_rate 0.001 vs 0.01" in stderr or "learning_rate 0.01 vs 0.001" in stderr
    assert logged_step(out) == 0
