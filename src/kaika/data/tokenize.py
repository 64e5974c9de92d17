"""Turn (prompt, response) pairs into ``input_ids`` + ``labels`` with loss masking and EOS.

Three traps of the alpaca-lora recipe are handled here, each by construction:

* EOS is appended explicitly to every example (BLOOM's tokenizer ignores ``add_eos_token``),
  also to examples cut at ``cutoff_len``: the response is truncated, never the EOS.
* Prompt and response are tokenized as separate segments and concatenated, so no BPE merge
  can straddle the boundary (it does with byte-level BPE on Japanese) and the mask is exact.
* Padding uses a real pad token, never EOS, and labels are padded with -100 by position, not
  by comparing ids, so a genuine EOS is always supervised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from kaika.data.prompts import PromptTemplate, Template
from kaika.data.records import CHARS_PER_TOKEN_CAP, over_char_cap, record_chars, warn_left_out
from kaika.errors import KaikaError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


class TokenizerLike(Protocol):
    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def leading_special_ids(tokenizer: TokenizerLike) -> list[int]:
    """The BOS the tokenizer itself would put first (Llama: [bos]; BLOOM, GPT-2: [])."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer.encode("a", add_special_tokens=True)
    return [bos] if ids and ids[0] == bos else []


def encode_text(tokenizer: TokenizerLike, text: str) -> list[int]:
    """Text as text: a literal "</s>" or "<pad>" in the data stays characters. Hugging Face
    tokenizers otherwise turn it into the EOS/pad id, and a response quoting "</s>" would teach
    the model to stop mid-answer."""
    if hasattr(tokenizer, "all_special_tokens"):  # a Hugging Face tokenizer (test fakes have no specials)
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer: TokenizerLike, prompt: str) -> list[int]:
    """Prompt ids exactly as in training; generation must use this too."""
    return leading_special_ids(tokenizer) + encode_text(tokenizer, prompt)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    full_length: int  # before truncation, EOS included


def encode_example(
    tokenizer: TokenizerLike, prompt: str, response: str, cutoff_len: int, train_on_inputs: bool = False
) -> Encoded | None:
    """Token ids and labels for one example, or None when the prompt leaves no room for a response.

    ``labels`` is -100 over the prompt (unless ``train_on_inputs``) and equals ``input_ids``
    over the response and the final EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KaikaError("the tokenizer has no EOS token; the model could never learn to stop")
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = encode_text(tokenizer, response)
    full_length = len(prompt_ids) + len(response_ids) + 1
    room = cutoff_len - len(prompt_ids) - 1  # response tokens that fit with EOS
    if room < 1:
        return None
    truncated = len(response_ids) > room
    response_ids = response_ids[:room] + [eos]
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return Encoded(prompt_ids + response_ids, prompt_labels + response_ids, truncated, full_length)


def resolve_pad_token(tokenizer: Any) -> int:
    """Make sure ``tokenizer.pad_token_id`` is set and is not EOS; return it.

    Preference: the tokenizer's own pad, else unk, else the first id that is not EOS. The pad
    id's identity does not change training (attention mask 0, label -100); what matters is that
    it is never EOS, so nothing downstream can mistake padding for the end of an answer.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer.pad_token_id
    if getattr(tokenizer, "unk_token_id", None) is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
        log.info(
            "the tokenizer has no pad token (or pads with EOS): padding with unk %r", tokenizer.unk_token
        )
        return tokenizer.pad_token_id
    pad_id = 0 if eos != 0 else 1
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    log.info("the tokenizer has no pad or unk token: padding with id %d (masked out, never EOS)", pad_id)
    return pad_id


def pad_batch(
    features: list[dict[str, list[int]]], pad_id: int, side: str = "right", multiple: int = 1
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (and ``labels``, -100 on padding, when the features have
    them) as tensors, padded to the longest row rounded up to ``multiple``.

    ``side`` is explicit, never read off the tokenizer: right for training and scoring (real tokens
    keep their positions and ALiBi offsets), left for batched generation (every row continues from
    its last token). The pad id's identity does not matter (attention mask 0, label -100).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be left or right, got {side!r}")
    longest = max(len(f["input_ids"]) for f in features)
    width = -(-longest // multiple) * multiple
    has_labels = "labels" in features[0]
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[row, cols] = 1
        if has_labels:
            labels[row, cols] = torch.tensor(f["labels"], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if has_labels:
        batch["labels"] = labels
    return batch


class PadCollator:
    """The training collator: ``pad_batch`` on the right, to a multiple of 8 (tensor-core friendly)."""

    def __init__(self, pad_id: int, multiple: int = 8):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_batch(features, self.pad_id, "right", self.multiple)


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
    # segments builds on this module's encoders, so it is imported here, not at the top.
    from kaika.data.conversations import training_messages
    from kaika.data.segments import encode_conversation

    mode = "all" if train_on_inputs else train_on
    report = DataReport(records=len(records), cutoff_len=cutoff_len, train_on=mode, truncation=truncation)
    features, lengths = [], []
    for rec in tqdm(records, desc=desc, disable=len(records) < 2000, unit="ex"):
        if over_char_cap(rec, cutoff_len):
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
    report.kept = len(features)
    report.tokens_per_character = report.tokens / max(report.characters, 1)
    if lengths:
        arr = np.asarray(lengths)
        report.length_percentiles = {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 95, 99)}
        report.length_percentiles["max"] = int(arr.max())
    return features, report
