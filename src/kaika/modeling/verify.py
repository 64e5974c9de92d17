"""Is a save what was trained? One rule for every save kaika makes.

A saved adapter (``kaika train``, ``kaika pretrain``) or full model (``kaika pretrain --full``,
``kaika merge``) is reloaded from disk the way its users will load it, run on a few real
examples, and its logits must equal those of the model in memory. The tolerance is one rule
(:func:`logits_tolerance`), relative to the largest logit: float32 on an unquantized model is
bitwise-close; half precision and quantized kernels round differently from one load to the next.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kaika.atomic import ADAPTER_WEIGHTS
from kaika.config import ModelArgs
from kaika.errors import KaikaError
from kaika.modeling.load import ModelSource, load_model

log = logging.getLogger(__name__)

FLOAT32_RTOL = 1e-4
LOW_PRECISION_RTOL = 2e-2


def logits_tolerance(expected: torch.Tensor, dtype: torch.dtype, quantized: bool = False) -> float:
    """How far a faithful reload's logits may be from ``expected`` for a model computing in ``dtype``."""
    rtol = FLOAT32_RTOL if dtype in (torch.float32, torch.float64) and not quantized else LOW_PRECISION_RTOL
    return rtol * max(expected.abs().max().item(), 1.0)


def compare_logits(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str, then: str) -> float:
    """max |got - expected|, or a KaikaError: ``what`` differs, by how much, and ``then`` (what it means)."""
    diff = (got - expected).abs().max().item()
    if not diff <= tol:  # also catches nan
        raise KaikaError(f"verification failed: {what} by {diff:.3g} (tolerance {tol:.3g}); {then}")
    return diff


@torch.no_grad()
def masked_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits at the real (unpadded) positions of ``batch``: (tokens, vocab)."""
    device = next(model.parameters()).device
    mask = batch["attention_mask"]
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device)).logits
    return out.float()[mask.to(device).bool()]


def check_lora_nonzero(adapter_dir: Path) -> None:
    """An adapter whose every LoRA B is zero changes nothing (alpaca-lora's 443-byte adapters)."""
    from safetensors.torch import load_file

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise KaikaError(f"save failed: {path} was not written")
    tensors = load_file(path)
    b = [v for k, v in tensors.items() if "lora_B" in k]
    if not b:
        raise KaikaError(f"save failed: {path} holds no LoRA weights ({len(tensors)} tensors)")
    if all(not v.any() for v in b):
        raise KaikaError(
            f"the adapter in {adapter_dir} is empty: every LoRA B matrix is zero, so it changes "
            "nothing. Did training take any optimizer step (check --max-steps, --lr, data size)?"
        )


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def verify_adapter(
    adapter_dir: Path, trained, model_args: ModelArgs, source: ModelSource, batch: dict[str, Any]
) -> float:
    """Reload the adapter from disk onto a fresh base; its logits must match the trained model's."""
    from peft import PeftModel

    check_lora_nonzero(adapter_dir)
    trained.eval()
    expected = masked_logits(trained, batch)
    base = load_model(model_args, source)
    if model_args.quantization == "none":  # quantized models are placed by device_map and cannot be moved
        base = base.to(next(trained.parameters()).device)
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    got = masked_logits(reloaded, batch)
    del reloaded, base
    tol = logits_tolerance(expected, _model_dtype(trained), model_args.quantization != "none")
    diff = compare_logits(
        got,
        expected,
        tol,
        f"the adapter reloaded from {adapter_dir} gives logits that differ from the trained model",
        "the saved adapter is not the trained one",
    )
    log.info("verified: adapter reloaded from disk reproduces the trained model (max |Δlogit| %.2e)", diff)
    return diff


@torch.no_grad()
def verify_full_model(model_dir: Path, trained, batch: dict[str, Any]) -> float:
    """Reload a saved full model with plain transformers; its logits must match the trained model's."""
    from transformers import AutoModelForCausalLM

    weights = sorted(model_dir.glob("model*.safetensors"))
    if not weights:
        raise KaikaError(f"save failed: no model*.safetensors was written in {model_dir}")
    dtype = _model_dtype(trained)
    trained.eval()
    expected = masked_logits(trained, batch)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(
        next(trained.parameters()).device
    )
    got = masked_logits(reloaded.eval(), batch)
    del reloaded
    diff = compare_logits(
        got,
        expected,
        logits_tolerance(expected, dtype),
        f"the model reloaded from {model_dir} gives logits that differ from the trained model",
        "the saved model is not the trained one",
    )
    log.info("verified: model reloaded from disk reproduces the trained model (max |Δlogit| %.2e)", diff)
    return diff
