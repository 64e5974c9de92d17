"""Load a base causal LM and its tokenizer: hub id, local dir, GGUF file or builtin name.

Only ``Auto*`` classes: nothing here is specific to one architecture (BLOOM's fused attention
is switched on by :func:`kaika.modeling.attention.set_attention`, a no-op for other models).
"""

from __future__ import annotations

import difflib
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kaika.config import ModelArgs
from kaika.errors import KaikaError, require_extra
from kaika.modeling.attention import fuse_gelu, set_attention
from kaika.modeling.builtin import builtin_model_path, builtin_names
from kaika.modeling.gguf import drop_gguf_quantizer, missing_gguf

log = logging.getLogger(__name__)

_said: set[str] = set()
# The names config.Dtype allows (besides auto) and what they mean.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads from: a hub id or directory, plus an optional GGUF file in it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(args: ModelArgs) -> ModelSource:
    name = args.base_model
    if name in builtin_names():
        return ModelSource(str(builtin_model_path(name)))
    path = Path(name).expanduser()
    if not path.exists() and "/" not in name and not name.endswith(".gguf"):
        close = difflib.get_close_matches(name, builtin_names(), n=1, cutoff=0.75)
        if close:  # a typo of a builtin, not a hub id
            raise KaikaError(
                f"unknown base model {name!r}: did you mean the builtin {close[0]!r}? "
                f"Builtins: {', '.join(builtin_names())}"
            )
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1  # a hub id is "org/name"
    if looks_local and not path.exists() and path.suffix != ".gguf":
        raise KaikaError(
            f"base model {name}: no such directory (moved or deleted?). For a run trained on it, give its "
            "new place with --base-model NEW_PATH"
        )
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KaikaError(f"GGUF file {path} does not exist")
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.exists() and not path.is_dir():
        raise KaikaError(f"base model {name}: a file, but not a .gguf file; give a model directory or hub id")
    if path.is_dir() and not args.gguf_file and not (path / "config.json").is_file():
        raise KaikaError(f"base model directory {path} has no config.json (is it a Hugging Face model dir?)")
    return ModelSource(name, args.gguf_file)


# Files of a model directory that decide what the model computes.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
WHOLE_HASH_BYTES = 64 * 2**20  # smaller files are hashed whole; larger ones sampled (fingerprint)


def _file_fingerprint(path: Path) -> str:
    """SHA-256 of a file, or for a large one of its size, its first and last MiB and 62 blocks of 64 KiB
    spread evenly through it: a few MiB read per file (a 14 GB base is checked in well under a second),
    and weights that were retrained, re-quantized or replaced differ in every block."""
    import hashlib

    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= WHOLE_HASH_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        for i in range(64):
            offset = 0 if i == 0 else size - 2**20 if i == 63 else (size // 63) * i
            f.seek(offset)
            h.update(f.read(2**20 if i in (0, 63) else 2**16))
    return "sampled:" + h.hexdigest()


def base_fingerprint(source: ModelSource) -> dict[str, Any] | None:
    """What identifies the base a run is trained on: its config and weight files, each with its size and
    hash (large files sampled, :func:`_file_fingerprint`). None for a hub id that is not a local
    directory (the hub's own revision is what names it)."""
    root = Path(source.path)
    if not root.is_dir():
        return None
    if source.gguf_file:
        files = [root / source.gguf_file]
    else:
        files = sorted(
            p
            for p in root.iterdir()
            if p.is_file() and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
        )
    return {
        "path": str(root.resolve()),
        "files": {
            p.name: {"size": p.stat().st_size, "hash": _file_fingerprint(p)} for p in files if p.is_file()
        },
    }


def fingerprint_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the base now differs from the one recorded, file by file, in words."""
    before, after = recorded.get("files", {}), now.get("files", {})
    found = []
    for name in sorted(set(before) | set(after)):
        if name not in after:
            found.append(f"{name} is gone")
        elif name not in before:
            found.append(f"{name} is new")
        elif before[name]["size"] != after[name]["size"]:
            found.append(f"{name} is {after[name]['size']:,} bytes, was {before[name]['size']:,}")
        elif before[name]["hash"] != after[name]["hash"]:
            found.append(f"{name} has other contents")
    return found


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware: x86 AVX512-BF16 or AMX-BF16, Arm's BF16 extension.
    (Elsewhere PyTorch emulates bf16 on the CPU, slower than float32.)"""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set(re.findall(r"[a-z0-9_]+", " ".join(re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.M))))
    return bool({"avx512_bf16", "amx_bf16"} & flags) or (
        "bf16" in flags and platform.machine() in ("aarch64", "arm64")
    )


def dtype_choice(name: str) -> tuple[torch.dtype, str]:
    """The dtype of the base model's weights for ``--dtype name``, and why (for the log)."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        if cuda:
            if gpu_has_native_bf16():
                return torch.bfloat16, "bfloat16: the GPU computes it"
            return torch.float16, "float16: this GPU does not compute bfloat16 natively (before Ampere)"
        if cpu_has_native_bf16():
            return torch.bfloat16, "bfloat16: this CPU computes bf16 natively (AVX512-BF16/AMX or Arm BF16)"
        return torch.float32, "float32: this CPU has no native bf16"
    if name not in DTYPES:
        raise KaikaError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    if name == "bfloat16" and cuda and not gpu_has_native_bf16():
        raise KaikaError(
            f"--dtype bfloat16: this GPU ({torch.cuda.get_device_name()}) does not compute bfloat16 "
            "natively (PyTorch would emulate it, far slower); use --dtype float16 (or auto) or float32"
        )
    return DTYPES[name], "as asked"


def gpu_has_native_bf16() -> bool:
    """Whether the GPU computes bf16 in hardware (Ampere and newer). ``torch.cuda.is_bf16_supported()``
    also says yes where it is only emulated (V100, T4), unless asked not to count emulation."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str) -> torch.dtype:
    return dtype_choice(name)[0]


def _load_error(what: str, source: ModelSource, err: Exception) -> KaikaError:
    hint = (
        " It is not a local directory: check the hub id, your network, or set HF_HUB_OFFLINE=1 "
        "with the model in the local cache."
        if not Path(source.path).exists()
        else ""
    )
    if "/" not in source.path and not Path(source.path).exists():
        hint += f" Builtin models: {', '.join(builtin_names())}."
    if (Path(source.path) / "config.json").is_file() and not isinstance(err, OSError):
        hint += f" Check {Path(source.path) / 'config.json'}: a field has a wrong type or value."
    err = " ".join(str(err).split())  # the hub's validation errors span several lines
    return KaikaError(
        f"could not load the {what} from {source.path}"
        f"{' (' + source.gguf_file + ')' if source.gguf_file else ''}: {err}.{hint}"
    )


def load_errors() -> tuple[type[Exception], ...]:
    """What from_pretrained raises for a missing, unreadable or malformed checkpoint: a missing file
    (OSError), a bad value or a wrong type in config.json (ValueError, TypeError, and the hub's
    strict-dataclass validation), a config without a field the model class needs (KeyError)."""
    from huggingface_hub.errors import StrictDataclassError

    return (OSError, ValueError, TypeError, KeyError, StrictDataclassError)


def load_tokenizer(args: ModelArgs, source: ModelSource | None = None):
    from transformers import AutoTokenizer

    source = source or resolve_source(args)
    try:
        return AutoTokenizer.from_pretrained(
            source.path, trust_remote_code=args.trust_remote_code, **source.kwargs()
        )
    except load_errors() as e:
        raise _load_error("tokenizer", source, e) from None
    except ImportError as e:  # transformers asks for the gguf package only when a GGUF file is read
        raise missing_gguf(e) from None


def quantization_config(args: ModelArgs, dtype: torch.dtype):
    """bitsandbytes' config for ``--quantization``, on a GPU or a CPU (bitsandbytes >= 0.49 runs there).

    4-bit is QLoRA's: NF4 with double quantization, computing in the run's dtype, and the packed weights
    stored in that dtype too (``bnb_4bit_quant_storage``), so that FSDP can shard them like any other
    weight of the model."""
    if args.quantization == "none":
        return None
    require_extra("quantization", ("bitsandbytes",), f"--quantization {args.quantization}")
    from transformers import BitsAndBytesConfig

    if args.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=dtype,
    )


def quantized_device_map() -> dict[str, int | str]:
    """Each process loads the whole quantized model onto its own device (DDP): its GPU, or the CPU;
    "auto" would spread it over the GPUs and break DDP ("mat1 and mat2 shapes cannot be multiplied").
    The model is loaded before the Trainer binds the process to its GPU, so current_device() would
    still be 0 on every rank: LOCAL_RANK (set by torchrun / accelerate launch) names the right one."""
    if not torch.cuda.is_available():
        return {"": "cpu"}
    local_rank = os.environ.get("LOCAL_RANK")
    return {"": int(local_rank) if local_rank is not None else torch.cuda.current_device()}


def load_model(args: ModelArgs, source: ModelSource | None = None, device_map: Any = None):
    """The base model in the requested dtype (and quantization), in eval mode."""
    from transformers import AutoModelForCausalLM

    source = source or resolve_source(args)
    dtype, why = dtype_choice(args.dtype)
    if args.dtype == "auto" and why not in _said:  # once per process: verification loads the base again
        _said.add(why)
        log.info("dtype auto: %s; LoRA weights and optimizer state stay float32", why)
    quant = quantization_config(args, dtype)
    if quant is not None and device_map is None:
        device_map = quantized_device_map()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype=dtype,
            quantization_config=quant,
            device_map=device_map,
            trust_remote_code=args.trust_remote_code,
            **source.kwargs(),
        )
    except load_errors() as e:
        raise _load_error("model", source, e) from None
    except ImportError as e:
        raise missing_gguf(e) from None
    drop_gguf_quantizer(model)
    report_partitioned(model)
    set_attention(model, args.attention)  # BLOOM only; others keep transformers' choice
    fuse_gelu(model)  # BLOOM only: one kernel for its tanh-approximated GELU
    model.eval()
    return model


def report_partitioned(model) -> None:
    """Under a DeepSpeed ZeRO-3 launch transformers partitions the weights as they load (the run's
    distributed state exists first): say how much of the model this process holds."""
    partitions = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    if partitions:
        held = sum(p.ds_tensor.numel() for p in partitions)
        total = sum(p.ds_numel for p in partitions)
        log.info(
            "ZeRO-3 partitioned the base as it loaded: this process holds %.1f%% of it", 100 * held / total
        )


def one_cpu_packing(model) -> None:
    """bitsandbytes' 4-bit layers, on a CPU with AVX512-BF16, repack their weights for an inference-only
    kernel the first time they run in eval mode without gradients, and back again whenever a state dict
    is loaded into the model. A model being trained then fails ("a view of a leaf Variable that requires
    grad is being used in an in-place operation": kaika's loss check and every evaluation run in eval
    mode), and a model being verified computes with two kernels whose results differ by their rounding.
    Such models keep the packing that trains, for every forward."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
