"""``kaika generate``, ``chat``, ``webui``, ``serve``, ``merge`` and ``export``: a run directory in, one library call."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from kaika.cli.options import (
    ADAPTER_HELP,
    add_dataclass_args,
    add_generate_args,
    add_inference_args,
    generate_args,
    options_from,
)
from kaika.config import ChatOptions, ExportOptions, GenerateOptions, MergeOptions, ServeOptions, WebuiOptions
from kaika.errors import KaikaError


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help=ADAPTER_HELP)
    p.add_argument("instruction", nargs="?", help="The instruction (指示)")
    add_dataclass_args(p, GenerateOptions, keep_defaults=True)
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
    add_dataclass_args(p, MergeOptions)


def run_merge(ns: argparse.Namespace) -> None:
    from kaika.api import merge

    r = merge(ns.adapter_dir, ns.out_dir, **asdict(options_from(MergeOptions, ns)))
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
    add_dataclass_args(p, ExportOptions)


def run_export(ns: argparse.Namespace) -> None:
    from kaika.api import export

    options = options_from(ExportOptions, ns)
    r = export(ns.source, ns.out_dir, **asdict(options))
    print(
        f"GGUF written to {r.gguf_file} ({r.quant}; read back, its logits match the written weights within "
        f"{r.file_diff:.2e}; {r.quant} moves them by {r.quant_diff:.2e} against float32)"
    )
    if options.ollama:
        print(f"Ollama: cd {r.out_dir} && ollama create NAME -f Modelfile")


def add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help=ADAPTER_HELP)
    add_dataclass_args(p, ChatOptions, keep_defaults=True)
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
    add_dataclass_args(p, WebuiOptions, keep_defaults=True)
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
        "(default: the directory's name). The base model is served too, under its own name; with no "
        "adapter, --base-model alone is served (a merged model directory, say).",
    )
    add_inference_args(p, template=True)
    add_dataclass_args(p, ServeOptions)
    add_generate_args(p)  # defaults for what a request leaves out


def run_serve(ns: argparse.Namespace) -> None:
    from kaika.inference.serve import serve

    options = options_from(ServeOptions, ns, defaults=generate_args(ns))
    serve(ns.adapters, options, ns.base_model, options.base_name, ns.dtype, ns.template)
