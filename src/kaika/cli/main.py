"""The ``kaika`` command: a table of subcommands, each calling one library function.

Each row names the subcommand, its one-line help, the function that adds its options and the
function that runs it; the options and runners live beside their concern (``train``, ``infer``,
``eval``, ``data``). Library modules are imported only when their subcommand runs, so
``kaika --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from kaika import __version__
from kaika.cli import data, infer, train
from kaika.cli import eval as evaluate
from kaika.errors import KaikaError

log = logging.getLogger("kaika")


def _run_sub(dest: str) -> Callable[[argparse.Namespace], int | None]:
    """The runner of a command with subcommands of its own (eval, data): the one they chose."""
    return lambda ns: getattr(ns, dest)(ns)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("Train a LoRA adapter on instruction data.", train.add_train, train.run_train),
    "generate": ("Answer instructions with base model + adapter.", infer.add_generate, infer.run_generate),
    "sweep": (
        "Train a grid of LoRA configs on the same data; table and plot.",
        train.add_sweep,
        train.run_sweep,
    ),
    "dpo": (
        "Preference tuning (DPO, IPO, ORPO, SimPO) of an SFT run's adapter or a fresh one.",
        train.add_dpo,
        train.run_dpo,
    ),
    "pretrain": (
        "Continue pretraining (LoRA or --full) or train from scratch on raw text, packed.",
        train.add_pretrain,
        train.run_pretrain,
    ),
    "eval": (
        "Evaluate: held-out loss, scored answers, LLM judge, run reports.",
        evaluate.add_eval,
        _run_sub("eval_run"),
    ),
    "merge": (
        "Merge an adapter into its base model and write a standard checkpoint.",
        infer.add_merge,
        infer.run_merge,
    ),
    "export": (
        "Export a run or merged model as GGUF for llama.cpp and Ollama (verified), with a model card.",
        infer.add_export,
        infer.run_export,
    ),
    "chat": ("Chat with base model + adapter in the terminal (streaming).", infer.add_chat, infer.run_chat),
    "webui": ("A web page (Gradio) to try base model + adapter.", infer.add_webui, infer.run_webui),
    "serve": (
        "An OpenAI-compatible HTTP API over a base model and its adapters.",
        infer.add_serve,
        infer.run_serve,
    ),
    "translate": (
        "Translate Alpaca data with DeepL (cached, resumable).",
        data.add_translate,
        data.run_translate,
    ),
    "data": (
        "Check instruction data for problems (check) or measure it (stats).",
        data.add_data,
        _run_sub("data_run"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaika", description="LoRA instruction tuning for causal LMs (BLOOM first, Japanese first)."
    )
    parser.add_argument("--version", action="version", version=f"kaika {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(run=run)
    return parser


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    # Raised inside peft/transformers on every LoRA model; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes' 8-bit layers multiply in float16 and say so at every call; the run's dtype is logged once.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    # DeepSpeed's collectives call torch.distributed functions that PyTorch has renamed, at every step.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    # Under torchrun / accelerate launch only rank 0 speaks; the others report warnings and errors.
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.getLogger("kaika").setLevel(logging.WARNING if quiet or not rank0 else logging.INFO)
    # bitsandbytes, on a CPU with AVX512-BF16, asks the hub for a faster 4-bit kernel as it is imported
    # and warns when it gets none (offline): it then uses its own, and there is nothing to do about it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the Trainer's progress bar, drop library chatter


def cpu_deepspeed() -> None:
    """DeepSpeed picks its accelerator when it is imported (by accelerate and transformers, whenever it is
    installed); on a machine without CUDA it settles on the CPU after printing a warning to stdout, in the
    middle of a command's output. Saying so first is the same choice, silently."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.quiet)
    cpu_deepspeed()
    try:
        status = ns.run(ns)  # a command may return an exit status (data check: 1 when it fails)
    except KaikaError as e:
        print(f"kaika {ns.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 128 + signal number when a signal stopped training
    except KeyboardInterrupt:
        print(f"kaika {ns.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0
