"""Typed configuration: dataclasses that are at once the YAML schema and the command line.

Every field has a one-line ``help``. A field ``train.epochs`` is set by ``epochs:`` under
``train:`` in YAML, by ``--epochs`` and by ``--train.epochs`` on the command line
(:mod:`kaika.cli.options` builds the options from these classes).

Choices are types (``Literal``) and numeric bounds are field metadata: both are checked when a
config object is built (``__post_init__``), so a typo in ``--attention`` or ``--lr -1`` fails
before any data is read or any model is loaded. :func:`check` runs the same rules again on an
object whose fields were assigned after it was built (the Python API allows that).
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kaika.errors import KaikaError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "8bit", "4bit"]
Attention = Literal["sdpa", "eager"]
LoraBias = Literal["none", "all", "lora_only"]
LoraVariant = Literal["lora", "dora", "rslora"]
LoraInit = Literal["default", "pissa", "olora", "gaussian"]
# transformers' schedules that need no extra arguments (cosine_with_min_lr, warmup_stable_decay and
# reduce_lr_on_plateau do); tests/test_config.py builds each one.
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]
Packing = Literal["document", "stream"]
TrainOn = Literal["assistant", "last", "all"]
Truncation = Literal["turns", "drop"]
SaveDtype = Literal["auto", "float32", "float16", "bfloat16"]
PreferenceLoss = Literal["dpo", "ipo", "orpo", "simpo", "kto"]
ReportTo = Literal["none", "tensorboard", "wandb", "mlflow"]


def option(
    default: Any,
    help: str,
    flag: str | None = None,
    *,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    required: bool = False,
    **bounds: float,
) -> Any:
    """A config field: its default, its one-line help, and optional bounds checked when the config
    is built: ``ge``/``gt`` (at least / more than), ``le``/``lt`` (at most / less than), ``ne`` (not).
    ``flag`` names its command-line option when the field's name cannot (``--from``), ``aliases`` adds
    others (``-o``); ``required``: the command cannot run without it."""
    extra = {"flag": flag, "aliases": aliases, "metavar": metavar, "required": required}
    meta = {"help": help, **bounds, **{k: v for k, v in extra.items() if v}}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def choices(tp: Any) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal`` type (inside ``X | None`` or ``list[X]`` too), else None."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(tp):
            found = choices(arg)
            if found:
                return found
    return None


BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
          "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b),
          "ne": ("!=", lambda v, b: v != b)}  # fmt: skip


def check_value(value: Any, f: dataclasses.Field, tp: Any, where: str) -> None:
    allowed = choices(tp)
    if allowed is not None:
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in allowed:
                raise KaikaError(f"{where}: {v!r} is not one of {', '.join(allowed)}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise KaikaError(f"{where}: expected a finite number, got {value!r}")
        for key, (sign, ok) in BOUNDS.items():
            if key in f.metadata and not ok(value, f.metadata[key]):
                raise KaikaError(f"{where}: must be {sign} {f.metadata[key]:g}, got {value!r}")


def check(obj: Any, where: str | None = None) -> None:
    """Check every choice and bound of the dataclass ``obj`` and of its sections."""
    where = where or type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{where}.{f.name}")
        else:
            check_value(value, f, hints[f.name], f"{where}.{f.name}")


class Checked:
    """Base of every config dataclass: its choices and bounds are checked once it is built."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if not dataclasses.is_dataclass(value):
                check_value(value, f, hints[f.name], f"{type(self).__name__}.{f.name}")


@dataclass
class ModelArgs(Checked):
    """Which base model to load and how."""

    base_model: str = option(
        "tiny-bloom-ja",
        "Base model: a hub id (bigscience/bloom-1b1), a local directory, a .gguf file, "
        "or a builtin name (gemma-3-270m, bloom-ja-tiny, tiny-bloom-ja).",
    )
    gguf_file: str | None = option(
        None, "GGUF file name inside base_model when base_model is a directory or hub id."
    )
    dtype: Dtype = option(
        "auto",
        "Weights dtype: auto (bf16 on GPUs that support it, else fp16 on GPU; on a CPU bf16 where it "
        "computes bf16 natively, else fp32; LoRA weights stay fp32), "
        "float32, bfloat16 or float16.",
    )
    quantization: Quantization = option(
        "none",
        "Load the base quantized with bitsandbytes, on a GPU or the CPU: none, 8bit (LLM.int8) or 4bit "
        "(QLoRA's NF4 with double quantization, computing in --dtype). LoRA weights stay float32.",
    )
    trust_remote_code: bool = option(False, "Allow model code from the hub (only for models you trust).")
    attention: Attention = option(
        "sdpa",
        "BLOOM attention: sdpa (PyTorch's fused kernel with ALiBi as an additive bias; far less "
        "memory in training) or eager (transformers' own). Other models use transformers' default.",
    )


@dataclass
class DataArgs(Checked):
    """Instruction data, prompt template and tokenization."""

    data: list[str] = option(
        [],
        "Training data: JSON/JSONL files, local dataset dirs or hub dataset names, of Alpaca records, "
        "conversations (messages: [{role, content}]) or ShareGPT (conversations: [{from, value}]), mixed freely.",
    )
    val_data: list[str] = option([], "Separate validation data (same forms as data); overrides val_set_size.")
    val_set_size: float = option(
        0.0, "Validation split taken from data: a count (>= 1) or a fraction (< 1); 0 for none.", ge=0
    )
    columns: dict[str, str] = option(
        {},
        "Column mapping for data whose keys differ, e.g. input=context output=response, or for "
        "conversations messages=dialogue role=speaker content=text.",
    )
    template: str = option(
        "auto",
        "Prompt template: auto (the base model's chat template for conversation data when it has one, "
        "else alpaca_ja), chat (the base model's chat template), a builtin (alpaca_ja, alpaca), a "
        "template JSON file or a Jinja chat template file (.jinja).",
    )
    cutoff_len: int = option(
        512, "Maximum tokens per example; longer responses are truncated (EOS kept).", ge=2
    )
    packing: bool = option(
        False,
        "Pack several whole examples into each row of up to cutoff_len tokens, attention kept inside "
        "each example (on BLOOM, ALiBi restarts per example): almost no padding. batch_size and "
        "micro_batch_size then count rows, not examples.",
    )
    train_on: TrainOn = option(
        "assistant",
        "Tokens the loss is computed on: assistant (every answer, its EOS/end-of-turn included), last "
        "(only the last answer of each conversation) or all (prompts too).",
    )
    train_on_inputs: bool = option(False, "Also train on the prompt tokens: the same as --train-on all.")
    truncation: Truncation = option(
        "turns",
        "An example over cutoff_len: turns (a conversation keeps its system prompt and leaves out its "
        "oldest exchanges; the last answer is cut, EOS kept) or drop (left out of training).",
    )


@dataclass
class LoraArgs(Checked):
    """LoRA adapter shape (peft)."""

    r: int = option(8, "LoRA rank.", ge=1)
    alpha: int = option(16, "LoRA alpha (the update is scaled by alpha / r).", gt=0)
    dropout: float = option(0.05, "Dropout on the LoRA input.", ge=0, lt=1)
    target: list[str] = option(
        ["auto"],
        "Modules to adapt: auto (per-architecture table), all-linear, or module names (query_key_value, q_proj…).",
    )
    bias: LoraBias = option("none", "Which biases to train: none, all or lora_only.")
    qkv: list[str] = option(
        ["fused"],
        "Fused q/k/v projections (BLOOM query_key_value, GPT-2 c_attn, GPT-NeoX): fused (one LoRA "
        "shared by q, k and v) or the slices to adapt, each with its own rank-r LoRA, e.g. q,v.",
    )
    variant: LoraVariant = option(
        "lora",
        "lora (update scaled by alpha / r), rslora (scaled by alpha / sqrt(r): steadier at high rank) or "
        "dora (weight-decomposed: a trained magnitude per output row; slower steps).",
    )
    init: LoraInit = option(
        "default",
        "How the adapter starts (peft's init_lora_weights): default (A random, B zero), gaussian, pissa (the "
        "base's top-r singular vectors; the base keeps the residual) or olora (from a QR of the base). "
        "pissa/olora adapters are saved converted to a plain LoRA of rank 2r on the unmodified base.",
    )
    loraplus_lr_ratio: float = option(
        0.0,
        "LoRA+: train LoRA B (and DoRA magnitudes) at this multiple of --lr, A at --lr (the LoRA+ paper "
        "suggests 16); 0: off.",
        flag="--loraplus-lr-ratio",
        ge=0,
    )


@dataclass
class TrainArgs(Checked):
    """Optimisation, checkpoints and output."""

    output_dir: str = option("runs/kaika-lora", "Where the adapter, config, logs and report are written.")
    epochs: float = option(3.0, "Training epochs (ignored when max_steps > 0).", gt=0)
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: use epochs).", ge=-1, ne=0)
    lr: float = option(3e-4, "Peak learning rate.", gt=0)
    scheduler: Scheduler = option("linear", "Learning-rate schedule (transformers' names).")
    warmup_steps: int = option(0, "Linear warm-up steps.", ge=0)
    batch_size: int = option(
        128, "Global batch size in examples per optimizer step (all processes together).", ge=1
    )
    micro_batch_size: int = option(
        4, "Examples per forward pass per process; gradient accumulation is derived.", ge=1
    )
    weight_decay: float = option(0.0, "AdamW weight decay.", ge=0)
    seed: int = option(42, "Seed for data split, data order, LoRA init and dropout.", ge=0, lt=2**32)
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    eval_steps: int = option(200, "Evaluate on the validation set every N steps (and at the end).", ge=1)
    save_steps: int = option(200, "Write a resumable checkpoint every N steps.", ge=1)
    save_total_limit: int = option(2, "Keep at most this many checkpoints.", ge=1)
    logging_steps: int = option(10, "Log loss, learning rate and tokens/s every N steps.", ge=1)
    resume: bool = option(False, "Resume from the latest checkpoint in output_dir.")
    overwrite: bool = option(False, "Allow writing into a non-empty output_dir (its old files are replaced).")
    verify: bool = option(
        True, "After saving, reload the adapter from disk and check it reproduces the trained model."
    )
    fast_loss: bool = option(
        True,
        "Compute output logits only where a label is, a chunk at a time (same loss and gradients, far "
        "less memory and time with large vocabularies); off: the model's own full-logits loss.",
    )
    group_by_length: bool = option(
        True,
        "Batch examples of similar length together (less padding, faster); off: uniformly shuffled batches.",
    )
    report_to: ReportTo = option(
        "none",
        "Also send the training log (loss, eval loss, lr, tokens/s) to a tracker: tensorboard (event files in "
        "OUTPUT_DIR/tensorboard), wandb or mlflow (set up by their own WANDB_* / MLFLOW_* environment variables, "
        "offline modes included). trainer_log.jsonl is always written.",
    )


@dataclass
class GenerateArgs(Checked):
    """Decoding options."""

    max_new_tokens: int = option(256, "Maximum tokens to generate.", ge=1)
    temperature: float = option(0.0, "Sampling temperature; 0 means greedy decoding.", ge=0)
    top_p: float = option(
        1.0, "Nucleus sampling: keep the smallest set of tokens with this probability mass.", gt=0, le=1
    )
    top_k: int = option(50, "Sample only from the k most likely tokens (0: no limit).", ge=0)
    repetition_penalty: float = option(1.0, "Penalty > 1 discourages repeating tokens.", gt=0)
    num_beams: int = option(1, "Beam search width (1: no beam search).", ge=1)
    seed: int = option(42, "Seed for sampling.", ge=0, lt=2**32)
    batch_size: int = option(8, "Prompts per batch in --file mode.", ge=1)


GgufQuant = Literal["f16", "bf16", "q8_0"]  # kaika.modeling.to_gguf.QUANTS (tests/test_config.py: the same)
MergeDtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class ServeOptions(Checked):
    """kaika serve: where it listens and what a request may ask for."""

    base_name: str | None = option(
        None, "Model name of the base model in requests (default: its directory or hub name)"
    )
    host: str = option("127.0.0.1", "Address to listen on (default: this machine only)")
    port: int = option(8000, "Port to listen on", ge=1, le=65535)
    api_key: str | None = option(
        None, "Require 'Authorization: Bearer KEY' (default: $KAIKA_API_KEY; unset: no auth)"
    )
    queue_size: int = option(8, "Requests that may wait while one generates; more get 429", ge=0)
    max_tokens_limit: int = option(2048, "Largest max_tokens a request may ask for", ge=1)
    context_length: int | None = option(None, "Bound on prompt + max_tokens (default: from the model)", ge=2)
    max_body_bytes: int = option(
        4 * 1024 * 1024, "Larger request bodies get 413 (a 128k-token prompt is about 0.5 MB)", ge=1024
    )
    defaults: GenerateArgs = field(default_factory=GenerateArgs)  # for what a request leaves out


@dataclass
class MergeOptions(Checked):
    """kaika merge: the merged checkpoint's form."""

    base_model: str | None = option(None, "Use this base model instead of the one saved with the adapter")
    dtype: MergeDtype = option(
        "float32", "dtype of the written weights; merging itself is always done in float32"
    )
    max_shard_size: str = option("2GB", "Split the weights into safetensors files of at most this size")
    force: bool = option(False, "Replace OUT_DIR if it is not empty (only what kaika wrote)")


@dataclass
class ExportOptions(Checked):
    """kaika export: the file for llama.cpp and Ollama."""

    format: Literal["gguf"] = option("gguf", "Output format")
    quant: GgufQuant = option(
        "f16",
        "Type of the weight matrices (norms and biases stay float32); q8_0: 8-bit blocks, about half of f16's size",
    )
    ollama: bool = option(False, "Also write an Ollama Modelfile (FROM, TEMPLATE, stops)")
    base_model: str | None = option(None, "Use this base model instead of the one saved with the adapter")
    force: bool = option(False, "Replace OUT_DIR if it is not empty (only what kaika wrote)")


# --------------------------------------------------------------------------- the other commands' options
# Each command's options, declared once: the generator of kaika.cli.options makes the flags (with
# these names, helps, choices and bounds), and a value is checked when it is parsed.


@dataclass
class InferenceArgs(Checked):
    """What overrides a run directory's saved choices."""

    base_model: str | None = option(None, "Use this base model instead of the one saved with the adapter")
    dtype: Dtype | None = option(None, "Override the dtype saved with the adapter")
    template: str | None = option(
        None,
        "Prompt template: alpaca_ja, alpaca, chat (the model's chat template), a JSON or .jinja path; "
        "default: the one saved with the run",
    )


@dataclass
class GenerateOptions(Checked):
    """kaika generate: one instruction, or a file of them"""

    input: str = option("", "Optional input / context (入力)")
    file: str | None = option(None, "JSONL of {instruction, input?} records to answer in batches")
    output: str | None = option(None, "Where --file mode writes its answers (JSONL); default: stdout")
    base_only: bool = option(False, "Generate with the base model alone, to compare")
    stream: bool | None = option(None, "Print tokens as they come (default: when writing to a terminal)")


@dataclass
class ChatOptions(Checked):
    """kaika chat"""

    system: str = option("", "Context given with every turn (the template's input / 入力)")


@dataclass
class WebuiOptions(Checked):
    """kaika webui: where the page listens."""

    host: str = option("127.0.0.1", "Address to listen on (default: this machine only)")
    port: int = option(7860, "Port to listen on", ge=1, le=65535)
    lang: Literal["en", "ja"] = option("en", "Language of the page")


@dataclass
class EvalLossOptions(Checked):
    """kaika eval loss"""

    data: str = option(None, "Held-out instruction data (Alpaca JSON/JSONL, dataset)", required=True)
    json_path: str | None = option(None, "Also write the results as JSON to this file", flag="--json")
    batch_size: int = option(4, "Examples per forward pass", ge=1)
    columns: dict[str, str] = option({}, "Column mapping, as for kaika train --columns")


@dataclass
class EvalGenerateOptions(Checked):
    """kaika eval generate"""

    tasks: str = option(
        None,
        "Tasks: Alpaca JSON/JSONL (output = reference) or ELYZA-tasks-100 CSV/JSONL (input, output, "
        "eval_aspect), or a builtin (elyza-tasks-100, seed-tasks-ja)",
        required=True,
    )
    output_dir: str | None = option(
        None, "Where answers and summary go (default: ADAPTER/eval/<tasks file name>)"
    )
    base_also: bool = option(True, "Also answer with the base model (adapter switched off) to compare")
    limit: int | None = option(None, "Only the first N tasks", ge=1)
    show: int = option(0, "Print the first N answers side by side", ge=0, metavar="N")


@dataclass
class EvalChoiceOptions(Checked):
    """kaika eval choice"""

    tasks: str = option(
        None,
        "A builtin task set (jcommonsenseqa, jnli: JGLUE v1.3 validation) or a JSONL file of "
        '{"question", "choices": [...], "answer": index or choice text} records',
        required=True,
    )
    output_dir: str | None = option(None, "Where scores and summary go (default: ADAPTER/eval/<task set>)")
    base_also: bool = option(True, "Also score the base model (adapter switched off) to compare")
    limit: int | None = option(None, "Only the first N items", ge=1)


@dataclass
class MTBenchOptions(Checked):
    """kaika eval mt-bench"""

    output_dir: str | None = option(
        None, "Where answers, judgments and summary go (default: ADAPTER/eval/ja-mt-bench)"
    )
    base_also: bool = option(True, "Also answer with the base model (adapter switched off) to compare")
    limit: int | None = option(None, "Only the first N questions", ge=1)
    categories: list[str] = option(
        [], "Only these categories (coding, extraction, humanities, math, reasoning, roleplay, stem, writing)"
    )


@dataclass
class SuiteOptions(Checked):
    """kaika eval suite"""

    suite: str = option("ja-standard", "The suite to run (ja-standard, ja-quick, quickstart)")
    output_dir: str | None = option(
        None, "Where the suite's results and report go (default: ADAPTER/eval/suite-<suite>)"
    )
    limit: int | None = option(None, "At most N items per task set (the suite's own limits apply too)", ge=1)
    show: int = option(0, "Print the first N generated answers side by side", ge=0, metavar="N")


@dataclass
class PairsOptions(Checked):
    """kaika dpo pairs: preference pairs from a run's own sampled answers."""

    tasks: str = option(
        None,
        "Tasks with reference answers: Alpaca (instruction, input, output) or ELYZA (input, output) "
        "JSON/JSONL/CSV, or a builtin (seed-tasks-ja, elyza-tasks-100: keep evaluation tasks out of training)",
        required=True,
    )
    output: str = option(None, "The pairs file to write (JSONL)", aliases=("-o",), required=True)
    samples: int = option(4, "Answers sampled per task", ge=1)
    score: Literal["metrics", "judge"] = option(
        "metrics",
        "metrics: stopped, then chrF against the reference, then less repetition; judge: the LLM judge's "
        "1-5 score",
    )
    chosen: Literal["best", "reference"] = option(
        "best", "best: the best-scored answer; reference: the task's reference answer"
    )
    limit: int | None = option(None, "Only the first N tasks", ge=1)


@dataclass
class CompareOptions(Checked):
    """kaika eval compare"""

    output_dir: str = option("kaika-compare", "Where the report goes")


@dataclass
class ConvertOptions(Checked):
    """kaika data convert"""

    to: Literal["messages", "sharegpt", "alpaca"] = option(None, "The format to write", required=True)
    output: str = option(None, "The JSON Lines file to write", aliases=("-o",), required=True)
    columns: dict[str, str] = option({}, "Column mapping, as in train")
    strict: bool = option(False, "--to alpaca: refuse if any conversation has no Alpaca form")
    overwrite: bool = option(False, "Replace an existing output file")


@dataclass
class StatsOptions(Checked):
    """kaika data stats"""

    columns: dict[str, str] = option({}, "Column mapping, as in train")
    template: str = option(DataArgs().template, "Prompt template for token counts, as in train")
    cutoff_len: int = option(DataArgs().cutoff_len, "cutoff_len to measure against, as in train", ge=2)
    json: str | None = option(None, "Also write the report as JSON to this path")
    model: list[str] = option([ModelArgs().base_model], "Tokenizers to compare", metavar="MODEL")
    plot: str | None = option(None, "Write a histogram of example lengths in tokens", metavar="PNG")


@dataclass
class TrainConfig(Checked):
    """Everything ``kaika train`` needs; saved as ``kaika_config.yaml`` next to the adapter."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)


@dataclass
class PretrainArgs(Checked):
    """Raw text, packing, and what ``kaika pretrain`` trains."""

    data: list[str] = option(
        [],
        "Training text: UTF-8 .txt files (one document each), directories of .txt/.jsonl files, "
        "JSON/JSONL with a text field, local dataset dirs or hub dataset names.",
    )
    val_data: list[str] = option([], "Held-out text (same forms as data); overrides val_set_size.")
    val_set_size: float = option(
        0.0, "Held-out documents taken from data: a count (>= 1) or a fraction (< 1); 0 for none.", ge=0
    )
    text_field: str = option("text", "Field that holds the text in JSON/JSONL records and datasets.")
    cutoff_len: int = option(
        1024, "Tokens per packed row; documents are packed into full rows, EOS between them.", ge=2
    )
    packing: Packing = option(
        "document",
        "document: attention stays inside each document (block-diagonal causal mask; on BLOOM, ALiBi "
        "restarts per document); stream: continuous-stream training, documents separated by EOS only.",
    )
    full: bool = option(
        False, "Train every weight and save a full model (safetensors) instead of a LoRA adapter."
    )
    from_scratch: str | None = option(
        None,
        "Build a new model from an architecture config instead of loading base_model: a JSON/YAML file "
        "of config fields (model_type defaults to bloom) or a directory with config.json. Implies full.",
    )
    tokenizer: str | None = option(
        None,
        "With from_scratch: the tokenizer to use (a directory or hub id); default: train a byte-level "
        "BPE tokenizer on the training text.",
    )
    vocab_size: int = option(8192, "Vocabulary size of a tokenizer trained for from_scratch.", ge=8)
    save_dtype: SaveDtype = option(
        "auto", "dtype of the saved full model: auto (as trained), float16, bfloat16 or float32."
    )


@dataclass
class PretrainConfig(Checked):
    """Everything ``kaika pretrain`` needs; saved as ``kaika_pretrain.yaml`` in its output."""

    model: ModelArgs = field(default_factory=ModelArgs)
    pretrain: PretrainArgs = field(default_factory=PretrainArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)


@dataclass
class PreferenceDataArgs(Checked):
    """Preference pairs, prompt template and tokenization."""

    data: list[str] = option(
        [],
        "Preference pairs: JSON/JSONL files, dataset dirs, hub names or a builtin (seed-prefs-ja), with "
        "prompt (or instruction/input, or messages ending with a user turn), chosen and rejected; for --loss "
        "kto also single answers: completion and a boolean label (builtin seed-kto-ja).",
    )
    val_data: list[str] = option(
        [], "Separate validation pairs (same forms as data); overrides val_set_size."
    )
    val_set_size: float = option(
        0.0, "Validation pairs taken from data: a count (>= 1) or a fraction (< 1); 0 for none.", ge=0
    )
    columns: dict[str, str] = option(
        {}, "Column mapping for data whose keys differ, e.g. chosen=better rejected=worse prompt=question."
    )
    template: str = option(
        "auto",
        "Prompt template: auto (with --from, the SFT run's; else the base model's chat template for "
        "conversation prompts when it has one, else alpaca_ja), chat, a builtin, a JSON or .jinja file.",
    )
    cutoff_len: int = option(
        512, "Maximum tokens of prompt + answer; longer answers are cut (end of turn kept).", ge=2
    )


@dataclass
class DpoArgs(Checked):
    """Preference tuning: where it starts, its loss."""

    from_run: str | None = option(
        None,
        "An SFT run (kaika train's output) to continue: its adapter trains on, and a frozen copy of it is "
        "the reference (one base in memory). Without it a fresh adapter trains on the base, the base "
        "(adapter off) as reference. The run's base model, dtype and template are used.",
        flag="--from",
    )
    loss: PreferenceLoss = option(
        "dpo",
        "dpo (sigmoid DPO), ipo (IPO), orpo (odds ratio + NLL, no reference), simpo (length-normalised, "
        "no reference) or kto (single answers marked good or bad: completion + label; pairs are split); "
        "TRL's implementations.",
    )
    beta: float | None = option(
        None,
        "dpo/ipo/kto: how far from the reference (higher: closer; IPO's tau); orpo: the odds-ratio weight "
        "(lambda); simpo: the reward scale. Default: 0.1, and 2.0 for simpo.",
        gt=0,
    )
    simpo_gamma: float = option(0.5, "simpo: the target reward margin (gamma).", ge=0)
    desirable_weight: float = option(
        1.0, "kto: weight of the desirable (label true) answers' loss; raise it when they are fewer.", gt=0
    )
    undesirable_weight: float = option(
        1.0, "kto: weight of the undesirable (label false) answers' loss; raise it when they are fewer.", gt=0
    )
    precompute_ref: bool = option(
        False,
        "dpo/ipo/kto: compute the reference log-probabilities of every pair once before training, instead "
        "of a reference forward pass per step (less memory and time per step; the reference is frozen).",
    )


DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}


def dpo_train_args() -> TrainArgs:
    """Preference tuning's defaults: a smaller learning rate, batch and epoch count than SFT's."""
    return TrainArgs(
        output_dir="runs/kaika-dpo", epochs=1.0, lr=5e-5, batch_size=16, micro_batch_size=2, eval_steps=50
    )


@dataclass
class DpoConfig(Checked):
    """Everything ``kaika dpo`` needs; saved as ``kaika_dpo.yaml`` next to the adapter."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: PreferenceDataArgs = field(default_factory=PreferenceDataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=dpo_train_args)
    dpo: DpoArgs = field(default_factory=DpoArgs)

    @property
    def beta(self) -> float:
        return self.dpo.beta if self.dpo.beta is not None else DEFAULT_BETA[self.dpo.loss]


def section_defaults(cls: type) -> dict[str, Any]:
    """Each section's default object (a config may default a section differently from its class)."""
    return {
        f.name: f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(cls)
        if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
    }


# --------------------------------------------------------------------------- dict <-> dataclass


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a KaikaError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else coerce(value, args[0], where)
    if value is None:  # an empty YAML value: not the string "None"
        raise KaikaError(f"{where}: a value is needed (the file leaves it empty)")
    if origin is Literal:  # the choice itself is checked by the dataclass
        return coerce(value, type(typing.get_args(tp)[0]), where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise KaikaError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item, where) for v in value]
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
    """Build dataclass ``cls`` from nested dicts, checking every key, value, choice and bound."""
    if not isinstance(data, dict):
        raise KaikaError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KaikaError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = section_defaults(cls)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value or {}, dict):
                raise KaikaError(f"{where}.{name}: expected a mapping, got {type(value).__name__}")
            base = dataclasses.asdict(defaults[name]) if name in defaults else {}
            kwargs[name] = from_dict(tp, {**base, **(value or {})}, f"{where}.{name}")
        else:
            kwargs[name] = coerce(value, tp, f"{where}.{name}")
            check_value(kwargs[name], fields[name], tp, f"{where}.{name}")  # named after its source
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


def load_config(cls: type, path: str | Path) -> Any:
    return from_dict(cls, load_yaml(path), where=str(path))


def load_train_config(path: str | Path) -> TrainConfig:
    return load_config(TrainConfig, path)


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Sections whose options carry a prefix on the command line (lora.r is --lora-r), so that the flags
# users know from other tools keep their meaning (a bare --r or --dropout would be ambiguous).
FLAG_PREFIX = {"lora": "lora-", "judge": "judge-"}


def flag_of(section: str | None, f: dataclasses.Field) -> str:
    """The short command-line flag of a config field: ``--epochs``, ``--lora-r``, ``--from``."""
    return f.metadata.get("flag") or "--" + (FLAG_PREFIX.get(section or "", "") + f.name).replace("_", "-")


def python_names(cls: type) -> dict[str, tuple[str, str]]:
    """Every option of config ``cls`` by its Python name, to ``(section, field)``: the flag with dashes
    as underscores (``--lora-r`` is ``lora_r``); a field whose flag is not its name also by that name
    (``from_run`` for ``--from``, a Python keyword)."""
    hints = typing.get_type_hints(cls)
    names: dict[str, tuple[str, str]] = {}
    for section in dataclasses.fields(cls):
        for f in dataclasses.fields(hints[section.name]):
            flag = flag_of(section.name, f).lstrip("-").replace("-", "_")
            for name in (flag, f.name) if f.metadata.get("flag") else (flag,):  # --from: from_run
                if name.isidentifier() and not keyword.iskeyword(name):
                    names.setdefault(name, (section.name, f.name))
    return names


def config_from(cls: type, config: Any = None, options: dict[str, Any] | None = None) -> Any:
    """Config ``cls`` for the Python API: a config object or a YAML path (or nothing: the defaults),
    with ``options`` over it by their Python names (``epochs=3``, ``lora_r=16``, ``data="d.jsonl"``)
    or as whole sections (``lora={"r": 16}``). Checked as the command line is checked."""
    if isinstance(config, cls) and not options:
        check(config)  # fields may have been assigned after it was built
        return config
    if isinstance(config, cls):
        data = dataclasses.asdict(config)
    elif config is None or isinstance(config, (str, Path)):
        data = load_yaml(config) if config is not None else {}
    else:
        raise KaikaError(
            f"config: expected a {cls.__name__} or the path of a YAML file, got {type(config).__name__}"
        )
    names, sections = python_names(cls), {f.name for f in dataclasses.fields(cls)}
    overrides: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if name in sections and isinstance(value, dict):
            overrides[name] = {**overrides.get(name, {}), **value}
        elif name in names:
            section, fld = names[name]
            overrides.setdefault(section, {})[fld] = (
                [str(v) for v in value] if isinstance(value, tuple) else value
            )
        else:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KaikaError(
                f"unknown option {name!r} for {cls.__name__}{hint} (the names of the command line's flags)"
            )
    return from_dict(cls, deep_update(data, overrides), where="options")


def resolve_config(cls: type, config_path: str | None, overrides: dict[str, Any]) -> Any:
    """Defaults < YAML file < command-line overrides."""
    data = load_yaml(config_path) if config_path else {}
    return from_dict(cls, deep_update(data, overrides), where=config_path or "options")


def resolve_train_config(config_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    return resolve_config(TrainConfig, config_path, overrides)
