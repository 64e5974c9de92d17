"""``kaika train``: data → template → tokens → base model + LoRA → Trainer → save and verify.

Read ``train()`` top to bottom: each step is one function below it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import ProgressCallback, TrainerCallback

from kaika.atomic import staged_output
from kaika.config import CONFIG_FILE, TrainArgs, TrainConfig, save_yaml
from kaika.data import load_records, split_records
from kaika.errors import KaikaError
from kaika.faults import check_writable, guarded_training
from kaika.lora import apply_lora
from kaika.models import (
    ModelSource,
    load_model,
    load_tokenizer,
    quantization_config,
    resolve_dtype,
    resolve_source,
)
from kaika.packing import PackedExamplesCollator, enable_packed_attention, pack_examples
from kaika.prompts import TEMPLATE_FILE, PromptTemplate, load_template
from kaika.qkv import check_block_structure
from kaika.tokenize import IGNORE_INDEX, DataReport, encode_records, resolve_pad_token

log = logging.getLogger(__name__)

REPORT_FILE = "data_report.json"
LOG_FILE = "trainer_log.jsonl"
CURVE_FILE = "loss_curve.png"
CHECKPOINTS = "checkpoints"
# Files that mark a directory as a kaika run, so --overwrite never empties an unrelated folder.
RUN_MARKERS = (CONFIG_FILE, "adapter_config.json", CHECKPOINTS, LOG_FILE)


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
    template = load_template(cfg.data.template)
    train_records, val_records = load_data(cfg)  # all input checked before any model is loaded
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    resolve_pad_token(tokenizer)
    train_set, val_set, report = tokenize_data(cfg, template, tokenizer, train_records, val_records)
    model = build_model(cfg, source)
    rows, collator = (
        pack_for_training(cfg, model, tokenizer, train_set) if cfg.data.packing else (train_set, None)
    )
    trainer = fit(cfg, model, tokenizer, rows, val_set, out, data_collator=collator)
    result = save_and_verify(cfg, trainer, tokenizer, template, report, source, train_set, out)
    log.info(
        "done: adapter in %s (%d steps, %.0f s, %.0f tokens/s)",
        out,
        result.global_step,
        result.train_seconds,
        result.tokens_per_second,
    )
    return result


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_config(cfg: TrainConfig) -> Path:
    """What can be known wrong without reading data or loading a model fails here, first."""
    gradient_accumulation(cfg.train, world_size())
    quantization_config(cfg.model, resolve_dtype(cfg.model.dtype))
    if cfg.data.cutoff_len < 2:
        raise KaikaError(
            f"cutoff_len must be at least 2 (one response token and EOS), got {cfg.data.cutoff_len}"
        )
    return check_output_dir(cfg.train)


def check_output_dir(args: TrainArgs) -> Path:
    """Refuse to clobber work; creates nothing (input is validated before anything is written)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise KaikaError(f"output_dir {out} exists and is a file")
    check_writable(out)
    contents = list(out.iterdir()) if out.is_dir() else []
    if args.resume:
        if not list((out / CHECKPOINTS).glob("checkpoint-*")):
            raise KaikaError(
                f"--resume: no checkpoint in {out / CHECKPOINTS}; run without --resume to start fresh"
            )
        return out
    if contents and not args.overwrite:
        raise KaikaError(
            f"output_dir {out} is not empty: pass --overwrite to replace it, --resume to continue "
            "its training, or choose another --output-dir"
        )
    if contents and not any((out / m).exists() for m in RUN_MARKERS):
        raise KaikaError(
            f"output_dir {out} is not empty and does not look like a kaika run; "
            "refusing to overwrite it: choose another --output-dir"
        )
    return out


def load_data(cfg: TrainConfig) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    records = load_records(cfg.data.data, cfg.data.columns)
    if cfg.data.val_data:
        return records, load_records(cfg.data.val_data, cfg.data.columns)
    return split_records(records, cfg.data.val_set_size, cfg.train.seed)


def tokenize_data(cfg: TrainConfig, template: PromptTemplate, tokenizer, train_records, val_records):
    d = cfg.data
    train_set, report = encode_records(train_records, template, tokenizer, d.cutoff_len, d.train_on_inputs)
    val_set, _ = encode_records(
        val_records, template, tokenizer, d.cutoff_len, d.train_on_inputs, "tokenizing val"
    )
    log.info("data: %s", report.summary())
    if not train_set:
        raise KaikaError(f"no training example fits cutoff_len {d.cutoff_len}: raise --cutoff-len")
    return train_set, val_set, report


def build_model(cfg: TrainConfig, source: ModelSource):
    from transformers import set_seed

    model = load_model(cfg.model, source)
    set_seed(cfg.train.seed)  # LoRA A is drawn from the global RNG: same seed, same initial adapter
    return apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing)


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


def gradient_accumulation(args: TrainArgs, world_size: int) -> int:
    per_step = args.micro_batch_size * world_size
    if args.batch_size < per_step or args.batch_size % per_step:
        raise KaikaError(
            f"batch_size {args.batch_size} must be a multiple of micro_batch_size "
            f"{args.micro_batch_size} × {world_size} process(es) = {per_step}"
        )
    return args.batch_size // per_step


def fit(cfg: TrainConfig, model, tokenizer, train_set, val_set, out: Path, data_collator=None):
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from kaika.fastloss import FastLoss, KaikaTrainer

    t = cfg.train
    processes = world_size()
    accum = gradient_accumulation(t, processes)
    log.info(
        "global batch %d = micro batch %d × accumulation %d × %d process(es)",
        t.batch_size,
        t.micro_batch_size,
        accum,
        processes,
    )
    if is_main_process() and t.overwrite and not t.resume and out.exists():
        shutil.rmtree(out)
    dtype = next(p.dtype for p in model.parameters())
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if val_set else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        report_to=[],
        disable_tqdm=False,  # transformers ties the bar to its log level, which the CLI keeps quiet
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        ddp_find_unused_parameters=False if processes > 1 else None,
    )
    tokenizer.padding_side = "right"
    trainer = KaikaTrainer(
        model=model,
        fast_loss=FastLoss(t.fast_loss, t.fast_loss),
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=data_collator
        or DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX),
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(out / LOG_FILE)],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgressCallback())
    start = time.perf_counter()
    with guarded_training(trainer, t.resume, out / LOG_FILE) as resume_from:  # signals, nan/inf, disk
        trainer.train(resume_from_checkpoint=resume_from)
    trainer.kaika_train_seconds = time.perf_counter() - start
    if val_set and trainer.state.global_step % t.eval_steps:  # the last step was not evaluated yet
        trainer.evaluate()
    return trainer


class LossProgressCallback(ProgressCallback):
    """Transformers' progress bar (steps, ETA) with the latest loss and lr on it, and one short line
    per evaluation, instead of a dict printed at every log step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = self.training_bar
        if not state.is_world_process_zero or bar is None or not logs:
            return
        if "loss" in logs:
            bar.set_postfix(
                loss=f"{float(logs['loss']):.4f}", lr=f"{float(logs.get('learning_rate', 0)):.2e}"
            )
        if "eval_loss" in logs:
            bar.write(f"step {state.global_step}: eval loss {float(logs['eval_loss']):.4f}")


class JsonlLogCallback(TrainerCallback):
    """One JSON line per log event: step, loss, eval_loss, lr, tokens/s (non-pad tokens)."""

    def __init__(self, path: Path):
        self.path = path
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key, name in (
            ("loss", "loss"),
            ("eval_loss", "eval_loss"),
            ("learning_rate", "lr"),
            ("grad_norm", "grad_norm"),
            ("train_loss", "train_loss"),
        ):
            if key in logs:
                row[name] = float(logs[key])
        if "loss" in logs and self._last is not None:
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            row["tokens_per_s"] = round((seen - self._last[1]) / max(now - self._last[0], 1e-9), 2)
            self._last = (now, seen)
        if len(row) > 2:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def save_and_verify(
    cfg: TrainConfig,
    trainer,
    tokenizer,
    template: PromptTemplate,
    report: DataReport,
    source: ModelSource,
    train_set,
    out: Path,
) -> TrainResult:
    model = trainer.model
    history = trainer.state.log_history
    train_loss = next((h["train_loss"] for h in reversed(history) if "train_loss" in h), math.nan)
    eval_loss = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
    seconds = getattr(trainer, "kaika_train_seconds", 0.0)
    tokens = trainer.state.num_input_tokens_seen
    result = TrainResult(
        out,
        trainer.state.global_step,
        float(train_loss),
        eval_loss,
        seconds,
        tokens / seconds if seconds else 0.0,
        report,
        model,
    )
    if not is_main_process():
        return result
    check_block_structure(model)  # --lora-qkv: unchosen slices must still be exactly zero
    # Written aside, verified there, then moved into `out` (weights last): a kill never leaves a
    # half-written adapter where generate would load it.
    with staged_output(out) as stage:
        model.save_pretrained(stage)
        tokenizer.padding_side = "left"  # what generation wants
        tokenizer.save_pretrained(stage)
        save_yaml(with_absolute_base(cfg), stage / CONFIG_FILE)
        (stage / TEMPLATE_FILE).write_text(template.to_json(), encoding="utf-8")
        (stage / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
        plot_loss_curve(history, stage / CURVE_FILE)
        if cfg.train.verify:
            verify_adapter(stage, model, cfg, source, train_set, tokenizer)
    return result


def with_absolute_base(cfg: TrainConfig) -> TrainConfig:
    """The config to save: a local base model path made absolute, so generate works from any directory."""
    path = Path(cfg.model.base_model).expanduser()
    if not path.exists():  # hub id or builtin name
        return cfg
    return replace(cfg, model=replace(cfg.model, base_model=str(path.resolve())))


def check_lora_nonzero(adapter_dir: Path) -> None:
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise KaikaError(f"save failed: {path} was not written")
    tensors = load_file(path)
    b = [v for k, v in tensors.items() if "lora_B" in k]
    if not b:
        raise KaikaError(f"save failed: {path} holds no LoRA weights ({len(tensors)} tensors)")
    if all(not v.any() for v in b):
        raise KaikaError(
            f"the adapter in {adapter_dir} is empty: every LoRA B matrix is zero, so it changes "
            "nothing. Did training take any optimizer step (check --max-steps, --lr, data size)?"
        )


@torch.no_grad()
def verify_adapter(
    out: Path, trained, cfg: TrainConfig, source: ModelSource, train_set, tokenizer, n_examples: int = 4
) -> float:
    """Reload the adapter from disk onto a fresh base; its logits must match the trained model's."""
    from peft import PeftModel
    from transformers import DataCollatorForSeq2Seq

    check_lora_nonzero(out)
    tokenizer.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)(train_set[:n_examples])
    tokenizer.padding_side = "left"
    device = next(trained.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    trained.eval()
    expected = trained(**batch).logits.float()
    base = load_model(cfg.model, source)
    if cfg.model.quantization == "none":  # quantized models are placed by device_map and cannot be moved
        base = base.to(device)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    got = reloaded(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    diff = (got - expected)[mask].abs().max().item()
    scale = expected[mask].abs().max().item()
    # fp32 on one device is bitwise-close; half precision and quantized kernels are not.
    tol = (
        1e-4
        if expected.dtype == torch.float32
        and cfg.model.quantization == "none"
        and next(trained.parameters()).dtype == torch.float32
        else 2e-2
    ) * max(scale, 1.0)
    del reloaded
    if not diff <= tol:
        raise KaikaError(
            f"verification failed: the adapter reloaded from {out} gives logits that differ from the "
            f"trained model by {diff:.3g} (tolerance {tol:.3g}); the saved adapter is not the trained one"
        )
    log.info("verified: adapter reloaded from disk reproduces the trained model (max |Δlogit| %.2e)", diff)
    return diff


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for points, label, style in ((train, "train loss", "-"), (val, "eval loss", "o--")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (supervised tokens)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
