"""LoraArgs → a peft LoRA on the base model. Plain peft all the way, so the adapter is standard."""

from __future__ import annotations

import logging
import warnings

import torch

from kaika.config import LoraArgs
from kaika.errors import KaikaError
from kaika.modeling.initial import INITIAL_ATTR
from kaika.modeling.load import one_cpu_packing
from kaika.modeling.qkv import apply_slice_masks, lora_shape, parse_slices

log = logging.getLogger(__name__)

# LoRA targets where peft's own table (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) has
# no entry or a choice we do not want; everything else defers to peft. Each row: the query and value
# projections (the LoRA paper's choice), or the fused projection that holds them.
EXTRA_TARGET_MODULES: dict[str, list[str]] = {
    "qwen3": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "cohere": ["q_proj", "v_proj"],
    "cohere2": ["q_proj", "v_proj"],
    "granite": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "smollm3": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],  # q, k and v in one Linear
}
# For a model type neither table knows: the first of these whose modules the model has.
TARGET_NAME_PATTERNS = (("q_proj", "v_proj"), ("qkv_proj",), ("query_key_value",), ("c_attn",), ("Wqkv",))


def default_target_modules(model_type: str, module_names: set[str] | None = None) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    targets = EXTRA_TARGET_MODULES.get(model_type) or PEFT_TABLE.get(model_type)
    if not targets and module_names:
        targets = next((p for p in TARGET_NAME_PATTERNS if set(p) <= module_names), None)
    if not targets:
        raise KaikaError(
            f"no default LoRA target modules for model type {model_type!r}: "
            "pass --lora-target all-linear or module names (e.g. --lora-target q_proj v_proj)"
        )
    return list(targets)


def adaptable_names(model) -> set[str]:
    """Leaf names of the modules peft's LoRA can adapt (Linear, GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)}


def check_targets(model, targets: list[str] | str) -> None:
    """Every named target must exist: peft adapts the names it finds and ignores the rest silently.
    The output layer is refused: kaika's loss computes the logits from its frozen weight."""
    if isinstance(targets, str):
        return
    names = adaptable_names(model)
    missing = [t for t in targets if t not in names]
    head = model.get_output_embeddings()
    head_name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head), None)
    if head_name in targets:
        raise KaikaError(
            f"--lora-target {head_name}: the output layer is not adapted by kaika (its loss reads the "
            "layer's weight directly, and a LoRA there would not train); choose attention or MLP modules"
        )
    if missing:
        raise KaikaError(
            f"--lora-target: this model has no module named {', '.join(missing)}. Linear modules of this "
            f"model: {', '.join(sorted(names)) or 'none found'}"
        )


def resolve_targets(args: LoraArgs, model_type: str, module_names: set[str] | None = None) -> list[str] | str:
    names = [t.strip() for item in args.target for t in item.split(",") if t.strip()]
    if names in ([], ["auto"]):
        return default_target_modules(model_type, module_names)
    if names == ["all-linear"]:
        return "all-linear"
    if "auto" in names or "all-linear" in names:
        raise KaikaError("--lora-target: auto and all-linear stand alone, not in a list of module names")
    return names


# --lora-init → peft's init_lora_weights. PiSSA by exact SVD (not peft's randomised "pissa_niter_N"):
# the same base gives the same initial adapter on every process and on a resume.
PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# Inits that move part of each adapted base weight into the adapter (the base keeps W - scale·B₀A₀).
MUTATING_INITS = ("pissa", "olora")


def mutates_base(args: LoraArgs) -> bool:
    return args.init in MUTATING_INITS


def check_lora_choices(args: LoraArgs, quantization: str, sharded: bool, command: str) -> None:
    """The combinations of --lora-variant, --lora-init, --loraplus-lr-ratio and the rest that kaika
    cannot train or save correctly, refused before anything loads, naming both sides."""
    init = f"--lora-init {args.init}"
    slices = parse_slices(args.qkv)
    if slices and args.variant == "dora":
        raise KaikaError(
            f"--lora-variant dora with --lora-qkv {','.join(slices)}: DoRA trains a magnitude for every output "
            "row of the fused projection, so the slices left out would change too. Use --lora-qkv fused, or "
            "--lora-variant lora/rslora"
        )
    if args.variant == "dora" and quantization == "8bit" and not torch.cuda.is_available():
        # peft's DoRA dequantizes the weight at every forward and, on a CPU, puts it back as a copy that
        # has lost its quantization scales; bitsandbytes' next forward then fails.
        raise KaikaError(
            "--lora-variant dora with --quantization 8bit on a CPU: peft's DoRA and bitsandbytes' 8-bit "
            "layers lose the quantization scales there. Use --quantization 4bit (or none) for DoRA on a CPU"
        )
    if not mutates_base(args):
        return
    if args.bias != "none":
        raise KaikaError(
            f"{init} with --lora-bias {args.bias}: the save converts the adapter to a plain LoRA on the "
            "unmodified base, and that conversion keeps only the LoRA matrices (the trained biases would be "
            "lost). Use --lora-bias none with it, or --lora-init default"
        )
    if args.variant == "dora":
        raise KaikaError(
            f"{init} with --lora-variant dora: the saved adapter is converted to a plain LoRA on the unmodified "
            "base, and that conversion has no place for DoRA's magnitudes. Use --lora-init default or gaussian "
            "with DoRA"
        )
    if slices:
        raise KaikaError(
            f"{init} with --lora-qkv {','.join(slices)}: {args.init} starts from a factorisation of the whole "
            "fused weight, which the slice masks would cut. Use --lora-qkv fused, or --lora-init default"
        )
    if quantization != "none":
        raise KaikaError(
            f"{init} with --quantization {quantization}: {args.init} rewrites the base weights it adapts, which "
            "a quantized base cannot hold exactly (the saved adapter would not reproduce the trained model). "
            "Train with --lora-init default on a quantized base, or drop --quantization"
        )
    if sharded:
        raise KaikaError(
            f"{init} under FSDP or DeepSpeed ZeRO-3: the adapter's conversion at save needs whole tensors "
            "of the initial adapter on one process. Use DDP (configs/accelerate/ddp.yaml) or --lora-init default"
        )
    if command == "dpo":
        raise KaikaError(
            f"{init} with kaika dpo: the reference model is the base with the adapter switched off, and "
            f"{args.init} has moved part of the base into the adapter, so the reference would not be the base. "
            "Use --lora-init default (or start from an SFT run with --from, which is saved as a plain LoRA)"
        )


def warn_unused_lora(args: LoraArgs, why: str, ratio_too: bool) -> None:
    """--lora-variant / --lora-init (and --loraplus-lr-ratio, when nothing is LoRA) given where no
    fresh LoRA is built: said, not silently dropped."""
    unused = [f"--lora-variant {args.variant}"] if args.variant != "lora" else []
    unused += [f"--lora-init {args.init}"] if args.init != "default" else []
    unused += (
        [f"--loraplus-lr-ratio {args.loraplus_lr_ratio:g}"] if ratio_too and args.loraplus_lr_ratio else []
    )
    if unused:
        log.warning("%s: ignored with %s (no new LoRA is made)", ", ".join(unused), why)


def peft_config(args: LoraArgs, model_type: str, module_names: set[str] | None = None):
    from peft import LoraConfig, TaskType

    targets = resolve_targets(args, model_type, module_names)
    slices = parse_slices(args.qkv)
    rslora = args.variant == "rslora"
    shape = {"r": args.r, "lora_alpha": args.alpha}
    if slices:  # q/k/v slices: rank r × slices on the fused module, see kaika.modeling.qkv
        shape = lora_shape(slices, args.r, args.alpha, model_type, targets, rslora)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        lora_dropout=args.dropout,
        bias=args.bias,
        target_modules=targets,
        use_dora=args.variant == "dora",
        use_rslora=rslora,
        init_lora_weights=PEFT_INIT[args.init],
        **shape,
    )


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant), with input grads for frozen embeddings."""
    # transformers >= 5.2x names it activation checkpointing; older 5.x only has the old name.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def apply_lora(model, args: LoraArgs, gradient_checkpointing: bool = False, mixed_precision: bool = False):
    """Wrap ``model`` in a trainable peft LoRA; report the trainable-parameter count.

    ``mixed_precision``: training will run under autocast (bf16, or fp16 with its GradScaler); every
    trained tensor is then stored in float32 (peft does so for LoRA's own weights; the base biases that
    ``--lora-bias all|lora_only`` trains are cast here: the GradScaler refuses fp16 gradients, and bf16
    weights would round small updates away)."""
    from peft import prepare_model_for_kbit_training

    if is_quantized(model):
        one_cpu_packing(model)
        # peft casts the layers it leaves unquantized (norms, embeddings, output layer) to float32 and, with
        # checkpointing, enables it; reentrant checkpointing (its default) would recompute without the
        # frozen inputs' gradients and warn at every step.
        import inspect

        # peft >= 0.22 names it activation checkpointing; older releases only have the old name.
        names = inspect.signature(prepare_model_for_kbit_training).parameters
        kwargs_name = next(
            n for n in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs") if n in names
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            **{kwargs_name: {"use_reentrant": False}},
        )
    elif gradient_checkpointing:
        enable_gradient_checkpointing(model)
    names = adaptable_names(model)
    config = peft_config(args, model.config.model_type, names)
    check_targets(
        model,
        config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules),
    )
    peft_model = wrap(model, config, names)
    if mutates_base(args):  # kept to convert the saved adapter to one on the unmodified base
        setattr(peft_model, INITIAL_ATTR, initial_adapter(peft_model))
    if mixed_precision:
        trained_in_float32(peft_model)
    slices = parse_slices(args.qkv)
    held = apply_slice_masks(peft_model, slices, args.r) if slices else 0
    trainable, total = peft_model.get_nb_trainable_parameters()
    trainable -= held  # entries a slice mask holds at zero are stored but never trained
    log.info(
        "%s on %s%s: %s trainable parameters of %s (%.3f%%)",
        describe(args),
        adapted_summary(peft_model),
        f" (q/k/v slices {','.join(slices)}, rank {args.r} each)" if slices else "",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return peft_model


def wrap(model, config, names: set[str]):
    """``get_peft_model(model, config)``; a target peft cannot adapt is named with the model's modules."""
    from peft import get_peft_model

    try:
        with warnings.catch_warnings():
            # PiSSA/OLoRA: peft advises converting the adapter to a plain LoRA, which the save does
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
            return get_peft_model(model, config)
    except ValueError as e:
        raise KaikaError(
            f"LoRA targets {config.target_modules}: {e}. Linear modules of this model: "
            f"{', '.join(sorted(names)) or 'none found'}"
        ) from None


def describe(args: LoraArgs) -> str:
    """ "LoRA", "DoRA, PiSSA init, LoRA+ ×16": the variant and what differs from plain LoRA."""
    parts = [{"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA"}[args.variant]]
    if args.init != "default":
        parts.append({"pissa": "PiSSA", "olora": "OLoRA", "gaussian": "Gaussian"}[args.init] + " init")
    if args.loraplus_lr_ratio:
        parts.append(f"LoRA+ ×{args.loraplus_lr_ratio:g}")
    return ", ".join(parts)


def initial_adapter(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors as initialised (peft's names, on the CPU): what PiSSA/OLoRA took out of
    the base, which the saved adapter subtracts again to apply to the unmodified base."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()}


def trained_in_float32(model) -> None:
    """Every trained half-precision tensor in float32. A layer whose weight is a matrix (Linear, Conv1D)
    keeps it as it is: autocast casts its inputs to one dtype. A norm is cast whole: a CPU LayerNorm
    refuses a float32 bias beside a bf16 weight (it takes both in float32 with half-precision input)."""
    half = (torch.float16, torch.bfloat16)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad and p.dtype in half for p in own):
            continue
        matrix = any(p.ndim >= 2 for p in own)
        for param in own:
            if param.dtype in half and (param.requires_grad or not matrix):
                param.data = param.data.float()


def attach_adapter(model, adapter_dir, base_name: str, **kwargs):
    """``PeftModel.from_pretrained(model, adapter_dir, **kwargs)``; an adapter trained on a base of other
    dimensions is refused naming both, where peft would raise its "size mismatch" error."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir, **kwargs)
    except (RuntimeError, ValueError) as e:  # peft: "size mismatch …", "Target modules … not found …"
        first = next(
            (
                line.strip()
                for line in str(e).splitlines()
                if "size mismatch" in line or "not found in the base" in line
            ),
            None,
        )
        if first is None:
            raise
        raise KaikaError(
            f"the adapter in {adapter_dir} does not fit the base model {base_name} ({first}): it was trained on "
            "a base of other dimensions. Give the base it was trained on (drop --base-model, or name that base)"
        ) from None


def adapted_summary(peft_model) -> str:
    """The adapted modules by name and count ("q_proj ×18, v_proj ×18"): a real model has hundreds
    of full module paths, which say less than this line."""
    from collections import Counter

    counts = Counter(
        name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")
    )
    return ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items())) or "no module"
