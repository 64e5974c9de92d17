"""The ``kaika`` command: a table of subcommands, each calling one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from kaika import __version__
from kaika.config import (
    GenerateArgs,
    PretrainConfig,
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
    from kaika.train import is_main_process, train

    result = train(resolve_train_config(ns.config, namespace_overrides(ns)))
    if not is_main_process():  # rank 0 saved the adapter and reports it
        return
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


# --------------------------------------------------------------------------- sweep


def add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        help="Sweep YAML: base (a train config or a path to one), variants (name → overrides) and "
        "grid (section.field → values), e.g. configs/sweeps/qkv-tiny-bloom-ja.yaml",
    )
    p.add_argument(
        "--rerun", action="store_true", help="Train every run again, even those a previous sweep finished"
    )
    p.epilog = (
        "Train options below override the sweep's base config; --output-dir is the sweep's directory "
        "(runs go to OUTPUT_DIR/runs/NAME, results to OUTPUT_DIR/results.{md,csv} and a plot)."
    )
    add_config_args(p, TrainConfig)


def run_sweep(ns: argparse.Namespace) -> None:
    from kaika.sweep import load_sweep, sweep

    runs = load_sweep(ns.config, namespace_overrides(ns))
    output_dir = runs[0].config.train.output_dir
    records = sweep(runs, output_dir, rerun=ns.rerun)
    failed = [r.name for r in records if r.status != "ok"]
    print(
        f"sweep: {len(records) - len(failed)} of {len(records)} runs done; results in {output_dir}/results.md"
    )
    if len(failed) == len(records):
        raise KaikaError(f"every run failed ({', '.join(failed)}); see {output_dir}/results.md")
    if failed:
        print(f"sweep: failed runs: {', '.join(failed)} (errors in results.md)", file=sys.stderr)


# --------------------------------------------------------------------------- pretrain


def add_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", help="YAML config (sections model, pretrain, lora, train); options override it"
    )
    add_config_args(p, PretrainConfig)


def run_pretrain(ns: argparse.Namespace) -> None:
    from kaika.config import deep_update, load_yaml
    from kaika.pretrain import pretrain

    data = deep_update(load_yaml(ns.config) if ns.config else {}, namespace_overrides(ns))
    result = pretrain(from_dict(PretrainConfig, data, where=ns.config or "options"))
    held = result.heldout
    held_part = f", held-out loss {held['loss']:.4f} (perplexity {held['perplexity']:.2f})" if held else ""
    print(
        f"saved to {result.output_dir} — {result.global_step} steps, {result.tokens_seen} tokens, "
        f"train loss {result.train_loss:.4f}{held_part}, {result.train_seconds:.0f} s"
    )


# --------------------------------------------------------------------------- eval


def add_eval(p: argparse.ArgumentParser) -> None:
    from kaika.eval.cli import add_eval_commands

    add_eval_commands(p)


def run_eval(ns: argparse.Namespace) -> None:
    ns.eval_run(ns)


# --------------------------------------------------------------------------- merge / chat / webui / serve


def add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help="Output directory of kaika train (or any PEFT adapter directory)")
    p.add_argument("out_dir", help="Where to write the merged model (a standard Hugging Face checkpoint)")
    p.add_argument("--base-model", help="Use this base model instead of the one saved with the adapter")
    p.add_argument(
        "--dtype",
        default="float32",
        help="dtype of the written weights: float32 (default), bfloat16 or float16; merging itself is "
        "always done in float32",
    )
    p.add_argument(
        "--max-shard-size",
        default="2GB",
        help="Split the weights into safetensors files of at most this size",
    )
    p.add_argument("--force", action="store_true", help="Replace OUT_DIR if it is not empty")


def run_merge(ns: argparse.Namespace) -> None:
    from kaika.merge import merge

    r = merge(
        ns.adapter_dir,
        ns.out_dir,
        base_model=ns.base_model,
        dtype=ns.dtype,
        max_shard_size=ns.max_shard_size,
        force=ns.force,
    )
    print(
        f"merged model written to {r.out_dir} ({r.dtype}; logits match base + adapter within "
        f"{r.max_abs_diff:.2e}, tolerance {r.tolerance:.1e})"
    )


def add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", help="Use this base model instead of the one saved with the adapter")
    p.add_argument(
        "--dtype", help="Override the dtype saved with the adapter (auto, float32, bfloat16, float16)"
    )


def add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help="Output directory of kaika train (or any PEFT adapter directory)")
    p.add_argument("--system", default="", help="Context given with every turn (the template's input / 入力)")
    add_inference_args(p)
    add_dataclass_args(p, GenerateArgs, "generate")


def run_chat(ns: argparse.Namespace) -> None:
    from kaika.chat import chat

    args = from_dict(GenerateArgs, namespace_overrides(ns).get("generate", {}), "generate options")
    chat(ns.adapter_dir, args, system=ns.system, base_model=ns.base_model, dtype=ns.dtype)


def add_webui(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help="Output directory of kaika train (or any PEFT adapter directory)")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="Port to listen on")
    p.add_argument("--lang", choices=("en", "ja"), default="en", help="Language of the page (en, ja)")
    add_inference_args(p)
    add_dataclass_args(p, GenerateArgs, "generate")  # the controls' initial values


def run_webui(ns: argparse.Namespace) -> None:
    from kaika.webui import webui

    defaults = from_dict(GenerateArgs, namespace_overrides(ns).get("generate", {}), "generate options")
    webui(
        ns.adapter_dir,
        host=ns.host,
        port=ns.port,
        lang=ns.lang,
        base_model=ns.base_model,
        dtype=ns.dtype,
        defaults=defaults,
    )


def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "adapters",
        nargs="*",
        metavar="[NAME=]ADAPTER_DIR",
        help="Adapters to serve over one base model; a request's model field picks one by NAME "
        "(default: the directory's name). The base model is served too, under its own name.",
    )
    p.add_argument(
        "--base-model",
        help="Base model (default: the one saved with the adapters); "
        "alone, without adapters, it serves e.g. a merged model directory",
    )
    p.add_argument(
        "--base-name", help="Model name of the base model in requests (default: its directory or hub name)"
    )
    p.add_argument("--dtype", help="Override the saved dtype (auto, float32, bfloat16, float16)")
    p.add_argument("--template", help="Use this prompt template for chat instead of the saved ones")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="Port to listen on")
    p.add_argument(
        "--api-key", help="Require 'Authorization: Bearer KEY' (default: $KAIKA_API_KEY; unset: no auth)"
    )
    p.add_argument(
        "--queue-size", type=int, default=8, help="Requests that may wait while one generates; more get 429"
    )
    p.add_argument(
        "--max-tokens-limit", type=int, default=2048, help="Largest max_tokens a request may ask for"
    )
    p.add_argument(
        "--context-length", type=int, help="Bound on prompt + max_tokens (default: from the model)"
    )
    add_dataclass_args(p, GenerateArgs, "generate")  # defaults for what a request leaves out


def run_serve(ns: argparse.Namespace) -> None:
    from kaika.serve import ServeOptions, serve

    defaults = from_dict(GenerateArgs, namespace_overrides(ns).get("generate", {}), "generate options")
    options = ServeOptions(
        host=ns.host,
        port=ns.port,
        api_key=ns.api_key,
        queue_size=ns.queue_size,
        max_tokens_limit=ns.max_tokens_limit,
        context_length=ns.context_length,
        defaults=defaults,
    )
    serve(ns.adapters, options, ns.base_model, ns.base_name, ns.dtype, ns.template)


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
    "sweep": ("Train a grid of LoRA configs on the same data; table and plot.", add_sweep, run_sweep),
    "pretrain": (
        "Continue pretraining (LoRA or --full) or train from scratch on raw text, packed.",
        add_pretrain,
        run_pretrain,
    ),
    "eval": ("Evaluate: held-out loss, scored answers, LLM judge, run reports.", add_eval, run_eval),
    "merge": ("Merge an adapter into its base model and write a standard checkpoint.", add_merge, run_merge),
    "chat": ("Chat with base model + adapter in the terminal (streaming).", add_chat, run_chat),
    "webui": ("A web page (Gradio) to try base model + adapter.", add_webui, run_webui),
    "serve": ("An OpenAI-compatible HTTP API over a base model and its adapters.", add_serve, run_serve),
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
    import os

    # Under torchrun / accelerate launch only rank 0 speaks; the others report warnings and errors.
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.getLogger("kaika").setLevel(logging.WARNING if quiet or not rank0 else logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the Trainer's progress bar, drop library chatter


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.quiet)
    try:
        status = ns.run(ns)  # a command may return an exit status (data check: 1 when it fails)
    except KaikaError as e:
        print(f"kaika {ns.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 128 + signal number when a signal stopped training
    except KeyboardInterrupt:
        print(f"kaika {ns.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
