"""The ``kaika`` command: a table of subcommands, each calling one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from kaika import __version__
from kaika.config import (
    GenerateArgs,
    TrainConfig,
    add_config_args,
    add_dataclass_args,
    from_dict,
    namespace_overrides,
    resolve_train_config,
)
from kaika.errors import KaikaError

log = logging.getLogger("kaika")


# --------------------------------------------------------------------------- train


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", help="YAML config (sections model, data, lora, train); options override it"
    )
    add_config_args(p, TrainConfig)


def run_train(ns: argparse.Namespace) -> None:
    from kaika.train import train

    result = train(resolve_train_config(ns.config, namespace_overrides(ns)))
    eval_part = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    print(
        f"adapter saved to {result.output_dir} — {result.global_step} steps, train loss "
        f"{result.train_loss:.4f}{eval_part}, {result.train_seconds:.0f} s, {result.tokens_per_second:.0f} tokens/s"
    )


# --------------------------------------------------------------------------- generate


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help="Output directory of kaika train (or any PEFT adapter directory)")
    p.add_argument("instruction", nargs="?", help="The instruction (指示)")
    p.add_argument("--input", default="", help="Optional input / context (入力)")
    p.add_argument("--file", help="JSONL of {instruction, input?} records to answer in batches")
    p.add_argument("--output", help="Where --file mode writes its answers (JSONL); default: stdout")
    p.add_argument("--base-model", help="Use this base model instead of the one saved with the adapter")
    p.add_argument("--base-only", action="store_true", help="Generate with the base model alone, to compare")
    p.add_argument(
        "--dtype", help="Override the dtype saved with the adapter (auto, float32, bfloat16, float16)"
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Print tokens as they come (default: when writing to a terminal)",
    )
    add_dataclass_args(p, GenerateArgs, "generate")


def run_generate(ns: argparse.Namespace) -> None:
    from kaika.data import load_prompts
    from kaika.generate import answer_file, generate, load_for_inference

    if bool(ns.instruction) == bool(ns.file):
        raise KaikaError("give either an INSTRUCTION or --file PROMPTS.jsonl")
    args = from_dict(GenerateArgs, namespace_overrides(ns).get("generate", {}), "generate options")
    loaded = load_for_inference(ns.adapter_dir, ns.base_model, ns.base_only, ns.dtype)
    if ns.instruction:
        stream = sys.stdout.isatty() if ns.stream is None else ns.stream
        result = generate(loaded, ns.instruction, ns.input, args, stream=stream and args.num_beams == 1)
        if not (stream and args.num_beams == 1):
            print(result.text)
        return
    answer_file(loaded, load_prompts(ns.file), args, ns.output)


# --------------------------------------------------------------------------- translate


def add_translate(p: argparse.ArgumentParser) -> None:
    from kaika.translate import TranslateArgs

    p.add_argument("input", help="Alpaca-format JSON/JSONL file to translate")
    add_dataclass_args(p, TranslateArgs)


def run_translate(ns: argparse.Namespace) -> None:
    from kaika.translate import TranslateArgs, print_result, translate_file

    given = {k: v for k, v in vars(ns).items() if k in TranslateArgs.__dataclass_fields__}
    print_result(translate_file(ns.input, from_dict(TranslateArgs, given, "translate options")))


# --------------------------------------------------------------------------- data check / stats


def add_data(p: argparse.ArgumentParser) -> None:
    from kaika.datacheck import add_data_commands

    add_data_commands(p)


def run_data(ns: argparse.Namespace) -> int | None:
    return ns.data_run(ns)


# --------------------------------------------------------------------------- table

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("Train a LoRA adapter on instruction data.", add_train, run_train),
    "generate": ("Answer instructions with base model + adapter.", add_generate, run_generate),
    "translate": ("Translate Alpaca data with DeepL (cached, resumable).", add_translate, run_translate),
    "data": ("Check instruction data for problems (check) or measure it (stats).", add_data, run_data),
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
    import warnings

    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    # Raised inside peft/transformers on every LoRA model; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.getLogger("kaika").setLevel(logging.WARNING if quiet else logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the Trainer's progress bar, drop library chatter


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.quiet)
    try:
        status = ns.run(ns)  # a command may return an exit status (data check: 1 when it fails)
    except KaikaError as e:
        print(f"kaika {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kaika {ns.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
