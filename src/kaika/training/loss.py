"""The training loss without the [tokens × vocab] logits: same value, same gradients, less work.

A causal LM's loss only needs logits where a label is. With the prompt masked and padding, that
is often half the positions or fewer, and BLOOM's 250,880-token output layer costs about as much
as the whole transformer body. So:

* **label positions only**: the decoder runs as usual, but the output layer is applied only to
  the hidden states whose next token carries a label (``logits_to_keep`` given an all-False mask
  makes transformers skip the output layer; the final hidden states are taken from the decoder).
* **chunked, fused cross-entropy**: the output layer and the cross-entropy run over a few hundred
  rows at a time, and each chunk's gradient with respect to the hidden states is computed right
  there (softmax − one-hot), so neither the forward nor the backward ever holds more than one
  chunk of logits, and the logits are never recomputed.
* **exact normalisation**: the summed loss is divided by the supervised-token count of the whole
  accumulated batch that the Trainer passes as ``num_items_in_batch``, which is what the
  transformers loss does too; the result equals the full-logits loss up to float rounding.
* **the model's own logits**: some architectures transform the logits after the output layer
  (Gemma 2 and 3 soft-cap them, Cohere scales them, Granite divides them); the chunked loss applies
  the same transform (:data:`LOGIT_TRANSFORMS`). Before training, :func:`probe_output_layer` checks on
  a few tokens that ``transform(output_layer(decoder output))`` is the model's own logits; when it is
  not (an architecture whose head kaika does not know), training uses the model's own loss, and the
  log says so once: never a silently different objective.

The same module scores held-out text (:func:`token_weighted_loss`, for ``kaika pretrain``'s held-out
set and ``kaika eval loss``): one definition of "the loss" for training and evaluation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from kaika.data.tokenize import IGNORE_INDEX
from kaika.errors import KaikaError
from kaika.training.launch import gathered

# Logits held at once by the chunked loss (fp32 bytes): ~270 rows of BLOOM's 250,880-token vocabulary.
# Measured at bloom-560m dimensions on CPU (docs/performance.md): 128 MiB chunks were no faster and no
# smaller at peak (activations set the peak); 512 MiB raised it by ~0.7 GiB.
CHUNK_BYTES = 256 * 2**20


class LogitTransform:
    """What a model does to ``output_layer(hidden)`` before its softmax: a chain of elementwise steps."""

    def __init__(self, steps: list[tuple[str, float]]):
        self.steps = steps  # (kind, value), applied in order

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        for kind, value in self.steps:
            if kind == "softcap":
                z = torch.tanh(z / value) * value
            elif kind == "scale":
                z = z * value
            else:  # "divide"
                z = z / value
        return z

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __repr__(self) -> str:
        return " then ".join(f"{kind} {value:g}" for kind, value in self.steps) or "none"


# (where the value is read, its name, the step): the transforms of transformers' causal LMs after the
# output layer, in the order their forwards apply them. None or absent: the step is not taken.
LOGIT_TRANSFORMS = (
    ("module", "logit_scale", "scale"),  # Cohere, Cohere 2: logits * self.logit_scale
    ("config", "logits_scaling", "divide"),  # Granite, GraniteMoe: logits / config.logits_scaling
    ("config", "final_logit_softcapping", "softcap"),  # Gemma 2, Gemma 3: cap * tanh(logits / cap)
)


def logit_transform(model) -> LogitTransform:
    base = unwrap(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    steps = []
    for where, name, kind in LOGIT_TRANSFORMS:
        value = getattr(base if where == "module" else config, name, None)
        identity = kind in ("scale", "divide") and value == 1  # Granite's default: nothing to apply
        if isinstance(value, int | float) and not isinstance(value, bool) and not identity:
            steps.append((kind, float(value)))
    return LogitTransform(steps)


@dataclass(frozen=True)
class FastLoss:
    """Which loss levers are on; all on is kaika's default, all off is the plain transformers loss."""

    label_positions_only: bool = True
    chunked: bool = True

    @property
    def any(self) -> bool:
        return self.label_positions_only or self.chunked


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(transform(hidden @ weight.T + bias), targets), chunk by chunk.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) with IGNORE_INDEX rows skipped,
    transform a :class:`LogitTransform` (empty: none). The gradients are formed in the forward pass,
    one chunk of logits at a time, and only they are kept for backward: (N, H) for the hidden states
    (plus (V, H) if the weight is trained).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, transform: LogitTransform | None = None):
        rows = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 for half precision, fp64 stays fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        need_bias = bias is not None and bias.requires_grad
        grad_bias = torch.zeros_like(bias, dtype=acc) if need_bias else None
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            h, t = hidden[start:end], targets[start:end]
            # (n, V): the output layer in the model's dtype, the softmax in fp32, as transformers does.
            logits = torch.nn.functional.linear(h, weight, bias).to(acc)
            valid = t != IGNORE_INDEX
            if transform:  # autograd through the transform, on this chunk only
                loss, grad_logits = _transformed_chunk(logits, t, transform)
                total += loss
                _accumulate(grad_logits, h, weight, start, end, grad_hidden, grad_weight, grad_bias)
                del logits, grad_logits
                continue
            safe_t = t.clamp(min=0)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            # logsumexp and softmax from one exp pass, in place: the (n, V) block is the only one held
            # (torch.logsumexp would allocate a second, and the softmax would exponentiate again).
            peak = logits.amax(dim=-1, keepdim=True)
            sums = logits.sub_(peak).exp_().sum(dim=-1)  # (n,)
            lse = peak.squeeze(1) + sums.log()
            total += ((lse - picked) * valid).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows; in place on the logits.
            grad_logits = logits.div_(sums[:, None])
            grad_logits[torch.arange(end - start, device=t.device), safe_t] -= 1.0
            grad_logits *= valid[:, None]
            _accumulate(grad_logits, h, weight, start, end, grad_hidden, grad_weight, grad_bias)
            del logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(ctx.bias_dtype),
            None,
            None,
            None,
        )


def _accumulate(grad_logits, h, weight, start, end, grad_hidden, grad_weight, grad_bias) -> None:
    """One chunk's d(loss)/d(logits) into the gradients of the hidden states, weight and bias."""
    if grad_hidden is not None:
        grad_hidden[start:end] = grad_logits.to(weight.dtype) @ weight
    if grad_weight is not None:
        grad_weight += grad_logits.T @ h.to(grad_logits.dtype)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


def _transformed_chunk(logits, targets, transform: LogitTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, d(loss)/d(logits)) of one chunk whose logits the model transforms first. Autograd
    through the transform holds a few (n, V) blocks instead of one: such chunks are made smaller."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        loss = torch.nn.functional.cross_entropy(
            transform(z), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def chunk_rows_for(vocab_size: int, chunk_bytes: int = CHUNK_BYTES, blocks: int = 1) -> int:
    """Rows per chunk so that ``blocks`` fp32 (rows, vocab) blocks fit in ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab_size * blocks))


def supports_fast_loss(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs of this era do)."""
    base = unwrap(model)
    return (
        "logits_to_keep" in inspect.signature(base.forward).parameters
        and base.get_output_embeddings() is not None
    )


def unwrap(model):
    """The transformers model inside DDP / peft wrappers."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_output(model, model_inputs: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """(B, T, H) final hidden states (after the last norm), the output layer applied nowhere.

    ``logits_to_keep`` given an all-False mask makes transformers skip the output layer; the decoder's
    output is taken by a forward hook on it.
    """
    base = unwrap(model)
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = base.get_decoder().register_forward_hook(grab)
    try:
        model(**model_inputs, logits_to_keep=torch.zeros_like(keep), use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def causal_lm_loss_sum(
    model,
    inputs: dict[str, Any],
    levers: FastLoss = FastLoss(),
    chunk_bytes: int = CHUNK_BYTES,
    transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses over supervised positions, their count) for one micro-batch.

    ``model`` is what the Trainer calls (possibly DDP- and peft-wrapped); it is called through its own
    forward, so DDP's gradient hooks and peft's adapters behave exactly as in a plain forward.
    ``transform`` is what the model does to its logits after the output layer (default: read off the
    model, :func:`logit_transform`).
    """
    labels = inputs["labels"]
    # Position i predicts token i+1: its target is labels[:, i + 1]; the last position predicts nothing.
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T)
    count = keep.sum()
    head = unwrap(model).get_output_embeddings()
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    if levers.chunked:
        transform = logit_transform(model) if transform is None else transform
        hidden = decoder_output(model, model_inputs, keep)  # (B, T, H)
        if levers.label_positions_only:
            hidden, flat_targets = hidden[keep], targets[keep]  # (N, H), (N,)
        else:
            hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        # The output layer whole (FSDP2 shards and ZeRO-3 partitions are gathered for the moment; the
        # chunked loss keeps gradients, not the weight, for backward).
        with gathered(head.weight, head.bias) as (weight, bias):
            # A transformed chunk holds about four (n, V) blocks (logits, transformed, softmax, gradient).
            rows = chunk_rows_for(weight.shape[0], chunk_bytes, blocks=4 if transform else 1)
            loss_sum = LinearCrossEntropy.apply(hidden, weight, bias, flat_targets, rows, transform)
        return loss_sum, count
    # Label positions only, one (N, V) block of logits: transformers slices with the boolean mask.
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits.float()  # (N, V)
    loss_sum = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    return loss_sum, count


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def probe_output_layer(model, transform: LogitTransform | None = None) -> str | None:
    """None when ``transform(output_layer(decoder output))`` reproduces the model's own logits on a
    few tokens (so the chunked loss is the model's loss); else why not, for the log."""
    base = unwrap(model)
    transform = logit_transform(model) if transform is None else transform
    head = base.get_output_embeddings()
    was_training = model.training
    model.eval()  # no dropout: the two forwards must be the same computation
    try:
        own, hidden = _own_logits_and_hidden(model, head)
        with gathered(head.weight, head.bias) as (weight, bias):
            ours = transform(torch.nn.functional.linear(hidden, weight, bias).float())
            dtype = weight.dtype
    except Exception as e:  # a head or forward kaika's loss cannot drive: the model's own loss instead
        return f"kaika's loss cannot run on it ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    scale = own.abs().max().item()
    rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 4 * torch.finfo(dtype).eps
    diff = (own - ours).abs().max().item()
    if diff <= rtol * max(scale, 1.0):
        return None
    return (
        f"its logits are not its output layer's with the known transforms ({transform}) applied "
        f"(max difference {diff:.3g} on logits up to {scale:.3g})"
    )


def _own_logits_and_hidden(model, head):
    """The model's own logits and its decoder output for a dozen ids spread over the vocabulary."""
    with gathered(head.weight) as (weight,):
        vocab, device = weight.shape[0], weight.device
    ids = (torch.arange(3, 3 + 12, device=device) * 7919 % vocab)[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    own = model(**inputs, use_cache=False).logits.float()
    return own, decoder_output(model, inputs, torch.ones_like(ids, dtype=torch.bool))


@dataclass
class LossResult:
    loss: float  # mean NLL per supervised token, nats
    perplexity: float
    tokens: int  # supervised tokens


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


@torch.no_grad()
def token_weighted_loss(model, batches: Iterable[dict[str, torch.Tensor]]) -> LossResult:
    """Next-token NLL summed over every supervised token of ``batches``, divided by their number.

    Not a mean of per-batch means, so it depends neither on the batch size nor on padding; and it
    is computed from the model's own logits, so whatever the model does after its output layer
    (soft-capping, logit scaling) is part of it. Only the positions that carry a target are
    projected onto the vocabulary when the model takes ``logits_to_keep``.
    """
    device = next(model.parameters()).device
    keep_positions = _accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            targets = batch["labels"][:, 1:]  # (B, T-1): the logits at position t predict token t+1
            columns = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
            if not len(columns):
                continue
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            if keep_positions:  # [B, positions, vocab] logits, not [B, T, vocab]
                logits = model(**inputs, logits_to_keep=columns.to(device)).logits
            else:
                logits = model(**inputs).logits[:, columns.to(device)]
            tgt = targets[:, columns].to(device)
            total += torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((tgt != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if not count:
        raise KaikaError("no supervised token to score: every example was dropped or has an empty response")
    mean = total / count
    return LossResult(mean, math.exp(mean) if mean < 700 else math.inf, count)
