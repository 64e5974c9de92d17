"""``kaika eval loss``: supervised-token loss and perplexity on held-out instruction data.

The examples are encoded exactly as in training (the run's saved template, ``cutoff_len`` and
``train_on_inputs``, :func:`kaika.data.examples.encode_records`), and the loss is the negative
log-likelihood summed over every supervised token of the whole file divided by their count:
not a mean of per-batch means, so it does not depend on the batch size or on padding.
For an adapter, the base model is scored too, by switching the adapter off (one model in memory).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kaika.data.examples import encode_records
from kaika.data.tokenize import pad_batch
from kaika.inference.generate import Loaded, load
from kaika.rundir import RunDir
from kaika.training.loss import LossResult, token_weighted_loss

log = logging.getLogger(__name__)

__all__ = ["LossResult", "eval_loss", "format_loss_table", "load_subject", "variants"]


def load_subject(
    path: str | Path, base_model: str | None = None, dtype: str | None = None, template: str | None = None
) -> Loaded:
    """An adapter directory (kaika run or any PEFT adapter), a merged/full model directory, a hub id or a
    builtin name, loaded by the rule of :class:`~kaika.rundir.RunDir` (saved config and template)."""
    return load(RunDir.open(path, base_model, dtype, template, adapter=False))


def variants(subject: Loaded, base_also: bool = True) -> list[tuple[str, Callable[[], Any]]]:
    """(name, context in which the model is that variant): base is the adapter model with it switched off."""
    if not subject.run.is_adapter:
        return [("model", nullcontext)]
    base = [("base", subject.model.disable_adapter)] if base_also else []
    return [*base, ("adapter", nullcontext)]


def supervised_loss(
    model, features: list[dict[str, list[int]]], pad_id: int, batch_size: int = 4, desc: str = "loss"
) -> LossResult:
    """:func:`~kaika.training.loss.token_weighted_loss` over ``features``, batched longest first
    (similar lengths share a batch: less padding, and memory peaks at once), padded on the right."""
    from tqdm.auto import tqdm

    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    starts = range(0, len(order), batch_size)
    batches = (
        pad_batch([features[i] for i in order[s : s + batch_size]], pad_id)
        for s in tqdm(starts, desc=desc, unit="batch", leave=False)
    )
    return token_weighted_loss(model, batches)


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
    subject: Loaded | None = None,
) -> dict[str, LossResult]:
    """``{"base": …, "adapter": …}`` for an adapter, ``{"model": …}`` for a full model. ``subject``: the
    model already loaded (by the suite), else it is loaded from ``path``."""
    from kaika.data.records import load_records
    from kaika.guard import check_output_file

    if json_path:
        check_output_file(json_path, [data], "--json")
    records = load_records([data], columns)
    subject = subject or load_subject(path, base_model, dtype, template)
    d = subject.run.data_args
    tok = subject.tokenizer
    cutoff = cutoff_len or d.cutoff_len
    features, report = encode_records(
        records,
        subject.template,
        tok,
        cutoff,
        d.train_on_inputs,
        train_on=d.train_on,
        truncation=d.truncation,
    )
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
                subject.model, features, tok.pad_token_id, batch_size, f"loss ({name})"
            )
    if json_path:
        from kaika.atomic import write_text

        write_text(
            json_path, json.dumps({k: asdict(v) for k, v in results.items()}, indent=2) + "\n", "--json"
        )
    return results


def format_loss_table(results: dict[str, LossResult]) -> str:
    lines = ["| model | loss | perplexity | supervised tokens |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v.loss:.4f} | {v.perplexity:.2f} | {v.tokens} |" for k, v in results.items()]
    return "\n".join(lines)
