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
from dataclasses import dataclass
from typing import Any, Protocol

import torch

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
