"""Fused-QKV LoRA slices: adapt q, k and v of a fused projection separately, as a plain peft LoRA.

BLOOM, GPT-NeoX and GPT-2 compute query, key and value with one projection. A peft LoRA on it
shares one A matrix across q, k and v. To give each chosen slice s ∈ {q, k, v} its own rank-r
LoRA (LLaMA's "q and v, rank r each"), kaika puts one LoRA of rank ``r × n`` (n chosen slices)
on the fused module and keeps its B block-structured::

    A: (n·r, in)      row block j belongs to the j-th chosen slice
    B: (out, n·r)     rows of chosen slice j use only columns j·r…(j+1)·r; rows of unchosen slices are 0

so ``B @ A`` is exactly the stack of the per-slice updates ``B_s @ A_s``. A gradient mask on B
keeps the zeros exactly zero through training (zero gradient → zero Adam moments → zero update;
decoupled weight decay scales zero to zero). lora_alpha is set so that peft's ``lora_alpha / rank``
equals the user's ``alpha / r`` per slice. The artifact is an ordinary
peft adapter: ``PeftModel.from_pretrained`` loads it and ``merge_and_unload`` merges it with no
kaika code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kaika.errors import KaikaError

SLICES = ("q", "k", "v")
FUSED = "fused"  # the default: one LoRA shared by q, k and v (plain peft on the fused module)


@dataclass(frozen=True)
class FusedQKV:
    """Where a model type keeps its fused projection and how q, k and v are laid out in its output."""

    module: str  # module name inside each attention block
    layout: str  # "heads": per-head interleaved [q0 k0 v0 q1 k1 v1 …]; "blocks": [Q | K | V]

    def row_slices(self, out_features: int, num_heads: int) -> torch.Tensor:
        """Index into SLICES (0 = q, 1 = k, 2 = v) of every output row of the fused projection."""
        rows = torch.arange(out_features)
        if self.layout == "heads":
            # (…, num_heads, 3, head_dim) view of the output, as the attention code splits it
            head_dim = out_features // (3 * num_heads)
            return (rows // head_dim) % 3
        return rows // (out_features // 3)


# Per model type, checked against each architecture's attention code in transformers 5:
#   bloom     BloomAttention._reshape: view(batch, seq, num_heads, 3, head_dim)
#   gpt_neox  GPTNeoXAttention: view(batch, seq, -1, 3 * head_size), then chunk(3, dim=-1)
#   gpt2      GPT2Attention: c_attn(x).split(embed_dim, dim=2) (Conv1D, output [Q | K | V])
FUSED_QKV: dict[str, FusedQKV] = {
    "bloom": FusedQKV("query_key_value", "heads"),
    "gpt_neox": FusedQKV("query_key_value", "heads"),
    "gpt2": FusedQKV("c_attn", "blocks"),
}


def parse_slices(values: list[str] | str) -> tuple[str, ...] | None:
    """``["q,v"]``, ``["q", "v"]`` or ``"q,v"`` → ``("q", "v")`` in q, k, v order; ``fused`` → None."""
    if isinstance(values, str):
        values = [values]
    names = [n.strip().lower() for item in values for n in str(item).split(",") if n.strip()]
    if names in ([], [FUSED]):
        return None
    if FUSED in names:
        raise KaikaError("--lora-qkv: fused stands alone (one LoRA shared by q, k and v), not in a list")
    unknown = sorted(set(names) - set(SLICES))
    if unknown:
        raise KaikaError(
            f"--lora-qkv: unknown slice(s) {', '.join(unknown)}; choose from q, k, v (e.g. --lora-qkv q,v) "
            f"or {FUSED}"
        )
    if len(set(names)) != len(names):
        raise KaikaError(f"--lora-qkv: a slice is listed twice in {','.join(names)}")
    return tuple(s for s in SLICES if s in names)


def fused_layout(model_type: str) -> FusedQKV:
    if model_type not in FUSED_QKV:
        raise KaikaError(
            f"--lora-qkv: model type {model_type!r} has no fused QKV projection kaika knows "
            f"(known: {', '.join(sorted(FUSED_QKV))}). If its q, k and v are separate modules, "
            "choose them with --lora-target (e.g. --lora-target q_proj v_proj) and leave --lora-qkv fused"
        )
    return FUSED_QKV[model_type]


def fused_alpha(alpha: float, n_slices: int, use_rslora: bool = False) -> float:
    """The lora_alpha of the rank r·n LoRA so its scaling equals a rank-r LoRA's with ``alpha``.

    peft scales by alpha / rank (alpha / sqrt(rank) with rsLoRA).
    """
    return alpha * (math.sqrt(n_slices) if use_rslora else n_slices)


def lora_shape(
    slices: tuple[str, ...],
    r: int,
    alpha: float,
    model_type: str,
    targets: list[str] | str,
    use_rslora: bool = False,
) -> dict[str, object]:
    """LoraConfig fields that give the fused module rank r·n and alpha so each slice scales by alpha / r.

    When the fused module is the only target these are the plain ``r`` and ``lora_alpha`` (the most
    portable adapter: no per-module fields a loader could ignore); with other targets too
    (all-linear) they are peft's ``rank_pattern`` and ``alpha_pattern``, so the others keep rank r.
    """
    layout = fused_layout(model_type)
    if targets != "all-linear" and layout.module not in targets:
        raise KaikaError(
            f"--lora-qkv {','.join(slices)} adapts slices of {layout.module}, which is not among the LoRA "
            f"targets {', '.join(targets)}: add it to --lora-target (or use auto / all-linear)"
        )
    n = len(slices)
    if targets == [layout.module]:
        return {"r": r * n, "lora_alpha": fused_alpha(alpha, n, use_rslora)}
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {layout.module: r * n},
        "alpha_pattern": {layout.module: fused_alpha(alpha, n, use_rslora)},
    }


def block_mask(row_slices: torch.Tensor, slices: tuple[str, ...], r: int) -> torch.Tensor:
    """Boolean (out, n·r) mask of B's free entries: row i may use column block j iff row i
    belongs to the j-th chosen slice."""
    chosen = torch.tensor([SLICES.index(s) for s in slices])
    column_slice = chosen.repeat_interleave(r)  # (n·r,) slice index owning each column
    return row_slices[:, None] == column_slice[None, :]


class _MaskGrad:
    """Tensor hook: zero the gradient outside the mask (the mask follows the gradient's device)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.mask.device != grad.device:
            self.mask = self.mask.to(grad.device)
        return grad.masked_fill(~self.mask, 0)


def _on(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mask`` on ``weight``'s device; kept on the CPU while the weight has no data yet (a rank that
    loads on the meta device until the engine fills it)."""
    return mask if weight.device.type == "meta" else mask.to(weight.device)


def _sliced_layers(model, layout: FusedQKV):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and name.rsplit(".", 1)[-1] == layout.module:
            yield name, module


def apply_slice_masks(model, slices: tuple[str, ...], r: int) -> int:
    """Make every LoRA on the fused projection block-structured and keep it so during training.

    Zeroes B outside its mask and registers a gradient hook on B (and on the base bias when it is
    trained, so unchosen slices keep their bias). Returns the number of entries held at zero.
    """
    config = model.config
    layout = fused_layout(config.model_type)
    held = 0
    layers = list(_sliced_layers(model, layout))
    if not layers:
        raise KaikaError(f"--lora-qkv: no LoRA was placed on {layout.module}; add it to --lora-target")
    for name, layer in layers:
        for adapter, lora_b in layer.lora_B.items():
            weight = lora_b.weight  # (out, n·r)
            if weight.shape[1] != r * len(slices):
                raise KaikaError(
                    f"{name}: LoRA rank {weight.shape[1]}, expected {r} × {len(slices)} slices "
                    "(the LoRA config did not give the fused module its rank)"
                )
            if weight.shape[0] % (3 * config.num_attention_heads):
                raise KaikaError(
                    f"{name}: {weight.shape[0]} output features do not split into q, k and v over "
                    f"{config.num_attention_heads} heads; --lora-qkv does not know this layout"
                )
            rows = layout.row_slices(weight.shape[0], config.num_attention_heads)
            mask = _on(block_mask(rows, slices, r), weight)
            with torch.no_grad():
                weight.masked_fill_(~mask.to(weight.device), 0)
            weight.register_hook(_MaskGrad(mask))
            layer.kaika_qkv_masks = {**getattr(layer, "kaika_qkv_masks", {}), adapter: mask}
            held += int((~mask).sum())
        bias = getattr(layer.get_base_layer(), "bias", None)
        if bias is not None and bias.requires_grad:
            rows = layout.row_slices(bias.shape[0], config.num_attention_heads)
            keep = _on(torch.isin(rows, torch.tensor([SLICES.index(s) for s in slices])), bias)
            bias.register_hook(_MaskGrad(keep))
            layer.kaika_qkv_bias_keep = keep
    return held


def mask_sharded_slice_grads(model) -> None:
    """The slice masks on gradients that live in pieces (FSDP2 DTensors).

    ``fully_shard`` replaces every parameter with a DTensor of this rank's rows, and the hooks
    :func:`apply_slice_masks` registered on the whole parameters no longer run. After each backward
    (before clipping and the optimizer step) the masks are applied to the sharded gradients instead,
    each laid out as its gradient is (a local slice, no communication). Whole gradients are left to
    the hooks: this is a no-op outside FSDP2."""
    for _, module in model.named_modules():
        targets = [(module.lora_B[a].weight, m) for a, m in getattr(module, "kaika_qkv_masks", {}).items()]
        keep = getattr(module, "kaika_qkv_bias_keep", None)
        if keep is not None:
            targets.append((module.get_base_layer().bias, keep))
        for param, mask in targets:
            grad = param.grad
            if grad is None or not hasattr(grad, "placements"):
                continue
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(mask.cpu(), grad.device_mesh, grad.placements, src_data_rank=None)
            with torch.no_grad():
                grad.to_local().masked_fill_(~local.to_local().to(grad.device), 0)


def held_at_zero(model) -> int:
    """Number of LoRA B entries the slice masks hold at zero (0 without --lora-qkv)."""
    return sum(
        int((~mask).sum())
        for _, module in model.named_modules()
        for mask in getattr(module, "kaika_qkv_masks", {}).values()
    )


def check_block_structure(model, state: dict[str, torch.Tensor] | None = None) -> None:
    """Raise if an entry that the slice mask holds at zero is not exactly zero (a broken mask).

    ``state``: the whole trained weights by parameter name (a sharded run's, gathered), else the
    model's own parameters are read."""
    for name, module in model.named_modules():
        for adapter, mask in getattr(module, "kaika_qkv_masks", {}).items():
            key = f"{name}.lora_B.{adapter}.weight"
            weight = state[key] if state is not None and key in state else module.lora_B[adapter].weight
            leaked = weight.detach()[~mask.to(weight.device)].abs().max() if (~mask).any() else 0
            if leaked != 0:
                raise KaikaError(
                    f"{name}: LoRA B entries outside the chosen q/k/v slices are nonzero "
                    f"(max {float(leaked):.3g}); the gradient mask did not hold"
                )
