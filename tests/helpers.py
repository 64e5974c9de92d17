"""Tiny models built from config, written where the tests ask: nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SEED_TASKS = Path(__file__).resolve().parents[1] / "data" / "alpaca_jp_seed_tasks" / "seed_tasks_ja.jsonl"


def train_dtype() -> str:
    """The dtype real models are trained in here: what ``--dtype auto`` picks on this CPU, bf16 where it
    computes bf16 natively (AVX512-BF16, AMX, Arm BF16), else float32. Elsewhere PyTorch emulates bf16
    some fifty times slower than float32 (1 vs 17-100 GFLOP/s measured on a 2-core AVX2 EPYC), which no
    user trains in and no test run can afford on real models; tiny models cover bf16 there."""
    from kaika.modeling.load import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


ELYZA_TASKS = (
    Path(__file__).resolve().parents[1] / "src" / "kaika" / "assets" / "elyza_tasks_100"
)  # CC BY-SA 4.0


def run_kaika(*args: str, cwd: Path) -> str:
    """``python -m kaika ARGS`` in ``cwd`` as a user runs it (2 threads); its output, or the test fails
    with the end of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-m", "kaika", *args], cwd=cwd, capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def seed_records(n: int | None = None, max_chars: int | None = None) -> list[dict[str, str]]:
    recs = [json.loads(line) for line in SEED_TASKS.read_text(encoding="utf-8").splitlines()]
    if max_chars:
        recs = [r for r in recs if len(r["instruction"]) + len(r["input"]) + len(r["output"]) <= max_chars]
    return recs[:n] if n else recs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def build_model(kind: str, tokenizer, out: Path, seed: int = 0) -> Path:
    """A 2-layer model of architecture ``kind`` (bloom, llama, mistral, qwen2, gemma3_text, gpt2) with
    ``tokenizer``, saved to ``out``."""
    from transformers import (
        AutoModelForCausalLM,
        BloomConfig,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    llama_shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        **ids,
    )
    config = {
        "bloom": lambda: BloomConfig(
            vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4, initializer_range=0.1, **ids
        ),
        "llama": lambda: LlamaConfig(**llama_shape),
        "mistral": lambda: MistralConfig(**llama_shape, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**llama_shape),
        "gemma3_text": lambda: Gemma3TextConfig(
            **llama_shape, head_dim=16, query_pre_attn_scalar=16, sliding_window=64
        ),
        "gpt2": lambda: GPT2Config(
            vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids
        ),
    }[kind]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def in_mount_namespace(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``sh -c script`` in a private mount namespace, where it may mount a tmpfs (root or not:
    ``unshare --map-root-user``). Tests run as root, where chmod does not stop writes; a read-only
    or tiny file system does."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    probe = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True
    )
    if probe.returncode:
        pytest.skip(f"mount namespaces are not allowed here: {probe.stderr.decode().strip()}")
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
