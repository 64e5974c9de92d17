"""``kaika generate``: base model + adapter, prompted with the template saved at training time."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kaika.atomic import adapter_problem
from kaika.config import CONFIG_FILE, GenerateArgs, ModelArgs, load_train_config
from kaika.errors import KaikaError
from kaika.models import ModelSource, load_model, load_tokenizer, resolve_source
from kaika.prompts import TEMPLATE_FILE, PromptTemplate, load_template
from kaika.tokenize import encode_prompt, resolve_pad_token

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    template: PromptTemplate
    model_args: ModelArgs


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended with EOS before max_new_tokens


def check_adapter_dir(adapter_dir: Path) -> None:
    """Refuse a missing, incomplete or corrupt adapter with the reason, before any model is loaded."""
    if not adapter_dir.is_dir():
        raise KaikaError(f"adapter directory {adapter_dir} does not exist")
    problem = adapter_problem(adapter_dir)
    if problem:
        raise KaikaError(
            f"{adapter_dir} is not a complete adapter: {problem}. Was training interrupted before "
            "saving? Its checkpoints/ can be resumed with kaika train --resume"
        )


def load_for_inference(
    adapter_dir: str | Path, base_model: str | None = None, base_only: bool = False, dtype: str | None = None
) -> Loaded:
    """The model as trained: base from the run's saved config (or ``base_model``), adapter, template."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    check_adapter_dir(adapter_dir)
    if (adapter_dir / CONFIG_FILE).is_file():
        model_args = load_train_config(adapter_dir / CONFIG_FILE).model
    else:  # an adapter trained elsewhere: peft records its base
        base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        model_args = ModelArgs(base_model=base)
    if base_model:
        model_args.base_model, model_args.gguf_file = base_model, None
    if dtype:
        model_args.dtype = dtype
    if model_args.quantization != "none" and not torch.cuda.is_available():
        log.warning(
            "the adapter was trained on a %s base; without CUDA the base loads in full precision "
            "(answers can differ slightly from the quantized model's)",
            model_args.quantization,
        )
        model_args.quantization = "none"
    template_path = adapter_dir / TEMPLATE_FILE
    template = load_template(template_path if template_path.is_file() else "alpaca")
    source = resolve_source(model_args)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    # The tokenizer saved with the adapter is the one training used (pad token included).
    tokenizer = load_tokenizer(model_args, ModelSource(str(adapter_dir)) if has_tokenizer else source)
    resolve_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    model = load_model(model_args, source)
    if torch.cuda.is_available() and model_args.quantization == "none":
        model = model.to("cuda")
    if not base_only:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return Loaded(model, tokenizer, template, model_args)


def generation_config(args: GenerateArgs, tokenizer):
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
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def generate_batch(
    loaded: Loaded, records: list[dict[str, str]], args: GenerateArgs, streamer: Any = None
) -> list[Generation]:
    """Answers for ``records`` ({instruction, input?}) in one left-padded batch."""
    from transformers import set_seed

    tok = loaded.tokenizer
    prompts = [
        encode_prompt(tok, loaded.template.format(r["instruction"], r.get("input") or "")) for r in records
    ]
    batch = tok.pad([{"input_ids": ids} for ids in prompts], return_tensors="pt")
    device = next(loaded.model.parameters()).device
    set_seed(args.seed)
    out = loaded.model.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        generation_config=generation_config(args, tok),
        streamer=streamer,
    )
    results = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        stopped = tok.eos_token_id in row
        tokens = row[: row.index(tok.eos_token_id)] if stopped else row  # pads only follow EOS
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
    """Answer ``records`` in batches, writing one JSON line per record (to ``output`` or stdout) as it goes."""
    import sys
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    sink = Path(output).open("w", encoding="utf-8") if output else nullcontext(sys.stdout)  # noqa: SIM115
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
