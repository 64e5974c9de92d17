"""``kaika merge``: fold a LoRA adapter into its base weights and write a standard checkpoint.

merge() reads top to bottom: check the paths, load base + adapter in full precision, record the
adapter's logits on a few prompts, ``merge_and_unload``, write everything into a temporary
directory next to the target, reload the merged checkpoint from there and compare logits, and
only then rename it into place. A failed or interrupted merge leaves no half-written model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kaika.atomic import write_failure
from kaika.config import DpoConfig, ModelArgs, TrainConfig
from kaika.data.messages import jinja_chat_template
from kaika.data.prompts import ChatTemplate, Template
from kaika.data.segments import record_prompt_ids, stop_ids
from kaika.data.tokenize import pad_batch, resolve_pad_token
from kaika.errors import KaikaError
from kaika.guard import check_inputs_outside, check_replaceable, claim, is_kaika_hidden, replace_owned
from kaika.inference.card import Check, model_card
from kaika.modeling.load import DTYPES, ModelSource, load_model, load_tokenizer
from kaika.modeling.lora import attach_adapter
from kaika.modeling.verify import compare_logits, masked_logits, verify_full_model
from kaika.rundir import (
    BASE_NOTICES,
    MERGED_CONFIG_FILE,
    REPORT_FILE,
    RunDir,
    save_base_notices,
    save_config,
    save_template,
    save_tokenizer,
)

log = logging.getLogger(__name__)

# Prompts the merged model is checked on: Japanese and English, with and without input.
VERIFY_PROMPTS = [
    ("日本の首都はどこですか？", ""),
    ("次の文章を要約してください。", "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"),
    ("Write a haiku about cherry blossoms.", ""),
]
TRAINING_CONFIG_FILE = MERGED_CONFIG_FILE
MERGE_RTOL = 1e-4  # merging only reorders one sum, W x + B A x → (W + BA) x: float32 noise


@dataclass
class MergeResult:
    out_dir: Path
    max_abs_diff: float  # max |logit difference|, merged (float32) vs base + adapter, on the check prompts
    tolerance: float
    rounding: float  # max |logit difference| the written dtype's rounding adds (0 for float32)
    dtype: str
    files: list[str]


@dataclass
class Merged:
    """A run's adapter folded into its base, in memory (float32), with what was checked on the way."""

    run: RunDir
    cfg: TrainConfig  # the training config the merged model records
    template: Template
    tokenizer: Any
    model: Any  # float32, no adapter
    batch: dict[str, torch.Tensor]  # the check prompts, as generation batches them
    expected: torch.Tensor  # base + adapter's logits on ``batch``, unmerged
    diff: float  # max |logit difference|, merged vs unmerged (0 for a whole model: nothing to merge)
    tol: float
    trained_quantized: bool
    quantized_gap: float | None = None  # max |Δlogit|, merged vs the quantized base + adapter as trained


def merge_in_memory(run: RunDir) -> Merged:
    """The run's base + adapter merged in float32 and checked against the unmerged model; a whole
    model (merged already) is loaded as it is, in float32."""
    cfg = run_config(run)
    tokenizer = load_tokenizer(run.model_args, run.tokenizer_source)
    resolve_pad_token(tokenizer)
    batch = verify_batch(tokenizer, run.template)
    if not run.is_adapter:
        model = load_model(replace(run.model_args, quantization="none", dtype="float32"), run.source)
        logits = masked_logits(model, batch)
        return Merged(run, cfg, run.template, tokenizer, model, batch, logits, 0.0, 0.0, False)
    model, trained_quantized = load_full_precision(run.model_args, run.source, run.path)
    expected = masked_logits(model, batch)  # base + adapter, unmerged
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf weights
    diff, tol = compare(
        masked_logits(merged, batch),
        expected,
        MERGE_RTOL,
        "the merged model's logits differ from base + adapter",
    )
    gap = quantized_gap(run, batch, expected) if trained_quantized else None
    return Merged(
        run, cfg, run.template, tokenizer, merged, batch, expected, diff, tol, trained_quantized, gap
    )


def quantized_gap(run: RunDir, batch: dict[str, torch.Tensor], expected: torch.Tensor) -> float | None:
    """max |Δlogit| between the full-precision base + adapter (what the merge holds) and the quantized
    base + adapter the run trained, on the check prompts; None where bitsandbytes is not installed."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        log.warning("bitsandbytes is not installed: the gap to the quantized model is not measured")
        return None
    quantized = attach_adapter(
        load_model(run.model_args, run.source), run.path, run.model_args.base_model
    ).eval()
    gap = (masked_logits(quantized, batch) - expected).abs().max().item()
    del quantized
    log.info(
        "the merged model (full precision) differs from the %s-quantized base + adapter used in training by "
        "at most %.3g in logits on the check prompts (largest logit %.3g)",
        run.model_args.quantization,
        gap,
        expected.abs().max().item(),
    )
    return gap


def merge(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    dtype: str = "float32",
    max_shard_size: str = "2GB",
    force: bool = False,
) -> MergeResult:
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    run = RunDir.open(adapter_dir, base_model)
    check_out_dir(out_dir, adapter_dir, force)
    check_inputs_outside(out_dir, [run.source.path], "writing the merged model")
    if dtype not in DTYPES:
        raise KaikaError(f"unknown dtype {dtype!r} for the merged checkpoint; use {', '.join(DTYPES)}")
    m = merge_in_memory(run)
    merged = m.model.to(DTYPES[dtype])

    with written_aside(out_dir) as tmp:
        write_checkpoint(merged, m.tokenizer, m.template, m.cfg, tmp, max_shard_size)
        save_notices(m.run, tmp)
        # The files are the merged weights (the rule of every save: tensors bit for bit, logits of the
        # reloaded checkpoint with its own and with the in-memory weights).
        verify_full_model(tmp, merged, m.batch, replace(m.run.model_args, quantization="none"))
        # What rounding to the written dtype does to the logits: reported, not mistaken for a bad merge.
        rounding = (masked_logits(merged.float(), m.batch) - m.expected).abs().max().item()
        del merged, m.model
        check = Check(
            m.diff, m.tol, m.trained_quantized, dtype=dtype, rounding=rounding, quantized_gap=m.quantized_gap
        )
        (tmp / "README.md").write_text(model_card(m.cfg, m.template, adapter_dir, check), encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir() if not is_kaika_hidden(p.name))
    log.info("merged model written to %s (max |Δlogit| %.2e, tolerance %.1e)", out_dir, m.diff, m.tol)
    return MergeResult(out_dir, m.diff, m.tol, rounding, dtype, files)


@contextlib.contextmanager
def written_aside(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` to write a model into; once the block has written and
    checked it, it is renamed to ``out_dir`` (a previous one, which ``--force`` allowed, goes first:
    checked again now that kaika wrote it). A failure leaves nothing behind; what a killed run left
    (a hidden directory as large as the model) is removed by the next run into the same place, and said."""
    prefix = f".{out_dir.name}.kaika-partial-"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.parent.glob(prefix + "*"):
            if stale.is_dir() and (stale / PARTIAL_MARK).is_file():
                log.warning("removing %s, left by an earlier write that was killed", stale)
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)  # a directory's mode as the umask says (mkdtemp's is private: 0700)
        (tmp / PARTIAL_MARK).write_text("written by kaika; incomplete until renamed\n", encoding="utf-8")
        claim(tmp, "model")  # kaika's own: a later --force may replace it
    except OSError as e:
        raise KaikaError(f"cannot write into {out_dir.parent}: {e.strerror}; nothing was written") from None
    try:
        try:
            yield tmp
        except OSError as e:
            reason = write_failure(e) or e.strerror
            raise KaikaError(f"could not write {out_dir} ({reason}); nothing was written") from e
        (tmp / PARTIAL_MARK).unlink()
        if out_dir.exists():
            replace_owned(out_dir, "--force")
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PARTIAL_MARK = ".kaika-partial"  # inside a model being written aside: kaika's own, incomplete


def save_notices(run: RunDir, out: Path) -> None:
    """The base's provenance and terms (from the run: kaika train copied them, else from the base),
    and the run's data report, which the model card cites."""
    notices = run.path / BASE_NOTICES
    save_base_notices(notices if notices.is_dir() else run.source.path, out)
    if (run.path / REPORT_FILE).is_file():
        shutil.copyfile(run.path / REPORT_FILE, out / REPORT_FILE)


def check_out_dir(out_dir: Path, adapter_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise KaikaError(f"{out_dir} exists and is a file; choose a directory for the merged model")
    if out_dir.resolve() == adapter_dir.resolve() or adapter_dir.resolve().is_relative_to(out_dir.resolve()):
        raise KaikaError(f"{out_dir} holds the adapter itself; write the merged model somewhere else")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise KaikaError(
                f"{out_dir} is not empty: pass --force to replace it, or choose another directory"
            )
        check_replaceable(out_dir, "--force")


def run_config(run: RunDir) -> TrainConfig:
    """The training config the merged model records: the run's (with the base it is merged into),
    or, for an adapter trained elsewhere, one that holds what is known (its base, its template)."""
    if isinstance(run.config, TrainConfig):
        return replace(run.config, model=run.model_args)
    if isinstance(run.config, DpoConfig):  # preference tuning: its pairs, LoRA and training
        d = run.config
        data = replace(run.data_args, data=list(d.data.data), template=run.template.name)
        return TrainConfig(model=run.model_args, data=data, lora=d.lora, train=d.train)
    if run.config is not None:  # a kaika pretrain LoRA run: its LoRA, training and text
        p = run.config
        data = replace(TrainConfig().data, data=list(p.pretrain.data), template=run.template.name)
        data = replace(data, cutoff_len=p.pretrain.cutoff_len, train_on_inputs=True)
        return TrainConfig(model=run.model_args, data=data, lora=p.lora, train=p.train)
    cfg = TrainConfig()
    return replace(cfg, model=run.model_args, data=replace(cfg.data, template=run.template.name))


def load_full_precision(model_args: ModelArgs, source: ModelSource, adapter_dir: Path):
    """Base in float32 with the adapter attached. Merging into quantized weights would round the
    LoRA update away (and bitsandbytes cannot save a merged 4-bit model), so a base trained
    quantized is reloaded unquantized: the merged model is base + adapter at full precision."""
    trained_quantized = model_args.quantization != "none"
    if trained_quantized:
        log.warning(
            "the adapter was trained on a %s-quantized base; merging reloads the base in full precision "
            "(float32) and merges into that: the merged model matches base + adapter unquantized, and can "
            "differ slightly from the quantized model used in training",
            model_args.quantization,
        )
    full = replace(model_args, quantization="none", dtype="float32")
    base = load_model(full, source)
    return attach_adapter(base, adapter_dir, model_args.base_model).eval(), trained_quantized


def verify_batch(tokenizer, template: Template) -> dict[str, torch.Tensor]:
    prompts = [
        {"input_ids": record_prompt_ids(template, tokenizer, {"instruction": i, "input": x})}
        for i, x in VERIFY_PROMPTS
    ]
    return pad_batch(prompts, tokenizer.pad_token_id, side="left")  # as generation batches them


def write_checkpoint(merged, tokenizer, template, cfg, out: Path, max_shard_size: str) -> None:
    gen = merged.generation_config
    stops = stop_ids(template, tokenizer)  # EOS, and a chat template's end of turn
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    merged.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    # Other servers (vLLM, TGI, apply_chat_template) then prompt the model as kaika does.
    tokenizer.chat_template = (
        template.source if isinstance(template, ChatTemplate) else jinja_chat_template(template)
    )
    save_tokenizer(tokenizer, out)
    save_template(template, out)
    save_config(cfg, out, MERGED_CONFIG_FILE)


def compare(got: torch.Tensor, expected: torch.Tensor, rel_tol: float, what: str) -> tuple[float, float]:
    tol = rel_tol * max(expected.abs().max().item(), 1.0)
    return compare_logits(got, expected, tol, what, "nothing was written"), tol
