"""Running kaika as users launch it: one process, torchrun, accelerate launch; killing it as faults do.

Shared by the tests of several processes (tests/training/test_scaling.py, test_sharded.py,
test_nodes.py, test_dpo_scaling.py): each launch on a free rendezvous port of its own, one thread
per process (the in-process references use one thread too: another thread count sums in another
order), and the whole process tree killed when a test kills "the run".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from servers import free_port

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun(processes: int = 2, *more: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(free_port()), *more,
    ]  # fmt: skip


def accelerate(config: str, processes: int = 2, *more: str) -> list[str]:
    """``accelerate launch`` with a shipped config (configs/accelerate/NAME), as the docs tell users."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
        "--num_processes", str(processes), "--main_process_port", str(free_port()), *more,
    ]  # fmt: skip


def kaika(command: str, *args: str, launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [sys.executable]), "-m", "kaika", command, *args]


def start(cmd: list[str], **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run(cmd: list[str], timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (a launcher's workers outlive it otherwise)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    proc.communicate()


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def logged_step(out: Path) -> int:
    try:
        rows = log_rows(out)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half-written
        return 0
    return max((row["step"] for row in rows), default=0)


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {what}:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol: float, context: str = "") -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    assert any(k for k in ta if "lora_B" in k and ta[k].abs().max() > 1e-3)  # it trained
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=atol, msg=f"{key} {context}")


@contextmanager
def one_thread():
    """In-process reference runs use one thread, as the subprocesses do (OMP_NUM_THREADS=1): another
    thread count sums in another order, ~1e-7 relative per step, which Adam can grow past 1e-6."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
