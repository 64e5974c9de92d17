"""``kaika eval loss``: supervised-token loss and perplexity on held-out instruction data.

The examples are encoded exactly as in training (the run's saved template, ``cutoff_len`` and
``train_on_inputs``, :func:`kaika.tokenize.encode_records`), and the loss is the negative
log-likelihood summed over every supervised token of the whole file divided by their count:
not a mean of per-batch means, so it does not depend on the batch size or on padding.
For an adapter, the base model is scored too, by switching the adapter off (one model in memory).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kaika.config import CONFIG_FILE, DataArgs, ModelArgs, load_train_config
from kaika.errors import KaikaError
from kaika.generate import Loaded, load_for_inference
from kaika.models import load_model, load_tokenizer, resolve_source
from kaika.prompts import TEMPLATE_FILE, load_template
from kaika.tokenize import IGNORE_INDEX, encode_records, resolve_pad_token

log = logging.getLogger(__name__)


@dataclass
class LossResult:
    loss: float  # mean NLL per supervised token, nats
    perplexity: float
    tokens: int  # supervised tokens (response tokens + EOS)


@dataclass
class Subject:
    """What is evaluated: a model (with or without adapter) plus how its run encoded examples."""

    loaded: Loaded
    is_adapter: bool
    data_args: DataArgs


def load_subject(
    path: str | Path, base_model: str | None = None, dtype: str | None = None, template: str | None = None
) -> Subject:
    """An adapter directory (kaika run or any PEFT adapter), a merged/full model directory, a hub id or a
    builtin name. The run's saved config and template are used where they exist."""
    path_ = Path(path)
    run_cfg = load_train_config(path_ / CONFIG_FILE) if (path_ / CONFIG_FILE).is_file() else None
    data_args = run_cfg.data if run_cfg else DataArgs()
    saved_template = path_ / TEMPLATE_FILE
    if (path_ / "adapter_config.json").is_file():
        loaded = load_for_inference(path_, base_model, dtype=dtype)
        is_adapter = True
    else:
        if base_model:
            raise KaikaError(f"--base-model only applies to adapters; {path} is a full model")
        model_args = ModelArgs(
            base_model=str(path), dtype=dtype or (run_cfg.model.dtype if run_cfg else "auto")
        )
        source = resolve_source(model_args)
        tokenizer = load_tokenizer(model_args, source)
        resolve_pad_token(tokenizer)
        tokenizer.padding_side = "left"
        model = load_model(model_args, source).eval()
        if torch.cuda.is_available():
            model = model.to("cuda")
        name = template or (str(saved_template) if saved_template.is_file() else data_args.template)
        loaded = Loaded(model, tokenizer, load_template(name), model_args)
        is_adapter = False
    if template:  # an explicit choice wins over the saved one
        loaded.template = load_template(template)
    return Subject(loaded, is_adapter, data_args)


def variants(subject: Subject, base_also: bool = True) -> list[tuple[str, Callable[[], Any]]]:
    """(name, context in which the model is that variant): base is the adapter model with it switched off."""
    if not subject.is_adapter:
        return [("model", nullcontext)]
    base = [("base", subject.loaded.model.disable_adapter)] if base_also else []
    return [*base, ("adapter", nullcontext)]


def _accepts_logits_to_keep(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


@torch.no_grad()
def supervised_loss(
    model, features: list[dict[str, list[int]]], pad_id: int, batch_size: int = 4, desc: str = "loss"
) -> LossResult:
    """Summed NLL over the supervised tokens (label != -100) of ``features`` / their number."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    keep_positions = _accepts_logits_to_keep(model)
    total, count = 0.0, 0
    # Longest first: similar lengths share a batch (less padding), and memory peaks at once.
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        chunk = [features[i] for i in order[start : start + batch_size]]
        width = max(len(f["input_ids"]) for f in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, f in enumerate(chunk):  # right padding: positions (and ALiBi offsets) are unchanged
            n = len(f["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = (
                torch.tensor(f["input_ids"]),
                torch.tensor(f["labels"]),
                1,
            )
        targets = labels[:, 1:]  # (B, T-1): the logits at position t predict token t+1
        columns = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions with a target
        if not len(columns):
            continue
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if keep_positions:  # only the [B, positions, vocab] logits that are scored, not [B, T, vocab]
            kwargs["logits_to_keep"] = columns.to(device)
            logits = model(**kwargs).logits
        else:
            logits = model(**kwargs).logits[:, columns.to(device)]
        tgt = targets[:, columns].to(device)
        total += torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((tgt != IGNORE_INDEX).sum())
    if not count:
        raise KaikaError("no supervised token to score: every example was dropped or has an empty response")
    mean = total / count
    return LossResult(mean, math.exp(mean) if mean < 700 else math.inf, count)


def eval_loss(
    path: str | Path,
    data: str,
    batch_size: int = 4,
    base_model: str | None = None,
    dtype: str | None = None,
    template: str | None = None,
    cutoff_len: int | None = None,
    columns: dict[str, str] | None = None,
    json_path: str | Path | None = None,
) -> dict[str, LossResult]:
    """``{"base": …, "adapter": …}`` for an adapter, ``{"model": …}`` for a full model."""
    from kaika.data import load_records

    records = load_records([data], columns)
    subject = load_subject(path, base_model, dtype, template)
    d = subject.data_args
    tok = subject.loaded.tokenizer
    cutoff = cutoff_len or d.cutoff_len
    features, report = encode_records(records, subject.loaded.template, tok, cutoff, d.train_on_inputs)
    if report.dropped_prompt_too_long:
        log.warning(
            "%d of %d examples skipped: the prompt alone exceeds cutoff_len %d (as in training)",
            report.dropped_prompt_too_long,
            report.records,
            cutoff,
        )
    if report.truncated:
        log.info(
            "%d examples truncated to cutoff_len %d (EOS kept, as in training)", report.truncated, cutoff
        )
    results: dict[str, LossResult] = {}
    for name, context in variants(subject):
        with context():
            results[name] = supervised_loss(
                subject.loaded.model, features, tok.pad_token_id, batch_size, f"loss ({name})"
            )
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(
            json.dumps({k: asdict(v) for k, v in results.items()}, indent=2) + "\n", encoding="utf-8"
        )
    return results


def format_loss_table(results: dict[str, LossResult]) -> str:
    lines = ["| model | loss | perplexity | supervised tokens |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v.loss:.4f} | {v.perplexity:.2f} | {v.tokens} |" for k, v in results.items()]
    return "\n".join(lines)
