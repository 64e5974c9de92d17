"""Is a save what was trained? One rule for every save kaika makes: like is compared with like.

An adapter (``kaika train``, ``kaika pretrain``) or a whole model (``kaika pretrain --full``,
``kaika merge``) is checked right after it is written, before it is moved into place:

1. **the tensors**: every tensor in the written safetensors equals the one in memory, bit for bit
   (same dtype, same values); an adapter's config reloads as the config in memory;
2. **the logits**: the save is loaded the way its users load it (a fresh base + ``PeftModel.
   from_pretrained``, or ``from_pretrained`` of the model), and the same loaded model is given the
   weights in memory too; both compute the same batch the same way, so their logits must agree to the
   last bit on a deterministic device (the bound is the run-to-run noise of the device, measured).

Never the model in its training state against a reloaded one under a hand-set tolerance: a model
trained under mixed precision (the Trainer wraps its forward in autocast) computes its LoRA path in
another precision than any reloaded copy, and a bf16 run would be refused for that alone.

One exception, by design: a PiSSA/OLoRA adapter is saved *converted* (another rank, another base), so
no tensor of it is in memory. :func:`verify_converted_adapter` checks what it computes instead, layer by
layer on the weights, within a bound derived from the base dtype's rounding (``kaika.modeling.initial``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kaika.atomic import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from kaika.config import ModelArgs
from kaika.errors import KaikaError
from kaika.modeling.load import DTYPES, ModelSource, load_model, one_cpu_packing

log = logging.getLogger(__name__)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# The logit check's floor, relative to the largest logit: float32 noise of one reduction reordered.
FLOOR_RTOL = 1e-6


def check_tensors(
    saved: dict[str, torch.Tensor],
    memory: dict[str, torch.Tensor],
    where: Path,
    cast: bool = False,
    tied: set[str] = frozenset(),
) -> None:
    """Every saved tensor equals its in-memory original bit for bit, and none is missing from the
    file but those in ``tied`` (an output layer tied to the embeddings is saved once).
    ``cast``: the save was written in another dtype on purpose; the in-memory tensor rounded to it
    must then give the saved one exactly."""
    extra = sorted(set(saved) - set(memory))
    missing = sorted(set(memory) - set(saved) - set(tied))
    if extra or missing:
        names = extra or missing
        what = "tensors the model in memory does not have" if extra else "no tensor for"
        raise KaikaError(
            f"verification failed: {where} holds {what}: {', '.join(names[:3])}{'…' if len(names) > 3 else ''}; "
            "the save is not the trained model"
        )
    for name, tensor in saved.items():
        mine = memory[name].detach().cpu()
        mine = mine.to(tensor.dtype) if cast else mine
        if tensor.dtype != mine.dtype or tensor.shape != mine.shape or not torch.equal(tensor, mine):
            raise KaikaError(
                f"verification failed: tensor {name} in {where} is not the one in memory "
                f"({tensor.dtype} {tuple(tensor.shape)} on disk, {mine.dtype} {tuple(mine.shape)} in memory); "
                "the save is not the trained model"
            )


@torch.no_grad()
def masked_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits at the real (unpadded) positions of ``batch``: (tokens, vocab)."""
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask).logits
    return out.float()[mask.bool()]


def compare_logits(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str, then: str) -> float:
    """max |got - expected|, or a KaikaError: ``what`` differs, by how much, and ``then`` (what it means)."""
    return check_within((got - expected).abs().max().item(), tol, what, then)


def check_within(diff: float, tol: float, what: str, then: str) -> float:
    if not diff <= tol:  # also catches nan
        raise KaikaError(f"verification failed: {what} by {diff:.3g} (tolerance {tol:.3g}); {then}")
    return diff


def same_computation(model, batch, with_saved, with_memory) -> tuple[float, float, float]:
    """(max |Δlogit| between the saved and the in-memory weights, the bound, the device's noise).

    ``with_saved()`` / ``with_memory()`` put one or the other set of weights into ``model``. The noise
    is the difference between two runs of the same weights: 0 on a deterministic device."""
    model.eval()
    with_memory()
    expected = masked_logits(model, batch)
    noise = (masked_logits(model, batch) - expected).abs().max().item()
    with_saved()
    got = masked_logits(model, batch)
    tol = max(4 * noise, FLOOR_RTOL * max(expected.abs().max().item(), 1.0))
    return (got - expected).abs().max().item(), tol, noise


# --------------------------------------------------------------------------- adapters


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


def check_adapter_config(adapter_dir: Path, trained) -> None:
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    mine = json.loads(json.dumps(trained.peft_config["default"].to_dict(), default=sorted))
    keys = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "bias", "use_rslora")
    differ = [k for k in keys if _normal(config.get(k)) != _normal(mine.get(k))]
    if differ:
        raise KaikaError(
            f"verification failed: {adapter_dir / ADAPTER_CONFIG} does not describe the adapter in memory "
            f"({', '.join(f'{k}: {config.get(k)!r} vs {mine.get(k)!r}' for k in differ)})"
        )


def _normal(value):
    return sorted(value) if isinstance(value, list | set | tuple) else value


@torch.no_grad()
def verify_adapter(
    adapter_dir: Path,
    trained,
    model_args: ModelArgs,
    source: ModelSource,
    batch: dict[str, Any],
    memory: dict[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> float:
    """The adapter written to ``adapter_dir`` is ``trained``'s: tensors, config, and logits of a fresh
    base with the reloaded adapter against the same base with the in-memory one.

    ``memory``: the trained adapter's tensors as peft names them in the file (default: read off
    ``trained``; a sharded run passes them gathered). ``device``: where the fresh base computes
    (default: where ``trained`` is). A GPU without room for a second base (the trained one is still
    held) falls back to the CPU: the check is the same computation twice, wherever it runs."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    check_lora_nonzero(adapter_dir)
    memory = get_peft_model_state_dict(trained) if memory is None else memory
    check_tensors(load_file(adapter_dir / ADAPTER_WEIGHTS), memory, adapter_dir / ADAPTER_WEIGHTS)
    check_adapter_config(adapter_dir, trained)
    device = torch.device(device) if device is not None else next(trained.parameters()).device
    try:
        diff = _reloaded_reproduces(adapter_dir, memory, model_args, source, batch, device)
    except torch.OutOfMemoryError:
        if device.type == "cpu":
            raise
        log.warning(
            "verification: no room on %s for a second copy of the base next to the trained one; "
            "checking on the CPU instead (slower, the same check)",
            device,
        )
        _free_accelerator_memory()
        diff = _reloaded_reproduces(adapter_dir, memory, model_args, source, batch, torch.device("cpu"))
    log.info("verified: the saved adapter is the trained one (tensors bit for bit; max |Δlogit| %.2g)", diff)
    return diff


def _reloaded_reproduces(adapter_dir, memory, model_args, source, batch, device: torch.device) -> float:
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    quantized_on_cpu = device.type == "cpu" and model_args.quantization != "none"
    base = load_model(model_args, source, device_map={"": "cpu"} if quantized_on_cpu else None)
    one_cpu_packing(base)  # one kernel for every forward of the comparison
    if model_args.quantization == "none":  # quantized models are placed by device_map and cannot be moved
        base = base.to(device)
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    saved = {k: v.detach().clone() for k, v in get_peft_model_state_dict(reloaded).items()}
    diff, tol, _ = same_computation(
        reloaded,
        batch,
        with_saved=lambda: set_peft_model_state_dict(reloaded, saved),
        with_memory=lambda: set_peft_model_state_dict(reloaded, memory),
    )
    return check_within(
        diff,
        tol,
        f"the adapter reloaded from {adapter_dir} gives logits that differ from the adapter in memory "
        "(same base, same computation)",
        "the saved adapter is not the trained one",
    )


@torch.no_grad()
def verify_converted_adapter(
    adapter_dir: Path,
    trained,
    initial: dict[str, torch.Tensor],
    model_args: ModelArgs,
    source: ModelSource,
) -> float:
    """A PiSSA/OLoRA adapter saved converted (:mod:`kaika.modeling.initial`): its tensors are not the
    ones in memory by design, so the check is on what they compute. The adapter trained (it is not
    its initial value); the config is the converted one; and on a fresh, unmodified base the reloaded
    adapter gives every adapted layer the weight the trained model computes with."""
    from peft import PeftModel, get_peft_model_state_dict

    from kaika.modeling.initial import check_conversion, converted_config

    memory = get_peft_model_state_dict(trained)
    if all(torch.equal(memory[k].cpu(), v) for k, v in initial.items() if k in memory):
        raise KaikaError(
            f"the adapter in {adapter_dir} is empty: it still holds its initial value, so it changes nothing. "
            "Did training take any optimizer step (check --max-steps, --lr, data size)?"
        )
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    mine = converted_config(json.loads(json.dumps(trained.peft_config["default"].to_dict(), default=sorted)))
    keys = (
        "r",
        "lora_alpha",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "init_lora_weights",
    )
    differ = [k for k in keys if _normal(config.get(k)) != _normal(mine.get(k))]
    if differ:
        raise KaikaError(
            f"verification failed: {adapter_dir / ADAPTER_CONFIG} does not describe the converted adapter "
            f"({', '.join(f'{k}: {config.get(k)!r} vs {mine.get(k)!r}' for k in differ)})"
        )
    base = load_model(model_args, source)
    one_cpu_packing(base)
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    dtype = next(p.dtype for n, p in base.named_parameters() if p.is_floating_point())
    worst = check_conversion(reloaded, trained, dtype)
    log.info(
        "verified: the saved adapter on the unmodified base gives the trained weights (differences up to %.2g "
        "of an entry's size: the residual base was rounded to %s)",
        worst,
        DTYPE_NAMES.get(dtype, dtype),
    )
    return worst


def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- whole models


@torch.no_grad()
def verify_full_model(
    model_dir: Path, trained, batch: dict[str, Any], model_args: ModelArgs | None = None, cast: bool = False
) -> float:
    """The model written to ``model_dir`` is ``trained``: tensors bit for bit, and the model reloaded
    from disk (as its users load it, in the dtype it was written in) computes the same logits with its
    own weights as with the in-memory ones."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise KaikaError(f"save failed: no model*.safetensors was written in {model_dir}")
    memory = trained.state_dict()
    saved: dict[str, torch.Tensor] = {}
    for f in files:
        saved.update(load_file(f))
    check_tensors(saved, memory, model_dir, cast, tied_names(trained))
    floats = [t.dtype for t in saved.values() if t.is_floating_point()]
    dtype = max(set(floats), key=floats.count)  # the dtype the weights were written in
    args = model_args or ModelArgs(base_model=str(model_dir))
    if dtype not in DTYPE_NAMES:
        raise KaikaError(
            f"verification failed: {model_dir} was written in {dtype}, which kaika does not load"
        )
    reloaded = load_model(
        replace(
            args, base_model=str(model_dir), gguf_file=None, quantization="none", dtype=DTYPE_NAMES[dtype]
        )
    )
    reloaded = reloaded.to(next(trained.parameters()).device)
    own = {k: v.detach().clone() for k, v in reloaded.state_dict().items()}
    diff, tol, _ = same_computation(
        reloaded,
        batch,
        with_saved=lambda: reloaded.load_state_dict(own),
        with_memory=lambda: reloaded.load_state_dict(memory, strict=False),
    )
    check_within(
        diff,
        tol,
        f"the model reloaded from {model_dir} gives logits that differ with its own weights and with "
        "the weights in memory",
        "the saved model is not the trained one",
    )
    log.info("verified: the saved model is the trained one (tensors bit for bit; max |Δlogit| %.2g)", diff)
    return diff


def tied_names(model) -> set[str]:
    """State-dict names of tensors that share storage with an earlier one (saved once, under it)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel():
            tied.add(name)
        seen.setdefault(ptr, name)
    return tied
