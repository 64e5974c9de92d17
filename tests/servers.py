"""Running ``kaika serve`` for tests: a real server in a subprocess, on a free port, until it answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    # One thread: the tiny model gains nothing from two, and the test machine's cores are shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kaika", "serve", *args, "--port", str(port)], stdout=f, stderr=f, env=env
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"server did not come up:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
