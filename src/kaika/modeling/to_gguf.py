"""A transformers causal LM as a GGUF file that llama.cpp (and Ollama, LM Studio…) load.

The `gguf` package writes the file; this module decides what goes in it, as llama.cpp's own
converter (``convert_hf_to_gguf.py``) does for the same architectures:

* **names**: ``gguf``'s ``TensorNameMap`` turns a transformers tensor name into llama.cpp's
  (``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``);
* **layout**: where llama.cpp keeps a tensor otherwise, a :class:`Layout` says how (rows permuted:
  BLOOM's fused q/k/v, Llama's rotary halves; transposed: GPT-2's Conv1D; shifted: Gemma's norms
  hold ``1 + w``). The same layout maps a tensor back, which is how :func:`write_gguf` tells the
  caller what the file holds in transformers' terms, rounding included;
* **hyperparameters**: one function per architecture writes the keys llama.cpp reads, and a check
  refuses a model llama.cpp would run differently (a Gemma 3 attention scale it hard-codes, a rope
  scaling it does not know);
* **tokenizer**: tokens, merges or scores, token types, special ids, whether BOS is added, the
  pre-tokenizer by the name llama.cpp knows it, and the chat template.

Tensors of one dimension (norms, biases) stay float32, as llama.cpp's converter keeps them; every
matrix is written in the requested type (q8_0 where its rows divide into blocks of 32, else f16).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kaika.errors import KaikaError

log = logging.getLogger(__name__)

QUANTS = ("f16", "bf16", "q8_0")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # an optional extra
        raise KaikaError("GGUF export needs the gguf package: pip install 'kaika[gguf]'") from e
    return gguf


# --------------------------------------------------------------------------- tensor layouts


@dataclass(frozen=True, eq=False)  # eq=False: it holds an array
class Layout:
    """How llama.cpp lays out a tensor that transformers holds as ``x``: file row ``i`` is model row
    ``rows[i]``; ``transpose``: the file holds ``x.T``; ``shift``: the file holds ``x + shift``."""

    rows: np.ndarray | None = None
    transpose: bool = False
    shift: float = 0.0

    def to_file(self, x: np.ndarray) -> np.ndarray:
        if self.transpose:
            x = x.T
        if self.rows is not None:
            x = x[self.rows]
        if self.shift:
            x = x + np.float32(self.shift)
        return np.ascontiguousarray(x)

    def from_file(self, x: np.ndarray) -> np.ndarray:
        if self.shift:
            x = x - np.float32(self.shift)
        if self.rows is not None:
            x = x[np.argsort(self.rows)]
        if self.transpose:
            x = x.T
        return np.ascontiguousarray(x)


SAME = Layout()


def bloom_qkv_rows(heads: int, head_dim: int) -> np.ndarray:
    """BLOOM's query_key_value is per head [q k v] (rows (head, 3, head_dim)); llama.cpp's attn_qkv
    is [all q; all k; all v] (rows (3, head, head_dim))."""
    return np.arange(3 * heads * head_dim).reshape(heads, 3, head_dim).transpose(1, 0, 2).reshape(-1)


def rotary_rows(heads: int, head_dim: int) -> np.ndarray:
    """transformers' Llama rotates the two halves of a head (rotate_half); llama.cpp's LLAMA rope
    rotates adjacent pairs: each head's rows go from (2, head_dim/2) to (head_dim/2, 2) order."""
    return np.arange(heads * head_dim).reshape(heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


# --------------------------------------------------------------------------- hyperparameters


def rope_of(config, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameters (theta, type, factor) as transformers 5 (rope_parameters, per layer type
    for Gemma 3) or earlier versions (rope_theta, rope_scaling) hold them."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type and layer_type in params:
        params = params[layer_type]
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor"))
    return {"theta": theta, "type": kind, "factor": factor}


def write_rope(w, config, layer_type: str | None = None) -> None:
    gguf = _gguf()
    rope = rope_of(config, layer_type)
    if rope["theta"] is not None:
        w.add_rope_freq_base(float(rope["theta"]))
    if rope["type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


def rope_problem(config, layer_type: str | None = None) -> str | None:
    kind = rope_of(config, layer_type)["type"]
    if kind not in ("default", "linear"):
        return f"rope scaling {kind!r} (kaika writes default and linear rope; llama.cpp's own converter covers the rest)"
    return None


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama_like_params(w, c) -> None:
    """The keys every Llama-shaped model (Llama, Mistral, Qwen2, Gemma 3) shares."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads or c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(head_dim_of(c))
    w.add_value_length(head_dim_of(c))


def llama_params(w, c) -> None:
    llama_like_params(w, c)
    w.add_rope_dimension_count(head_dim_of(c))
    write_rope(w, c)


def qwen2_params(w, c) -> None:
    llama_like_params(w, c)
    write_rope(w, c)


def gemma3_params(w, c) -> None:
    llama_like_params(w, c)
    write_rope(w, c, "full_attention")  # llama.cpp's sliding layers use base 10000 (checked)
    w.add_sliding_window(c.sliding_window)


def bloom_params(w, c) -> None:
    w.add_context_length(getattr(c, "seq_length", None) or 2048)  # BLOOM was trained on 2,048 tokens
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(4 * c.hidden_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head)
    w.add_layer_norm_eps(c.layer_norm_epsilon)


def gpt2_params(w, c) -> None:
    w.add_context_length(c.n_positions)  # llama.cpp sizes the position embeddings by it
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(c.layer_norm_epsilon)


# --------------------------------------------------------------------------- what llama.cpp cannot run


def llama_problem(c) -> str | None:
    if getattr(c, "sliding_window", None):
        return f"sliding-window attention ({c.sliding_window} tokens), which llama.cpp's llama architecture does not apply"
    return rope_problem(c)


def qwen2_problem(c) -> str | None:
    if getattr(c, "use_sliding_window", False):
        return "sliding-window attention (use_sliding_window), which llama.cpp's qwen2 does not apply"
    return rope_problem(c)


def gemma3_problem(c) -> str | None:
    """llama.cpp hard-codes parts of Gemma 3 that a config could set otherwise."""
    hd = head_dim_of(c)
    # llama.cpp scales attention by 1/sqrt(head_dim), and by 1/sqrt(hidden/heads) for the 27B (62 layers) only
    scale = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 62 else hd
    if c.query_pre_attn_scalar != scale:
        return f"query_pre_attn_scalar {c.query_pre_attn_scalar} (llama.cpp scales attention by {scale} here)"
    pattern = [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(c.num_hidden_layers)
    ]
    if list(getattr(c, "layer_types", None) or pattern) != pattern:
        return "a sliding/full attention pattern other than Gemma 3's five sliding layers then one full"
    sliding = rope_of(c, "sliding_attention")
    if sliding["theta"] not in (None, 10000.0) or sliding["type"] != "default":
        return f"sliding-layer rope {sliding} (llama.cpp uses base 10000, no scaling, there)"
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(c, cap, None):
            return f"{cap} {getattr(c, cap)}, which llama.cpp's gemma3 does not apply"
    return rope_problem(c, "full_attention")


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    """One architecture: its GGUF name, its hyperparameters, its tensors' layouts and what it cannot run."""

    name: str  # gguf.MODEL_ARCH member
    params: Callable[[Any, Any], None]
    layout: Callable[[str, Any], Layout] = lambda name, config: SAME
    problem: Callable[[Any], str | None] = lambda config: None
    skip: tuple[str, ...] = field(default=(".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
    # transformers' model type that reads the file back, where its own has no GGUF reader
    read_as: str | None = None


def llama_layout(name: str, c) -> Layout:
    hd = head_dim_of(c)
    if ".self_attn.q_proj." in name:
        return Layout(rows=rotary_rows(c.num_attention_heads, hd))
    if ".self_attn.k_proj." in name:
        return Layout(rows=rotary_rows(c.num_key_value_heads or c.num_attention_heads, hd))
    return SAME


def bloom_layout(name: str, c) -> Layout:
    if ".query_key_value." in name:
        return Layout(rows=bloom_qkv_rows(c.n_head, c.hidden_size // c.n_head))
    return SAME


def gpt2_layout(name: str, c) -> Layout:
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    return Layout(transpose=True) if name.endswith(conv1d) else SAME


def gemma_layout(name: str, c) -> Layout:
    return Layout(shift=1.0) if name.endswith("norm.weight") else SAME  # Gemma's RMSNorm scales by 1 + w


# transformers model_type → architecture. Mistral is llama.cpp's llama (its own converter does the same).
ARCHS: dict[str, Arch] = {
    "bloom": Arch("BLOOM", bloom_params, bloom_layout),
    "llama": Arch("LLAMA", llama_params, llama_layout, llama_problem),
    "mistral": Arch("LLAMA", llama_params, llama_layout, llama_problem, read_as="llama"),
    "qwen2": Arch("QWEN2", qwen2_params, problem=qwen2_problem),
    "gemma3_text": Arch("GEMMA3", gemma3_params, gemma_layout, gemma3_problem),
    "gpt2": Arch("GPT2", gpt2_params, gpt2_layout),
}


def reader_config(config):
    """The config transformers reads the file back with: the model's own, or (Mistral) the same
    hyperparameters under the architecture the file is (without a sliding window, Mistral is Llama)."""
    from transformers import AutoConfig

    read_as = ARCHS[config.model_type].read_as
    if read_as is None:
        return config
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    return AutoConfig.for_model(read_as, **fields)


def arch_of(config) -> Arch:
    """The architecture row of ``config``, or a refusal that names the supported ones and the reason."""
    model_type = getattr(config, "model_type", "?")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise KaikaError(
            f"GGUF export does not support the {model_type!r} architecture; supported: "
            f"{', '.join(sorted(ARCHS))} (for others, llama.cpp's convert_hf_to_gguf.py on a kaika merge output)"
        )
    problem = arch.problem(config)
    if problem:
        raise KaikaError(
            f"GGUF export: this {model_type} model has {problem}; llama.cpp would run it differently"
        )
    return arch


# --------------------------------------------------------------------------- tokenizer


# Pre-tokenizer split patterns (a tokenizers Split before a regex-free ByteLevel) → llama.cpp's name.
SPLIT_PRE = {
    " ?[^(\\s|[.,!?…。，、।۔،])]+": "bloom",
    " ?[^(\\s|.,!?…。，、।۔،)]+": "bloom",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
}


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool | None = None


def byte_level_pre(spec: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenization, or a refusal."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        if spec.get("add_prefix_space"):
            raise KaikaError(
                "GGUF export: a byte-level tokenizer that adds a prefix space has no llama.cpp equivalent"
            )
        return "gpt-2"  # GPT-2's own split: what ByteLevel(use_regex=True) applies
    parts = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    if (
        len(parts) == 2
        and parts[0].get("type") == "Split"
        and parts[1].get("type") == "ByteLevel"
        and not parts[1].get("use_regex", True)
    ):
        pattern = parts[0].get("pattern", {}).get("Regex")
        if pattern in SPLIT_PRE:
            return SPLIT_PRE[pattern]
    raise KaikaError(
        f"GGUF export: the tokenizer's pre-tokenization ({json.dumps(spec)[:200]}) is not one kaika can "
        f"name for llama.cpp (it knows gpt-2 and {', '.join(sorted(set(SPLIT_PRE.values())))})"
    )


def adds_space_prefix(spec: dict) -> bool:
    """SentencePiece's dummy prefix: a normalizer that prepends ▁, or a Metaspace that does."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "▁":
                found.append(True)
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
                found.append(True)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return bool(found)


def tokenizer_vocab(tokenizer, vocab_size: int) -> Vocab:
    """The tokenizer as GGUF holds it, ``vocab_size`` entries (the embedding's rows; ids the tokenizer
    does not use are named ``[PAD<id>]`` and marked unused, as llama.cpp's converter does)."""
    gguf = _gguf()
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise KaikaError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')}")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if max(by_id) >= vocab_size:
        raise KaikaError(
            f"GGUF export: the tokenizer has ids up to {max(by_id)} but the model's embedding has {vocab_size} rows"
        )
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    merges = [" ".join(p) for p in pairs]
    spm = bool(model.get("byte_fallback"))
    special = set(getattr(tokenizer, "all_special_ids", []))
    tokens, types, scores = [], [], []
    merge_rank = {}
    if spm:  # llama.cpp merges the pair whose result scores highest: the earlier merge, the higher
        for rank, pair in enumerate(pairs):
            merge_rank.setdefault("".join(pair), rank)
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-10000.0)
            continue
        tokens.append(text)
        if i in special and i not in added:  # a special token of the model's own vocabulary
            types.append(gguf.TokenType.CONTROL)
            scores.append(-1000.0)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
            scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL)
            scores.append(-float(merge_rank.get(text, len(merges) + i)))
    twice = sorted(t for t, count in Counter(tokens).items() if count > 1)
    if twice:  # llama.cpp refuses a vocabulary with a token twice
        raise KaikaError(f"GGUF export: the tokenizer has tokens twice under different ids: {twice[:5]}")
    if spm:
        return Vocab(
            "llama", "default", tokens, types, scores=scores, add_space_prefix=adds_space_prefix(spec)
        )
    return Vocab("gpt2", byte_level_pre(spec.get("pre_tokenizer")), tokens, types, merges=merges)


def added_specials(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS at the start and EOS at the end of what it encodes."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos = tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] != plain[:1]
    eos = tokenizer.eos_token_id is not None and full[-1:] == [tokenizer.eos_token_id] != plain[-1:]
    return bos, eos


def write_tokenizer(
    w, tokenizer, vocab_size: int, chat_template: str | None, end_of_turn: int | None, add_bos: bool | None
) -> Vocab:
    vocab = tokenizer_vocab(tokenizer, vocab_size)
    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    for key, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    if end_of_turn is not None and end_of_turn != tokenizer.eos_token_id:
        w.add_eot_token_id(end_of_turn)  # Gemma's <end_of_turn>, ChatML's <|im_end|>: a stop too
    bos, eos = added_specials(tokenizer)
    w.add_add_bos_token(bos if add_bos is None else add_bos)
    w.add_add_eos_token(eos)
    if chat_template:
        w.add_chat_template(chat_template)
    return vocab


# --------------------------------------------------------------------------- the file


@dataclass
class GgufWritten:
    path: Path
    arch: str
    quant: str
    # What the file holds, in transformers' names and layout (dequantized, float32): the reference a
    # reader of the file must reproduce.
    expected: dict[str, torch.Tensor]
    kept_f16: list[str]  # q8_0 matrices whose rows do not divide into 32-wide blocks
    # The largest relative RMS error the file's rounding put on one matrix, ||w' - w|| / ||w||
    weight_error: float
    tokens: int
    pre: str | None


def gguf_name(names, key: str) -> str | None:
    """llama.cpp's name of transformers tensor ``key`` (with or without its model prefix)."""
    candidates = [key]
    for prefix in ("transformer.", "model.", "language_model.", "model.language_model."):
        if key.startswith(prefix):
            candidates.append(key[len(prefix) :])
    for k in candidates:
        found = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if found:
            return found
    return None


def write_gguf(
    model,
    tokenizer,
    path: Path,
    quant: str,
    *,
    name: str,
    chat_template: str | None = None,
    end_of_turn: int | None = None,
    add_bos: bool | None = None,
    metadata: dict[str, str] | None = None,
) -> GgufWritten:
    """Write ``model`` (float32, no adapter) and ``tokenizer`` to ``path`` as GGUF in ``quant``.
    ``add_bos``: whether llama.cpp adds BOS to what it tokenizes (default: whether the tokenizer does)."""
    gguf = _gguf()
    if quant not in QUANTS:
        raise KaikaError(f"unknown GGUF quant {quant!r}; use {', '.join(QUANTS)}")
    config = model.config
    arch = arch_of(config)
    qtype = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[quant]
    file_type = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[quant]
    model_arch = getattr(gguf.MODEL_ARCH, arch.name)
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    names = gguf.get_tensor_name_map(model_arch, n_layers)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[model_arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    for key, value in (metadata or {}).items():
        getattr(w, f"add_{key}")(value)
    arch.params(w, config)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    vocab = write_tokenizer(w, tokenizer, vocab_rows, chat_template, end_of_turn, add_bos)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected: dict[str, torch.Tensor] = {}
    kept_f16: list[str] = []
    errors: list[float] = []
    for key, tensor in model.state_dict().items():
        if key.endswith(arch.skip) or (tied and key == "lm_head.weight"):
            continue
        target = gguf_name(names, key)
        if target is None:
            raise KaikaError(
                f"GGUF export: no llama.cpp name for tensor {key} of this {config.model_type} model"
            )
        layout = arch.layout(key, config)
        data = layout.to_file(tensor.detach().float().cpu().numpy())
        keep_f32 = data.ndim <= 1 or target.endswith("_norm.weight") or target.startswith("position_embd")
        kind = gguf.GGMLQuantizationType.F32 if keep_f32 else qtype
        try:
            stored = gguf.quants.quantize(data, kind)
        except gguf.QuantError:  # q8_0 on rows that are not a multiple of 32 wide
            kind = gguf.GGMLQuantizationType.F16
            stored = gguf.quants.quantize(data, kind)
            kept_f16.append(target)
        w.add_tensor(target, stored, raw_dtype=kind)
        back = gguf.quants.dequantize(stored, kind).astype(np.float32)
        if not keep_f32:
            errors.append(float(np.linalg.norm(back - data) / max(float(np.linalg.norm(data)), 1e-30)))
        expected[key] = torch.from_numpy(layout.from_file(back))
    if kept_f16:
        log.warning(
            "GGUF %s: %d matrices kept in f16 (rows not a multiple of 32): %s",
            quant,
            len(kept_f16),
            ", ".join(kept_f16[:3]),
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    weight_error = float(np.max(errors)) if errors else 0.0  # NaN, if one matrix went NaN
    return GgufWritten(
        path, arch.name.lower(), quant, expected, kept_f16, weight_error, len(vocab.tokens), vocab.pre
    )
