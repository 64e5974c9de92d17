"""``kaika generate``, ``chat``, ``webui``, ``serve``, ``merge`` and ``export``: a run directory in, one library call."""

from __future__ import annotations

import argparse
import sys

from kaika.cli.options import ADAPTER_HELP, add_generate_args, add_inference_args, generate_args
from kaika.config import Dtype, choices
from kaika.errors import KaikaError


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help=ADAPTER_HELP)
    p.add_argument("instruction", nargs="?", help="The instruction (指示)")
    p.add_argument("--input", default="", help="Optional input / context (入力)")
    p.add_argument("--file", help="JSONL of {instruction, input?} records to answer in batches")
    p.add_argument("--output", help="Where --file mode writes its answers (JSONL); default: stdout")
    p.add_argument("--base-only", action="store_true", help="Generate with the base model alone, to compare")
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Print tokens as they come (default: when writing to a terminal)",
    )
    add_inference_args(p, template=True)
    add_generate_args(p)


def run_generate(ns: argparse.Namespace) -> None:
    from kaika.data.records import load_prompts
    from kaika.guard import check_output_file
    from kaika.inference.generate import answer_file, generate, load_for_inference

    if bool(ns.instruction) == bool(ns.file):
        raise KaikaError("give either an INSTRUCTION or --file PROMPTS.jsonl")
    args = generate_args(ns)
    if ns.output:
        check_output_file(ns.output, [ns.file] if ns.file else [])
    loaded = load_for_inference(ns.adapter_dir, ns.base_model, ns.base_only, ns.dtype, ns.template)
    if ns.instruction:
        stream = sys.stdout.isatty() if ns.stream is None else ns.stream
        result = generate(loaded, ns.instruction, ns.input, args, stream=stream and args.num_beams == 1)
        if not (stream and args.num_beams == 1):
            print(result.text)
        return
    answer_file(loaded, load_prompts(ns.file), args, ns.output)


def add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help=ADAPTER_HELP)
    p.add_argument("out_dir", help="Where to write the merged model (a standard Hugging Face checkpoint)")
    p.add_argument("--base-model", help="Use this base model instead of the one saved with the adapter")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=[c for c in choices(Dtype) if c != "auto"],
        help="dtype of the written weights (default: float32); merging itself is always done in float32",
    )
    p.add_argument(
        "--max-shard-size",
        default="2GB",
        help="Split the weights into safetensors files of at most this size",
    )
    p.add_argument("--force", action="store_true", help="Replace OUT_DIR if it is not empty")


def run_merge(ns: argparse.Namespace) -> None:
    from kaika.api import merge

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


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="A kaika run or PEFT adapter directory (merged first, in float32), or a merged model directory",
    )
    p.add_argument("out_dir", help="Where to write the GGUF file, its model card and (--ollama) a Modelfile")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="Output format (default: gguf)")
    p.add_argument(
        "--quant",
        default="f16",
        choices=["f16", "bf16", "q8_0"],
        help="Type of the weight matrices (norms and biases stay float32); q8_0: 8-bit blocks, about half "
        "of f16's size (default: f16)",
    )
    p.add_argument(
        "--ollama", action="store_true", help="Also write an Ollama Modelfile (FROM, TEMPLATE, stops)"
    )
    p.add_argument("--base-model", help="Use this base model instead of the one saved with the adapter")
    p.add_argument(
        "--force", action="store_true", help="Replace OUT_DIR if it is not empty (only one kaika wrote)"
    )


def run_export(ns: argparse.Namespace) -> None:
    from kaika.api import export

    r = export(
        ns.source,
        ns.out_dir,
        fmt=ns.format,
        quant=ns.quant,
        base_model=ns.base_model,
        ollama=ns.ollama,
        force=ns.force,
    )
    print(
        f"GGUF written to {r.gguf_file} ({r.quant}; read back, its logits match the written weights within "
        f"{r.file_diff:.2e}; {r.quant} moves them by {r.quant_diff:.2e} against float32)"
    )
    if ns.ollama:
        print(f"Ollama: cd {r.out_dir} && ollama create NAME -f Modelfile")


def add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help=ADAPTER_HELP)
    p.add_argument("--system", default="", help="Context given with every turn (the template's input / 入力)")
    add_inference_args(p, template=True)
    add_generate_args(p)


def run_chat(ns: argparse.Namespace) -> None:
    from kaika.inference.chat import chat

    chat(
        ns.adapter_dir,
        generate_args(ns),
        system=ns.system,
        base_model=ns.base_model,
        dtype=ns.dtype,
        template=ns.template,
    )


def add_webui(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help=ADAPTER_HELP)
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="Port to listen on")
    p.add_argument("--lang", choices=("en", "ja"), default="en", help="Language of the page (en, ja)")
    add_inference_args(p, template=True)
    add_generate_args(p)  # the controls' initial values


def run_webui(ns: argparse.Namespace) -> None:
    from kaika.inference.webui import webui

    webui(
        ns.adapter_dir,
        host=ns.host,
        port=ns.port,
        lang=ns.lang,
        base_model=ns.base_model,
        dtype=ns.dtype,
        template=ns.template,
        defaults=generate_args(ns),
    )


def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "adapters",
        nargs="*",
        metavar="[NAME=]ADAPTER_DIR",
        help="Adapters to serve over one base model; a request's model field picks one by NAME "
        "(default: the directory's name). The base model is served too, under its own name.",
    )
    add_inference_args(
        p,
        template=True,
        base_help="Base model (default: the one saved with the adapters); "
        "alone, without adapters, it serves e.g. a merged model directory",
    )
    p.add_argument(
        "--base-name", help="Model name of the base model in requests (default: its directory or hub name)"
    )
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
    add_generate_args(p)  # defaults for what a request leaves out


def run_serve(ns: argparse.Namespace) -> None:
    from kaika.inference.serve import ServeOptions, serve

    options = ServeOptions(
        host=ns.host,
        port=ns.port,
        api_key=ns.api_key,
        queue_size=ns.queue_size,
        max_tokens_limit=ns.max_tokens_limit,
        context_length=ns.context_length,
        defaults=generate_args(ns),
    )
    serve(ns.adapters, options, ns.base_model, ns.base_name, ns.dtype, ns.template)
