"""Records to training examples: the one place Alpaca records and conversations become ids and
labels (:func:`encode_records`), with the report of what was kept, cut and left out (``DataReport``).

Alpaca records with kaika's templates go through :func:`kaika.data.tokenize.encode_example`;
conversations, and every record under a chat template, through
:func:`kaika.data.segments.encode_conversation`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from kaika.data.conversations import training_messages
from kaika.data.prompts import PromptTemplate, Template
from kaika.data.records import CHARS_PER_TOKEN_CAP, over_char_cap, record_chars, warn_left_out
from kaika.data.segments import encode_conversation
from kaika.data.tokenize import IGNORE_INDEX, TokenizerLike, encode_example
from kaika.errors import KaikaError

log = logging.getLogger(__name__)


@dataclass
class DataReport:
    records: int = 0
    kept: int = 0
    dropped_prompt_too_long: int = 0
    truncated: int = 0
    characters: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    tokens_per_character: float = 0.0
    length_percentiles: dict[str, int] = field(default_factory=dict)
    cutoff_len: int = 0
    conversations: int = 0  # records that were conversations (the others: Alpaca)
    turns_dropped: int = 0  # oldest whole exchanges left out of conversations over cutoff_len
    conversations_shortened: int = 0  # conversations that lost exchanges that way
    dropped_too_long: int = 0  # examples over cutoff_len left out (truncation "drop")
    dropped_huge: int = 0  # records over cutoff_len × CHARS_PER_TOKEN_CAP characters, left out untokenized
    boundary_merges: int = 0  # answer boundaries a whole-text tokenization would have crossed
    train_on: str = "assistant"
    truncation: str = "turns"

    def summary(self) -> str:
        p = self.length_percentiles
        conv = (
            f"{self.conversations} conversations ({self.turns_dropped} oldest exchanges left out of "
            f"{self.conversations_shortened} over cutoff_len; {self.boundary_merges} answer boundaries where "
            "whole-text tokenization would merge across, kept apart); "
            if self.conversations
            else ""
        )
        drop = f"; {self.dropped_too_long} dropped: over cutoff_len" if self.dropped_too_long else ""
        if self.dropped_huge:
            drop += f"; {self.dropped_huge} left out untokenized: over cutoff_len × {CHARS_PER_TOKEN_CAP} characters"
        return (
            f"{self.kept}/{self.records} examples kept ({self.dropped_prompt_too_long} dropped: prompt longer "
            f"than cutoff_len {self.cutoff_len}{drop}; {self.truncated} truncated, EOS kept); {conv}"
            f"{self.tokens_per_character:.2f} tokens/char; length p50/p90/p99/max "
            f"{p.get('p50')}/{p.get('p90')}/{p.get('p99')}/{p.get('max')} tokens; "
            f"{self.supervised_tokens} supervised tokens"
        )


def encode_records(
    records: list[dict],
    template: Template,
    tokenizer: TokenizerLike,
    cutoff_len: int,
    train_on_inputs: bool = False,
    desc: str = "tokenizing",
    *,
    train_on: str = "assistant",
    truncation: str = "turns",
) -> tuple[list[dict[str, list[int]]], DataReport]:
    """Encode every record (Alpaca or conversation); return the training features and a report.

    ``train_on``: ``assistant`` (every answer), ``last`` (the last answer of a conversation) or
    ``all`` (every token; ``train_on_inputs`` means that too). ``truncation``: ``turns`` (cut as
    :func:`kaika.data.segments.encode_conversation` says; an Alpaca response is cut, EOS kept) or
    ``drop`` (an example over ``cutoff_len`` is left out).
    """
    mode = "all" if train_on_inputs else train_on
    report = DataReport(records=len(records), cutoff_len=cutoff_len, train_on=mode, truncation=truncation)
    features, lengths = [], []
    for rec in tqdm(records, desc=desc, disable=len(records) < 2000, unit="ex"):
        if over_char_cap(rec, cutoff_len):  # left out before it is tokenized whole
            warn_left_out(rec.get("where", "a record"), record_chars(rec), cutoff_len)
            report.dropped_huge += 1
            continue
        if isinstance(template, PromptTemplate) and "messages" not in rec:  # Alpaca, kaika's template
            prompt = template.format(rec["instruction"], rec.get("input", ""))
            enc = encode_example(tokenizer, prompt, rec["output"], cutoff_len, mode == "all")
            if enc is not None and enc.truncated and truncation == "drop":
                report.dropped_too_long += 1
                continue
            chars = len(prompt) + len(rec["output"])
        else:
            messages = training_messages(rec)
            report.conversations += "messages" in rec
            try:
                enc = encode_conversation(template, tokenizer, messages, cutoff_len, mode, truncation)
            except KaikaError as e:
                raise KaikaError(f"{rec.get('where', 'a record')}: {e}") from None
            if enc is None and truncation == "drop":
                report.dropped_too_long += 1
                continue
            if enc is not None:
                report.turns_dropped += enc.turns_dropped
                report.conversations_shortened += enc.turns_dropped > 0
                report.boundary_merges += enc.boundary_merges
            chars = sum(len(m["content"]) for m in messages)
        if enc is None:
            report.dropped_prompt_too_long += 1
            continue
        report.characters += chars
        lengths.append(enc.full_length)
        report.tokens += enc.full_length - 1  # EOS is not text
        report.truncated += enc.truncated
        report.supervised_tokens += sum(label != IGNORE_INDEX for label in enc.labels)
        features.append({"input_ids": enc.input_ids, "labels": enc.labels})
    _summarise(report, len(features), lengths)
    return features, report


def _summarise(report: DataReport, kept: int, lengths: list[int]) -> None:
    report.kept = kept
    report.tokens_per_character = report.tokens / max(report.characters, 1)
    if lengths:
        arr = np.asarray(lengths)
        report.length_percentiles = {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 95, 99)}
        report.length_percentiles["max"] = int(arr.max())
