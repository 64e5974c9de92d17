"""Typed configuration: dataclasses that are at once the YAML schema and the command line.

Every field has a one-line ``help``. A field ``train.epochs`` is set by ``epochs:`` under
``train:`` in YAML, by ``--epochs`` and by ``--train.epochs`` on the command line. Sections
listed in ``FLAG_PREFIX`` put a prefix on their short flags (``lora.r`` → ``--lora-r``), so
that the flags users of the alpaca-lora recipe know keep their names.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kaika.errors import KaikaError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    """Which base model to load and how."""

    base_model: str = _f(
        "tiny-bloom-ja",
        "Base model: a hub id (bigscience/bloom-1b1), a local directory, a .gguf file, "
        "or a builtin name (bloom-ja-tiny, tiny-bloom-ja).",
    )
    gguf_file: str | None = _f(
        None, "GGUF file name inside base_model when base_model is a directory or hub id."
    )
    dtype: str = _f(
        "auto",
        "Weights dtype: auto (bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU), "
        "float32, bfloat16 or float16.",
    )
    quantization: str = _f(
        "none", "Load the base quantized with bitsandbytes: none, 8bit or 4bit (CUDA only)."
    )
    trust_remote_code: bool = _f(False, "Allow model code from the hub (only for models you trust).")
    attention: str = _f(
        "sdpa",
        "BLOOM attention: sdpa (PyTorch's fused kernel with ALiBi as an additive bias; far less "
        "memory in training) or eager (transformers' own). Other models use transformers' default.",
    )


@dataclass
class DataArgs:
    """Instruction data, prompt template and tokenization."""

    data: list[str] = _f(
        [], "Training data: Alpaca JSON/JSONL files, local dataset dirs or hub dataset names."
    )
    val_data: list[str] = _f([], "Separate validation data (same forms as data); overrides val_set_size.")
    val_set_size: float = _f(
        0.0, "Validation split taken from data: a count (>= 1) or a fraction (< 1); 0 for none."
    )
    columns: dict[str, str] = _f(
        {},
        "Column mapping for data whose keys differ, e.g. instruction=instruction input=context output=response.",
    )
    template: str = _f(
        "alpaca_ja", "Prompt template: a builtin name (alpaca, alpaca_ja) or a path to a template JSON."
    )
    cutoff_len: int = _f(512, "Maximum tokens per example; longer responses are truncated (EOS kept).")
    packing: bool = _f(
        False,
        "Pack several whole examples into each row of up to cutoff_len tokens, attention kept inside "
        "each example (on BLOOM, ALiBi restarts per example): almost no padding. batch_size and "
        "micro_batch_size then count rows, not examples.",
    )
    train_on_inputs: bool = _f(
        False, "Also train on the prompt tokens (default: only the response is supervised)."
    )


@dataclass
class LoraArgs:
    """LoRA adapter shape (peft)."""

    r: int = _f(8, "LoRA rank.")
    alpha: int = _f(16, "LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target: list[str] = _f(
        ["auto"],
        "Modules to adapt: auto (per-architecture table), all-linear, or module names (query_key_value, q_proj…).",
    )
    bias: str = _f("none", "Which biases to train: none, all or lora_only.")
    qkv: list[str] = _f(
        ["fused"],
        "Fused q/k/v projections (BLOOM query_key_value, GPT-2 c_attn, GPT-NeoX): fused (one LoRA "
        "shared by q, k and v) or the slices to adapt, each with its own rank-r LoRA, e.g. q,v.",
    )


@dataclass
class TrainArgs:
    """Optimisation, checkpoints and output."""

    output_dir: str = _f("runs/kaika-lora", "Where the adapter, config, logs and report are written.")
    epochs: float = _f(3.0, "Training epochs (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: use epochs).")
    lr: float = _f(3e-4, "Peak learning rate.")
    scheduler: str = _f("linear", "Learning-rate schedule (transformers' names: linear, cosine, constant…).")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    batch_size: int = _f(128, "Global batch size in examples per optimizer step (all processes together).")
    micro_batch_size: int = _f(4, "Examples per forward pass per process; gradient accumulation is derived.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    seed: int = _f(42, "Seed for data split, data order, LoRA init and dropout.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    eval_steps: int = _f(200, "Evaluate on the validation set every N steps (and at the end).")
    save_steps: int = _f(200, "Write a resumable checkpoint every N steps.")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints.")
    logging_steps: int = _f(10, "Log loss, learning rate and tokens/s every N steps.")
    resume: bool = _f(False, "Resume from the latest checkpoint in output_dir.")
    overwrite: bool = _f(False, "Allow writing into a non-empty output_dir (its old files are replaced).")
    verify: bool = _f(
        True, "After saving, reload the adapter from disk and check it reproduces the trained model."
    )
    fast_loss: bool = _f(
        True,
        "Compute output logits only where a label is, a chunk at a time (same loss and gradients, far "
        "less memory and time with large vocabularies); off: the model's own full-logits loss.",
    )
    group_by_length: bool = _f(
        True,
        "Batch examples of similar length together (less padding, faster); off: uniformly shuffled batches.",
    )


@dataclass
class GenerateArgs:
    """Decoding options."""

    max_new_tokens: int = _f(256, "Maximum tokens to generate.")
    temperature: float = _f(0.0, "Sampling temperature; 0 means greedy decoding.")
    top_p: float = _f(1.0, "Nucleus sampling: keep the smallest set of tokens with this probability mass.")
    top_k: int = _f(50, "Sample only from the k most likely tokens (0: no limit).")
    repetition_penalty: float = _f(1.0, "Penalty > 1 discourages repeating tokens.")
    num_beams: int = _f(1, "Beam search width (1: no beam search).")
    seed: int = _f(42, "Seed for sampling.")
    batch_size: int = _f(8, "Prompts per batch in --file mode.")


@dataclass
class TrainConfig:
    """Everything ``kaika train`` needs; saved as ``kaika_config.yaml`` next to the adapter."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)


@dataclass
class PretrainArgs:
    """Raw text, packing, and what ``kaika pretrain`` trains."""

    data: list[str] = _f(
        [],
        "Training text: UTF-8 .txt files (one document each), directories of .txt/.jsonl files, "
        "JSON/JSONL with a text field, local dataset dirs or hub dataset names.",
    )
    val_data: list[str] = _f([], "Held-out text (same forms as data); overrides val_set_size.")
    val_set_size: float = _f(
        0.0, "Held-out documents taken from data: a count (>= 1) or a fraction (< 1); 0 for none."
    )
    text_field: str = _f("text", "Field that holds the text in JSON/JSONL records and datasets.")
    cutoff_len: int = _f(
        1024, "Tokens per packed row; documents are packed into full rows, EOS between them."
    )
    packing: str = _f(
        "document",
        "document: attention stays inside each document (block-diagonal causal mask; on BLOOM, ALiBi "
        "restarts per document); stream: continuous-stream training, documents separated by EOS only.",
    )
    full: bool = _f(
        False, "Train every weight and save a full model (safetensors) instead of a LoRA adapter."
    )
    from_scratch: str | None = _f(
        None,
        "Build a new model from an architecture config instead of loading base_model: a JSON/YAML file "
        "of config fields (model_type defaults to bloom) or a directory with config.json. Implies full.",
    )
    tokenizer: str | None = _f(
        None,
        "With from_scratch: the tokenizer to use (a directory or hub id); default: train a byte-level "
        "BPE tokenizer on the training text.",
    )
    vocab_size: int = _f(8192, "Vocabulary size of a tokenizer trained for from_scratch.")
    save_dtype: str = _f(
        "auto", "dtype of the saved full model: auto (as trained), float16, bfloat16 or float32."
    )


@dataclass
class PretrainConfig:
    """Everything ``kaika pretrain`` needs; saved as ``kaika_pretrain.yaml`` in its output."""

    model: ModelArgs = field(default_factory=ModelArgs)
    pretrain: PretrainArgs = field(default_factory=PretrainArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)


# The resolved config of a run, saved next to its adapter and read back by generate.
CONFIG_FILE = "kaika_config.yaml"

# Short-flag prefixes per section; sections not listed use the bare field name.
FLAG_PREFIX = {"lora": "lora-"}


# --------------------------------------------------------------------------- dict <-> dataclass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a KaikaError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise KaikaError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if isinstance(value, list | tuple):  # from the CLI: ["key=value", ...]
            pairs = {}
            for v in value:
                if "=" not in str(v):
                    raise KaikaError(f"{where}: expected key=value, got {v!r}")
                k, _, val = str(v).partition("=")
                pairs[k.strip()] = val.strip()
            return pairs
        if not isinstance(value, dict):
            raise KaikaError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise KaikaError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float, str):
        if isinstance(value, bool) and tp is not str:  # YAML `r: true` is a mistake, not 1
            raise KaikaError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise KaikaError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    raise TypeError(f"unsupported config type {tp}")


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from nested dicts, checking every key and value."""
    if not isinstance(data, dict):
        raise KaikaError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KaikaError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}")
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise KaikaError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise KaikaError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise KaikaError(f"{path}: the top level must be a mapping of sections (model, data, lora, train)")
    return data


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(
        yaml.safe_dump(dataclasses.asdict(obj), allow_unicode=True, sort_keys=False), encoding="utf-8"
    )


def load_train_config(path: str | Path) -> TrainConfig:
    return from_dict(TrainConfig, load_yaml(path), where=str(path))


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------- argparse


def _flags(section: str | None, name: str) -> list[str]:
    short = "--" + (FLAG_PREFIX.get(section or "", "") + name).replace("_", "-")
    return [short] if section is None else [short, f"--{section}.{name}"]


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, section: str | None = None) -> None:
    """Add one option per field of ``cls``; unset options stay absent from the namespace."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(section or cls.__name__, (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        dest = f"{section}.{f.name}" if section else f.name
        kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, dict):
            kw["nargs"] = "+"
            kw["metavar"] = "KEY=VALUE" if typing.get_origin(tp) is dict else "VALUE"
        else:
            kw["metavar"] = f.name.upper()
        group.add_argument(*_flags(section, f.name), **kw)


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add the options of every section (a dataclass-typed field) of ``cls``."""
    for f in dataclasses.fields(cls):
        add_dataclass_args(parser, typing.get_type_hints(cls)[f.name], f.name)


def namespace_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """Nested dict of the dotted options the user actually gave."""
    out: dict[str, Any] = {}
    for key, value in vars(ns).items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def resolve_train_config(config_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < YAML file < command-line overrides."""
    data = load_yaml(config_path) if config_path else {}
    return from_dict(TrainConfig, deep_update(data, overrides), where=config_path or "options")
