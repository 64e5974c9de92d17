"""``kaika merge``: fold a LoRA adapter into its base weights and write a standard checkpoint.

merge() reads top to bottom: check the paths, load base + adapter in full precision, record the
adapter's logits on a few prompts, ``merge_and_unload``, write everything into a temporary
directory next to the target, reload the merged checkpoint from there and compare logits, and
only then rename it into place. A failed or interrupted merge leaves no half-written model.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kaika.config import DpoConfig, ModelArgs, TrainConfig
from kaika.data.messages import jinja_chat_template
from kaika.data.prompts import ChatTemplate, PromptTemplate, Template
from kaika.data.segments import record_prompt_ids, stop_ids
from kaika.data.tokenize import pad_batch, resolve_pad_token
from kaika.errors import KaikaError
from kaika.guard import check_inputs_outside, check_replaceable, replace_owned
from kaika.modeling.builtin import BUILTIN_CARDS
from kaika.modeling.load import DTYPES, ModelSource, load_model, load_tokenizer
from kaika.modeling.verify import compare_logits, masked_logits, verify_full_model
from kaika.rundir import (
    BASE_NOTICES,
    MERGED_CONFIG_FILE,
    RunDir,
    save_base_notices,
    save_config,
    save_template,
    save_tokenizer,
)

log = logging.getLogger(__name__)

# Prompts the merged model is checked on: Japanese and English, with and without input.
VERIFY_PROMPTS = [
    ("日本の首都はどこですか？", ""),
    ("次の文章を要約してください。", "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"),
    ("Write a haiku about cherry blossoms.", ""),
]
TRAINING_CONFIG_FILE = MERGED_CONFIG_FILE
MERGE_RTOL = 1e-4  # merging only reorders one sum, W x + B A x → (W + BA) x: float32 noise


@dataclass
class MergeResult:
    out_dir: Path
    max_abs_diff: float  # max |logit difference|, merged (float32) vs base + adapter, on the check prompts
    tolerance: float
    rounding: float  # max |logit difference| the written dtype's rounding adds (0 for float32)
    dtype: str
    files: list[str]


def merge(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    dtype: str = "float32",
    max_shard_size: str = "2GB",
    force: bool = False,
) -> MergeResult:
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    run = RunDir.open(adapter_dir, base_model)
    check_out_dir(out_dir, adapter_dir, force)
    check_inputs_outside(out_dir, [run.source.path], "writing the merged model")
    if dtype not in DTYPES:
        raise KaikaError(f"unknown dtype {dtype!r} for the merged checkpoint; use {', '.join(DTYPES)}")
    cfg = run_config(run)
    template = run.template
    tokenizer = load_tokenizer(run.model_args, run.tokenizer_source)
    resolve_pad_token(tokenizer)
    model, trained_quantized = load_full_precision(run.model_args, run.source, adapter_dir)
    batch = verify_batch(tokenizer, template)
    expected = masked_logits(model, batch)  # base + adapter, unmerged
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf weights
    diff, tol = compare(
        masked_logits(merged, batch),
        expected,
        MERGE_RTOL,
        "the merged model's logits differ from base + adapter",
    )
    merged = merged.to(DTYPES[dtype])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_checkpoint(merged, tokenizer, template, cfg, tmp, max_shard_size)
        # The base's provenance and terms: from the run (kaika train copied them), else from the base.
        notices = adapter_dir / BASE_NOTICES
        save_base_notices(notices if notices.is_dir() else run.source.path, tmp)
        # The files are the merged weights (the rule of every save: tensors bit for bit, logits of the
        # reloaded checkpoint with its own and with the in-memory weights).
        verify_full_model(tmp, merged, batch, replace(run.model_args, quantization="none"))
        # What rounding to the written dtype does to the logits: reported, not mistaken for a bad merge.
        rounding = (masked_logits(merged.float(), batch) - expected).abs().max().item()
        del merged, model
        (tmp / "README.md").write_text(
            model_card(cfg, template, adapter_dir, dtype, trained_quantized, diff, tol, rounding),
            encoding="utf-8",
        )
        files = sorted(p.name for p in tmp.iterdir())
        if out_dir.exists():  # --force: checked above, and again now, that kaika wrote it
            replace_owned(out_dir, "--force")
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged model written to %s (max |Δlogit| %.2e, tolerance %.1e)", out_dir, diff, tol)
    return MergeResult(out_dir, diff, tol, rounding, dtype, files)


def check_out_dir(out_dir: Path, adapter_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise KaikaError(f"{out_dir} exists and is a file; choose a directory for the merged model")
    if out_dir.resolve() == adapter_dir.resolve() or adapter_dir.resolve().is_relative_to(out_dir.resolve()):
        raise KaikaError(f"{out_dir} holds the adapter itself; write the merged model somewhere else")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise KaikaError(
                f"{out_dir} is not empty: pass --force to replace it, or choose another directory"
            )
        check_replaceable(out_dir, "--force")


def run_config(run: RunDir) -> TrainConfig:
    """The training config the merged model records: the run's (with the base it is merged into),
    or, for an adapter trained elsewhere, one that holds what is known (its base, its template)."""
    if isinstance(run.config, TrainConfig):
        return replace(run.config, model=run.model_args)
    if isinstance(run.config, DpoConfig):  # preference tuning: its pairs, LoRA and training
        d = run.config
        data = replace(run.data_args, data=list(d.data.data), template=run.template.name)
        return TrainConfig(model=run.model_args, data=data, lora=d.lora, train=d.train)
    if run.config is not None:  # a kaika pretrain LoRA run: its LoRA, training and text
        p = run.config
        data = replace(TrainConfig().data, data=list(p.pretrain.data), template=run.template.name)
        data = replace(data, cutoff_len=p.pretrain.cutoff_len, train_on_inputs=True)
        return TrainConfig(model=run.model_args, data=data, lora=p.lora, train=p.train)
    cfg = TrainConfig()
    return replace(cfg, model=run.model_args, data=replace(cfg.data, template=run.template.name))


def load_full_precision(model_args: ModelArgs, source: ModelSource, adapter_dir: Path):
    """Base in float32 with the adapter attached. Merging into quantized weights would round the
    LoRA update away (and bitsandbytes cannot save a merged 4-bit model), so a base trained
    quantized is reloaded unquantized: the merged model is base + adapter at full precision."""
    from peft import PeftModel

    trained_quantized = model_args.quantization != "none"
    if trained_quantized:
        log.warning(
            "the adapter was trained on a %s-quantized base; merging reloads the base in full precision "
            "(float32) and merges into that: the merged model matches base + adapter unquantized, and can "
            "differ slightly from the quantized model used in training",
            model_args.quantization,
        )
    full = replace(model_args, quantization="none", dtype="float32")
    base = load_model(full, source)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), trained_quantized


def verify_batch(tokenizer, template: Template) -> dict[str, torch.Tensor]:
    prompts = [
        {"input_ids": record_prompt_ids(template, tokenizer, {"instruction": i, "input": x})}
        for i, x in VERIFY_PROMPTS
    ]
    return pad_batch(prompts, tokenizer.pad_token_id, side="left")  # as generation batches them


def write_checkpoint(merged, tokenizer, template, cfg, out: Path, max_shard_size: str) -> None:
    gen = merged.generation_config
    stops = stop_ids(template, tokenizer)  # EOS, and a chat template's end of turn
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    merged.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    # Other servers (vLLM, TGI, apply_chat_template) then prompt the model as kaika does.
    tokenizer.chat_template = (
        template.source if isinstance(template, ChatTemplate) else jinja_chat_template(template)
    )
    save_tokenizer(tokenizer, out)
    save_template(template, out)
    save_config(cfg, out, MERGED_CONFIG_FILE)


def compare(got: torch.Tensor, expected: torch.Tensor, rel_tol: float, what: str) -> tuple[float, float]:
    tol = rel_tol * max(expected.abs().max().item(), 1.0)
    return compare_logits(got, expected, tol, what, "nothing was written"), tol


# --------------------------------------------------------------------------- model card


def data_licence(source: str) -> str:
    """The licence named in a PROVENANCE.md / README.md next to a local data file, if any."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        return (
            "see the dataset's card (hub dataset)"
            if "/" in source and not source.endswith((".json", ".jsonl"))
            else "unknown"
        )
    for name in ("PROVENANCE.md", "README.md", "LICENSE"):
        doc = folder / name
        if doc.is_file():
            m = re.search(
                r"Licen[cs]e[^:\n]*:\s*\**([^*\n]+?)\**\s*(?:\(|$)", doc.read_text(encoding="utf-8"), re.M
            )
            if m:
                return f"{m.group(1).strip()} (from {name})"
    return "unknown (no PROVENANCE.md next to the data)"


def base_terms(card: dict[str, str]) -> str:
    if "license_link" not in card:
        return ""
    return (
        f"; its licence, the {card['license_name']} ({card['license_link']}), applies to this model too: "
        f"`{BASE_NOTICES}/` holds the base's provenance and a copy of the terms, to pass on with the model"
    )


# The card is one Markdown template with the run's facts filled in: long, but read top to bottom.
def model_card(
    cfg: TrainConfig,
    template: Template,
    adapter_dir: Path,
    dtype: str,
    quantized: bool,
    diff,
    tol,
    rounding,
) -> str:
    data_rows = (
        "\n".join(f"| `{d}` | {data_licence(d)} |" for d in cfg.data.data) or "| (not recorded) | unknown |"
    )
    lora, train = cfg.lora, cfg.train
    quant_note = (
        f"\nThe adapter was trained on a {cfg.model.quantization}-quantized base. It was merged into the base "
        "reloaded in full precision (float32), so this model is base + adapter unquantized and can differ "
        "slightly from the quantized model used in training.\n"
        if quantized
        else ""
    )
    question = "日本の首都はどこですか？"
    example = (
        template.format(question)
        if isinstance(template, PromptTemplate)
        else f"(the chat template in tokenizer_config.json, with a user turn: {question})"
    )
    card = BUILTIN_CARDS.get(cfg.model.base_model, {})
    licence = "".join(f"{k}: {card[k]}\n" for k in ("license", "license_name", "license_link") if k in card)
    return f"""---
base_model: {card.get("hub_id", cfg.model.base_model)}
{licence}library_name: transformers
pipeline_tag: text-generation
tags:
- kaika
- lora
- merged
---

# Merged LoRA model (kaika)

A LoRA adapter ({adapter_dir.resolve().name}) merged into its base model with peft's
`merge_and_unload`, saved as a standard Hugging Face checkpoint ({dtype}, safetensors).
Load it with `AutoModelForCausalLM.from_pretrained` — no peft needed.
{quant_note}
- **Base model**: `{cfg.model.base_model}`{base_terms(card)}
- **Check**: on {len(VERIFY_PROMPTS)} prompts the merged weights' logits match base + adapter within
  {diff:.2e} in float32 (tolerance {tol:.1e}); the checkpoint reloaded from these files reproduces them.{
        ""
        if dtype in ("float32", "fp32")
        else f" Rounding the weights to {dtype} moves the logits by up to {rounding:.2e}."
    }

## Training data

| data | licence |
|---|---|
{data_rows}

The model's outputs and weights may be subject to the data's licence terms as well as the base model's.

## Prompt template: `{template.name}`

{template.description}

Prompt the model exactly like this (the answer follows the last line); `template.json` holds
the template, and the tokenizer's `chat_template` maps chat messages onto it (last user message →
instruction, system messages → input, earlier turns → earlier prompt/answer pairs):

```
{example}```

## Training configuration

LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets {", ".join(lora.target)};
{train.epochs:g} epochs (max_steps {train.max_steps}), lr {train.lr:g}, global batch {train.batch_size},
micro batch {train.micro_batch_size}, cutoff_len {cfg.data.cutoff_len}, seed {train.seed};
train_on_inputs={cfg.data.train_on_inputs}. The full resolved config is in `{TRAINING_CONFIG_FILE}`.
"""
