"""Packing: many tokenized documents into full rows of ``cutoff_len`` tokens, without padding.

The rows use the format transformers knows for packed sequences: ``position_ids`` restart at 0
where each document (or each piece of a document split at a row end) begins. In ``document``
mode attention must not cross those boundaries:

- models with position embeddings (Llama, Qwen, Mistral…) get that from transformers itself:
  without an ``attention_mask`` or KV cache, ``create_causal_mask`` reads the restarts in ``position_ids``
  and builds a block-diagonal causal mask;
- BLOOM has no position ids: it drops ``position_ids`` and builds ALiBi from the 2D attention
  mask, so "padding-free" packing by position ids alone leaks attention across documents.
  :func:`enable_packed_attention` turns ``position_ids`` into a block-diagonal causal 4D mask
  (which BLOOM accepts as is) and builds ALiBi from per-document positions read off that mask.

Labels: every token is a target except the first token of each segment, which no token of
its own segment precedes (predicting it from the previous document's EOS is no part of either
document). So the loss of a packed row equals the sum of the losses of its documents run one by
one. ``stream`` mode is plain continuous-stream training instead: causal attention over the
whole row, EOS the only separator, every token after the first a target.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

import torch

from kaika.data.tokenize import IGNORE_INDEX
from kaika.errors import KaikaError

PACKING_MODES = ("document", "stream")


def pack_documents(
    docs: Iterable[list[int]], cutoff_len: int, eos_id: int, pad_id: int, mode: str = "document"
) -> list[dict[str, list[int]]]:
    """Concatenate ``docs`` (each followed by EOS) into rows of exactly ``cutoff_len`` tokens.

    A document longer than the space left in a row continues at the start of the next row, as a
    new segment (its positions restart). The last row, if not full, is filled with ``pad_id``
    as a segment of its own with ignored labels, so no text is dropped.
    Each row: ``input_ids``, ``labels``, ``position_ids`` (all of length ``cutoff_len``).
    """
    if mode not in PACKING_MODES:
        raise KaikaError(f"unknown packing mode {mode!r}; use one of {', '.join(PACKING_MODES)}")
    if cutoff_len < 2:
        raise KaikaError(f"cutoff_len must be at least 2 to pack documents, got {cutoff_len}")
    rows: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc in docs:
        tokens = [*doc, eos_id]
        start = 0
        while start < len(tokens):
            take = min(cutoff_len - len(ids), len(tokens) - start)
            piece = tokens[start : start + take]
            ids += piece
            # The segment's first token has no predecessor inside the segment: no target there.
            first = IGNORE_INDEX if mode == "document" else piece[0]
            labels += [first, *piece[1:]]
            positions += list(range(take))
            start += take
            if len(ids) == cutoff_len:
                rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
                ids, labels, positions = [], [], []
    if ids:
        fill = cutoff_len - len(ids)
        rows.append(
            {
                "input_ids": ids + [pad_id] * fill,
                "labels": labels + [IGNORE_INDEX] * fill,
                "position_ids": positions + list(range(fill)),
            }
        )
    return rows


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 per segment → (B, T) segment numbers 0, 1, 2…"""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts.long().cumsum(-1) - 1


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) restarting positions → (B, 1, T, T) additive mask: 0 where query i may see key j
    (same segment, j <= i), the dtype's minimum elsewhere. The form BLOOM adds to its scores."""
    seg = segment_ids(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class PackedCollator:
    """Stacks packed rows (all ``cutoff_len`` long) into tensors; ``stream`` rows lose their
    ``position_ids`` so every model attends causally over the whole row."""

    def __init__(self, mode: str = "document"):
        self.mode = mode

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "labels", "position_ids") if self.mode == "document" else ("input_ids", "labels")
        return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in keys}


# --------------------------------------------------------------------------- instruction examples


def pack_examples(features: list[dict[str, list[int]]], cutoff_len: int) -> list[dict[str, list[int]]]:
    """Pack whole tokenized instruction examples into rows of at most ``cutoff_len`` tokens.

    Best-fit decreasing: examples, longest first, each go into the row with the least room that
    still holds them (no example is split, so none loses its EOS). Each row carries
    ``position_ids`` restarting at 0 per example, which :func:`enable_packed_attention` turns into
    block-diagonal attention. The first label of every example is ignored: it would be predicted
    from the previous example's EOS (with the prompt masked it is ignored already). So a packed
    row's summed loss is exactly the sum of its examples' losses run one by one.
    """
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    rows: list[list[int]] = []  # example indices per row
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        n = len(features[i]["input_ids"])
        if n > cutoff_len:
            raise KaikaError(f"example {i} has {n} tokens, more than cutoff_len {cutoff_len}")
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            free, row = cutoff_len - n, len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, row))
    packed = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            f = features[i]
            ids += f["input_ids"]
            labels += [IGNORE_INDEX, *f["labels"][1:]]
            positions += range(len(f["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


class PackedExamplesCollator:
    """Batches rows of :func:`pack_examples` (or plain examples: one segment each), padded on the
    right to the longest row (a multiple of ``pad_to_multiple_of``). The padding is a segment of its
    own with ignored labels, and no ``attention_mask`` is passed: the segments are the mask."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8):
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        length = -(-longest // self.multiple) * self.multiple
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            n, fill = len(r["input_ids"]), length - len(r["input_ids"])
            batch["input_ids"].append([*r["input_ids"], *[self.pad_id] * fill])
            batch["labels"].append([*r["labels"], *[IGNORE_INDEX] * fill])
            positions = list(r.get("position_ids") or range(n))
            batch["position_ids"].append([*positions, *range(fill)])
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# --------------------------------------------------------------------------- BLOOM


def _alibi_from_block_mask(original):
    """Wrap BloomModel.build_alibi_tensor: for a 4D block mask, ALiBi positions restart per segment."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    def build_alibi_tensor(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
        if attention_mask.ndim != 4:
            return original(attention_mask, num_heads, dtype)
        # Row j of a block-causal mask sees exactly the keys from its segment's start to j, so
        # (visible keys - 1) is j's position inside its segment.
        positions = (attention_mask[:, 0] == 0).sum(-1) - 1  # (B, T)
        batch, length = positions.shape
        slopes = _get_alibi_slopes(num_heads, attention_mask.device)  # (H,)
        alibi = slopes[None, :, None] * positions[:, None, :].to(slopes.dtype)  # (B, H, T)
        return alibi.reshape(batch * num_heads, 1, length).to(dtype)

    build_alibi_tensor.kaika_packed = True
    return build_alibi_tensor


def _packed_inputs(module, args, kwargs):
    """Forward pre-hook: a packed row (``position_ids``, no ``attention_mask``) runs without a KV
    cache (transformers only reads packing from positions when there is none) and, on BLOOM,
    with the block-diagonal mask built from the positions."""
    if kwargs.get("position_ids") is None or kwargs.get("attention_mask") is not None:
        return args, kwargs
    kwargs["use_cache"] = False
    if getattr(module, "_kaika_bloom", False):
        dtype = module.get_input_embeddings().weight.dtype
        kwargs["attention_mask"] = block_causal_mask(kwargs.pop("position_ids"), dtype)
    return args, kwargs


def enable_packed_attention(model) -> None:
    """Make ``model(input_ids, position_ids=…)`` attend within segments only, for any model.

    Installs, once, a forward pre-hook on ``model`` (the object the Trainer calls) that turns
    the cache off for packed rows: with no cache and no attention mask, transformers builds a
    block-diagonal causal mask from the restarts in ``position_ids``. BLOOM reads no positions,
    so there the hook builds :func:`block_causal_mask` itself, and BloomModel's
    ``build_alibi_tensor`` (an overridable method) is made to read per-segment positions off it.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "model_type", None) == "bloom":
        bloom = inner.transformer
        if not getattr(bloom.build_alibi_tensor, "kaika_packed", False):
            bloom.build_alibi_tensor = _alibi_from_block_mask(bloom.build_alibi_tensor)
        model._kaika_bloom = True
    if not getattr(model, "_kaika_packed_hook", None):
        model._kaika_packed_hook = model.register_forward_pre_hook(_packed_inputs, with_kwargs=True)
