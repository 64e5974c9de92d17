"""Tiny models built from config, written where the tests ask: nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

SEED_TASKS = Path(__file__).resolve().parents[1] / "data" / "alpaca_jp_seed_tasks" / "seed_tasks_ja.jsonl"
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


def write_bloom_gguf(model, tokenizer, path: Path) -> Path:
    """Write a BLOOM model and its byte-level BPE tokenizer as an F32 GGUF file transformers can load."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "bloom")
    w.add_name("tiny-bloom")
    w.add_context_length(2048)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(4 * cfg.hidden_size)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(backend.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BLOOM, cfg.n_layer)
    heads, hidden = cfg.n_head, cfg.hidden_size
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":  # tied to the embeddings; GGUF BLOOM has no separate output
            continue
        base, suffix = key.rsplit(".", 1)
        gg = names.get_name(base.removeprefix("transformer."))
        data = tensor.float().numpy()
        if gg.endswith("attn_qkv"):  # HF: per-head interleaved (H, 3, hd); GGUF: blocks (3, H, hd)
            data = data.reshape(heads, 3, hidden // heads, *data.shape[1:]).swapaxes(0, 1).reshape(data.shape)
        w.add_tensor(f"{gg}.{suffix}", np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
