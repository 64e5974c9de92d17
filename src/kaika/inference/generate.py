"""``kaika generate``: base model + adapter, prompted with the template saved at training time.

:func:`load` turns an opened :class:`~kaika.rundir.RunDir` into a model ready to answer; every
command that generates or scores (generate, chat, webui, serve, merge's checks aside, eval) goes
through it, so they all load a run the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kaika.config import GenerateArgs, ModelArgs
from kaika.data.prompts import Template
from kaika.data.segments import record_prompt_ids, stop_ids
from kaika.data.tokenize import pad_batch, resolve_pad_token
from kaika.modeling.load import load_model, load_tokenizer, resolve_source
from kaika.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    template: Template
    run: RunDir
    model_args: ModelArgs  # as the base was loaded here (the run's, but unquantized without bitsandbytes)
    stop_ids: list[int]  # EOS, and a chat template's end-of-turn token: what ends an answer


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended with EOS before max_new_tokens


def inference_model_args(run: RunDir) -> ModelArgs:
    """The run's model args as this machine can load them: a base trained quantized loads quantized
    (bitsandbytes runs on GPUs and CPUs), or, where bitsandbytes is not installed, in full precision."""
    import importlib.util

    args = run.model_args
    if args.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        log.warning(
            "the adapter was trained on a %s base, and bitsandbytes is not installed: the base loads in "
            "full precision (answers can differ slightly from the quantized model's; "
            "pip install 'kaika[quantization]' to load it as trained)",
            args.quantization,
        )
        args = replace(args, quantization="none")
    return args


def load(run: RunDir, base_only: bool = False) -> Loaded:
    """The model as trained: the run's base, its tokenizer and template, and its adapter (unless
    ``base_only``), on the GPU when there is one."""
    from kaika.modeling.lora import attach_adapter

    model_args = inference_model_args(run)
    tokenizer = load_tokenizer(model_args, run.tokenizer_source)
    resolve_pad_token(tokenizer)
    model = load_model(model_args, resolve_source(model_args))
    if torch.cuda.is_available() and model_args.quantization == "none":
        model = model.to("cuda")
    if run.is_adapter and not base_only:
        model = attach_adapter(model, run.path, model_args.base_model).eval()
    return Loaded(model, tokenizer, run.template, run, model_args, stop_ids(run.template, tokenizer))


def load_for_inference(
    adapter_dir: str | Path,
    base_model: str | None = None,
    base_only: bool = False,
    dtype: str | None = None,
    template: str | None = None,
) -> Loaded:
    """Open the adapter directory ``adapter_dir`` (:meth:`RunDir.open`) and :func:`load` it."""
    return load(RunDir.open(adapter_dir, base_model, dtype, template), base_only)


def generation_config(args: GenerateArgs, tokenizer, stops: list[int] | None = None):
    """``stops``: the ids that end an answer (default: EOS)."""
    from transformers import GenerationConfig

    sample = args.temperature > 0
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_p=args.top_p if sample else None,
        top_k=args.top_k if sample else None,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams,
        eos_token_id=stops or tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def generate_batch(
    loaded: Loaded, records: list[dict[str, str]], args: GenerateArgs, streamer: Any = None
) -> list[Generation]:
    """Answers for ``records`` ({instruction, input?}) in one left-padded batch."""
    prompts = [record_prompt_ids(loaded.template, loaded.tokenizer, r) for r in records]
    return generate_ids(loaded, prompts, args, streamer)


@torch.no_grad()
def generate_ids(
    loaded: Loaded, prompts: list[list[int]], args: GenerateArgs, streamer: Any = None
) -> list[Generation]:
    """Answers for encoded prompts (records, conversations) in one left-padded batch."""
    from transformers import set_seed

    tok = loaded.tokenizer
    batch = pad_batch([{"input_ids": p} for p in prompts], tok.pad_token_id, side="left")  # rows end together
    device = next(loaded.model.parameters()).device
    set_seed(args.seed)
    out = loaded.model.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        generation_config=generation_config(args, tok, loaded.stop_ids),
        streamer=streamer,
    )
    results = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        end = next((i for i, t in enumerate(row) if t in loaded.stop_ids), None)
        stopped = end is not None
        tokens = row[:end] if stopped else row  # pads only follow a stop token
        results.append(Generation(tok.decode(tokens, skip_special_tokens=True).strip(), len(tokens), stopped))
    return results


def generate(
    loaded: Loaded, instruction: str, input: str = "", args: GenerateArgs | None = None, stream: bool = False
) -> Generation:
    """One answer; with ``stream`` the tokens are printed as they come."""
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate_batch(
        loaded, [{"instruction": instruction, "input": input}], args or GenerateArgs(), streamer
    )[0]


def answer_file(
    loaded: Loaded, records: list[dict[str, str]], args: GenerateArgs, output: str | Path | None
) -> None:
    """Answer ``records`` in batches, one JSON line per record: to stdout as they come, or to ``output``,
    which appears whole when every answer is written (a stopped run leaves no half file behind)."""
    import sys
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from kaika.atomic import written_file

    sink = written_file(output, "--output") if output else nullcontext(sys.stdout)
    with (
        sink as out,
        tqdm(total=len(records), desc="generating", unit="prompt", disable=output is None) as bar,
    ):
        for i in range(0, len(records), args.batch_size):
            chunk = records[i : i + args.batch_size]
            for rec, gen in zip(chunk, generate_batch(loaded, chunk, args), strict=True):
                row = {**rec, "response": gen.text, "new_tokens": gen.new_tokens, "stopped": gen.stopped}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
