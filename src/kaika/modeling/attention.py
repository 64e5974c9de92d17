"""Fused attention for BLOOM through ``torch.nn.functional.scaled_dot_product_attention``.

transformers has only an eager attention for BLOOM: ``baddbmm`` for the scores with ALiBi, then a
float32 softmax whose ``[batch, heads, T, T]`` output every layer keeps for backward. At
bloom-560m dimensions and 4 × 512 tokens that is 64 MiB per layer, 1.5 GiB over 24 layers, plus a
transient copy or two per layer in backward. PyTorch's fused SDPA kernels (flash attention on CPU,
memory-efficient attention on CUDA) take an additive float mask, recompute the probabilities
in backward and keep only the output and one log-sum-exp per row.

ALiBi is such an additive mask: the eager path adds ``alibi[b, h, k]`` (``slope_h`` × key
position) and the causal/padding mask (0 or the dtype's minimum) to the scaled scores. Here
the two are summed once per forward into one ``[batch, heads, q, k]`` bias that every layer
shares (the same ``alibi`` and mask objects reach every layer), so the saved state is that one
tensor, not one per layer. The result equals the eager path's up to float rounding
(``tests/modeling/test_attention.py``: logits, loss and LoRA gradients, with padding, packing and a
KV cache).

Anything the fused path does not cover falls back to the eager forward: ``output_attentions``
(the probabilities are never formed) and tensor-parallel slicing (``pretraining_tp > 1`` with
``slow_but_exact``).

BLOOM's GELU is also replaced (:func:`fuse_gelu`): transformers computes its tanh approximation as
eight element-wise operations forward and a dozen backward (each a pass over the ``[tokens × 4h]``
activations), which took a fifth of a bf16 LoRA step on CPU at bloom-560m dimensions (profiled by
``benchmarks/profile_step.py``). ``F.gelu(x, approximate="tanh")`` is the same function in one fused
kernel each way.
"""

from __future__ import annotations

import types
import typing
import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kaika.config import Attention

ATTENTION_CHOICES = typing.get_args(Attention)


class _SharedBias:
    """The summed ALiBi + mask of the current forward, shared by all layers of one model.

    Held through weak references only: the bias lives as long as autograd (or the forward in
    progress) needs it and is rebuilt when another ``alibi`` or mask object arrives.
    """

    def __init__(self):
        self._key: tuple[weakref.ref, weakref.ref | None] | None = None
        self._bias: weakref.ref | None = None
        self.empty_rows = False  # whether the current bias has a query row with every key masked

    def get(self, alibi: torch.Tensor, mask: torch.Tensor | None, batch: int, heads: int, q_len: int):
        if self._key is not None and self._bias is not None:
            alibi_ref, mask_ref = self._key
            bias = self._bias()
            same_mask = mask is None if mask_ref is None else mask_ref() is mask
            if bias is not None and alibi_ref() is alibi and same_mask and bias.shape[2] == q_len:
                return bias
        kv_len = alibi.shape[-1]
        bias = alibi.view(batch, heads, 1, kv_len)
        if mask is None:  # BLOOM always passes a 4D mask; a causal one for callers that do not
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=alibi.device)
            causal = causal.triu(kv_len - q_len + 1)
            mask = torch.zeros(q_len, kv_len, dtype=alibi.dtype, device=alibi.device)
            mask = mask.masked_fill(causal, torch.finfo(alibi.dtype).min)[None, None]
            mask_ref = None
        else:
            mask_ref = weakref.ref(mask)
        bias = (bias + mask).contiguous()  # [batch, heads, q, kv]
        # A query that may see no key at all (a left-padding position) gets uniform weights from the
        # eager softmax, and a gradient as if its scores mattered; the fused kernels' backward
        # treats such a row differently. Rows like that only carry a loss when a pad position's
        # logits are trained on, but to stay exact they take PyTorch's unfused (math) kernel.
        self.empty_rows = bool((mask <= torch.finfo(mask.dtype).min / 2).all(-1).any())
        self._key = (weakref.ref(alibi), mask_ref)
        self._bias = weakref.ref(bias)
        return bias


def _sdpa_forward(
    self,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs,
):
    if output_attentions:
        return self._kaika_eager_forward(
            hidden_states, residual, alibi, attention_mask, layer_past, use_cache, output_attentions, **kwargs
        )
    from transformers.models.bloom.modeling_bloom import dropout_add

    batch, q_len, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [batch, heads, T, head_dim]
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    shared = self._kaika_bias
    bias = shared.get(alibi, attention_mask, batch, self.num_heads, q_len)
    only_math = (
        sdpa_kernel(SDPBackend.MATH) if shared.empty_rows and torch.is_grad_enabled() else nullcontext()
    )
    with only_math:
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=bias,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            scale=self.inv_norm_factor,
        )
    context = context.transpose(1, 2).reshape(batch, q_len, self.hidden_size)
    output = dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None


def set_attention(model, implementation: str) -> int:
    """Give every BLOOM attention layer of ``model`` the ``sdpa`` or ``eager`` forward.

    Returns the number of layers changed (0 for models that are not BLOOM: other architectures
    choose their attention through transformers' own ``attn_implementation``).
    """
    from transformers.models.bloom.modeling_bloom import BloomAttention

    if implementation not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {implementation!r}")
    shared = _SharedBias()
    changed = 0
    for module in model.modules():
        if not isinstance(module, BloomAttention):
            continue
        if not hasattr(module, "_kaika_eager_forward"):
            module._kaika_eager_forward = module.forward
        if implementation == "eager" or (module.pretraining_tp > 1 and module.slow_but_exact):
            module.forward = module._kaika_eager_forward
        else:
            module._kaika_bias = shared
            module.forward = types.MethodType(_sdpa_forward, module)
        changed += 1
    return changed


class FusedGelu(torch.nn.Module):
    """BLOOM's GELU (the tanh approximation, with the same constants up to rounding) as PyTorch's
    fused kernel, forward and backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def fuse_gelu(model) -> int:
    """Give every BLOOM MLP of ``model`` the fused GELU; returns how many were changed (0 for other models)."""
    from transformers.models.bloom.modeling_bloom import BloomMLP

    changed = 0
    for module in model.modules():
        if isinstance(module, BloomMLP) and not isinstance(module.gelu_impl, FusedGelu):
            module.gelu_impl = FusedGelu()
            changed += 1
    return changed
