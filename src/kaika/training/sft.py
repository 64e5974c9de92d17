"""``kaika train``: data → template → tokens → base model + LoRA → Trainer → save and verify.

Read ``train()`` top to bottom: each step is one function below it (the Trainer wiring they
share with ``kaika pretrain`` is :mod:`kaika.training.trainer`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kaika.config import TrainConfig
from kaika.data.examples import DataReport, encode_records
from kaika.data.packing import PackedExamplesCollator, enable_packed_attention, pack_examples
from kaika.data.prompts import AUTO, CHAT, Template, load_template, resolve_template
from kaika.data.records import load_records, split_records
from kaika.data.tokenize import PadCollator, resolve_pad_token
from kaika.errors import KaikaError
from kaika.modeling.load import (
    ModelSource,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_source,
)
from kaika.modeling.lora import apply_lora
from kaika.rundir import (
    REPORT_FILE,
)
from kaika.training.launch import detect_launch, engine_dtype
from kaika.training.saving import RunFiles, save_verified_adapter
from kaika.training.trainer import (
    Fitted,
    check_recipe,
    fit,
    mixed_precision,
    prepare_output_dir,
    run_lock,
    training_arguments,
    world_size,
)

log = logging.getLogger(__name__)

VERIFY_EXAMPLES = 4  # training examples the reloaded adapter is checked on


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    train_loss: float
    eval_loss: float | None
    train_seconds: float
    tokens_per_second: float
    data_report: DataReport
    model: Any = field(default=None, repr=False)  # the trained PeftModel, in memory


def train(cfg: TrainConfig) -> TrainResult:
    out = check_config(cfg)
    cfg = replace(cfg, model=replace(cfg.model, dtype=engine_dtype(detect_launch(), cfg.model.dtype)))
    with run_lock(out):  # a second run into the same directory is refused, not interleaved
        return _train(cfg, out)


def _train(cfg: TrainConfig, out: Path) -> TrainResult:
    if cfg.data.template not in (AUTO, CHAT):
        load_template(cfg.data.template)  # a bad template file fails before the data is read
    train_records, val_records = load_data(cfg)  # all input checked before any model is loaded
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    resolve_pad_token(tokenizer)
    template = choose_template(cfg, tokenizer, train_records)
    train_set, val_set, report = tokenize_data(cfg, template, tokenizer, train_records, val_records)
    # The distributed state first: ZeRO-3 partitions the base as it loads, FSDP loads it on rank 0 only.
    dtype = resolve_dtype(cfg.model.dtype)
    args = training_arguments(cfg.train, out, dtype, bool(val_set), world_size())
    model = build_model(cfg, source, mixed_precision(dtype))
    rows, collator = (
        pack_for_training(cfg, model, tokenizer, train_set)
        if cfg.data.packing
        else (train_set, PadCollator(tokenizer.pad_token_id))
    )
    prepare_output_dir(cfg.train, model, tokenizer, asdict(cfg.lora))
    fitted = fit(args, cfg.train, model, tokenizer, rows, val_set, collator, cfg.lora.loraplus_lr_ratio)
    result = save_and_verify(cfg, fitted, tokenizer, template, report, source, train_set, out)
    log.info(
        "done: adapter in %s (%d steps, %.0f s, %.0f tokens/s)",
        out,
        result.global_step,
        result.train_seconds,
        result.tokens_per_second,
    )
    return result


def check_config(cfg: TrainConfig) -> Path:
    """What can be known wrong without reading data or loading a model fails here, first."""
    out, _ = check_recipe(cfg, [*cfg.data.data, *cfg.data.val_data])
    return out


def load_data(cfg: TrainConfig) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    records = load_records(cfg.data.data, cfg.data.columns)
    warn_duplicates(records)
    same = [v for v in cfg.data.val_data if any(same_file(v, d) for d in cfg.data.data)]
    if same:
        log.warning(
            "--val-data %s is also training data: its loss measures what was learned by heart, not how the model "
            "does on examples it has not seen (hold some out with --val-set-size, or give other data)",
            ", ".join(same),
        )
    if cfg.data.val_data:
        return records, load_records(cfg.data.val_data, cfg.data.columns)
    return split_records(records, cfg.data.val_set_size, cfg.train.seed)


TRAIN_ON_WORDS = {
    "assistant": "every answer (assistant turns, Alpaca outputs) and its end of turn",
    "last": "the last answer of each conversation",
    "all": "all tokens",
}


def choose_template(cfg: TrainConfig, tokenizer, records: list[dict]) -> Template:
    conversations = sum("messages" in r for r in records)
    template = resolve_template(cfg.data.template, tokenizer, conversations > 0)
    log.info(
        "template: %s (%s) for %d conversation(s) and %d Alpaca record(s); loss on %s",
        template.name,
        "the base model's chat template" if template.kind == "chat" else "kaika's template",
        conversations,
        len(records) - conversations,
        TRAIN_ON_WORDS["all" if cfg.data.train_on_inputs else cfg.data.train_on],
    )
    return template


def same_file(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).samefile(b)
    except OSError:
        return a == b


def record_key(r: dict) -> tuple:
    if "messages" in r:
        return tuple((m["role"], m["content"]) for m in r["messages"])
    return (r["instruction"], r["input"], r["output"])


def warn_duplicates(records: list[dict]) -> None:
    """Identical records train with double weight, usually by accident (a file given twice, a merge)."""
    seen = len({record_key(r) for r in records})
    if seen < len(records):
        log.warning(
            "%d of %d training records are exact duplicates of another (a file given twice?); each copy "
            "trains again. `kaika data check FILE` lists them",
            len(records) - seen,
            len(records),
        )


def tokenize_data(cfg: TrainConfig, template: Template, tokenizer, train_records, val_records):
    d = cfg.data
    how = {"train_on": d.train_on, "truncation": d.truncation}
    train_set, report = encode_records(
        train_records, template, tokenizer, d.cutoff_len, d.train_on_inputs, **how
    )
    val_set, _ = encode_records(
        val_records, template, tokenizer, d.cutoff_len, d.train_on_inputs, "tokenizing val", **how
    )
    log.info("data: %s", report.summary())
    if not train_set:
        raise KaikaError(f"no training example fits cutoff_len {d.cutoff_len}: raise --cutoff-len")
    return train_set, val_set, report


def build_model(cfg: TrainConfig, source: ModelSource, mixed: bool = False):
    from transformers import set_seed

    model = load_model(cfg.model, source)
    set_seed(cfg.train.seed)  # LoRA A is drawn from the global RNG: same seed, same initial adapter
    return apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing, mixed)


def pack_for_training(cfg: TrainConfig, model, tokenizer, train_set):
    """--packing: whole examples into rows of up to cutoff_len tokens, attention kept per example."""
    rows = pack_examples(train_set, cfg.data.cutoff_len)
    enable_packed_attention(model)
    tokens = sum(len(f["input_ids"]) for f in train_set)
    log.info(
        "packing: %d examples into %d rows of up to %d tokens (%.1f examples per row, rows %.0f%% full); "
        "batch sizes count rows",
        len(train_set),
        len(rows),
        cfg.data.cutoff_len,
        len(train_set) / len(rows),
        100 * tokens / (len(rows) * cfg.data.cutoff_len),
    )
    return rows, PackedExamplesCollator(tokenizer.pad_token_id)


def save_and_verify(
    cfg: TrainConfig,
    fitted: Fitted,
    tokenizer,
    template: Template,
    report: DataReport,
    source: ModelSource,
    train_set,
    out: Path,
) -> TrainResult:
    result = TrainResult(
        out,
        fitted.global_step,
        fitted.train_loss,
        fitted.eval_loss,
        fitted.seconds,
        fitted.tokens_per_second,
        report,
        fitted.model,
    )

    files = RunFiles(cfg, tokenizer, fitted.history, REPORT_FILE, asdict(report), template, source)
    save_verified_adapter(fitted, out, files, train_set[:VERIFY_EXAMPLES])
    return result
