"""The model card (``README.md``) of a merged or exported model, as the Hugging Face hub expects it.

The YAML block is ``huggingface_hub``'s ``ModelCardData``: ``base_model`` (a hub id, where one is
known), the licence (the base model's: its terms apply to everything trained from it, e.g. Gemma's),
hub ``datasets``, ``language: ja``, ``library_name``, ``pipeline_tag``, tags, and ``model-index`` with
the run's evaluation results. The body says what the model is, how it was checked, how to load it,
its prompt format, data (with licences and the data report), training configuration and results.
Everything is read from the run directory (kaika's file names: :mod:`kaika.rundir`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaika.config import TrainConfig
from kaika.data.prompts import PromptTemplate, Template
from kaika.modeling.builtin import BUILTIN_CARDS
from kaika.rundir import BASE_NOTICES, EVAL_DIR, EVAL_SUMMARY, MERGED_CONFIG_FILE, REPORT_FILE

log = logging.getLogger(__name__)

# Task files whose hub dataset is known, for model-index (kaika ships ELYZA-tasks-100 for evaluation).
HUB_DATASETS = {"elyza-tasks-100": "elyza/ELYZA-tasks-100", "elyza_tasks_100": "elyza/ELYZA-tasks-100"}
EXAMPLE_QUESTION = "日本の首都はどこですか？"


@dataclass
class Check:
    """How the written model was verified, in the card's words."""

    merge_diff: float  # merged vs base + adapter, float32 (0 when nothing was merged)
    merge_tol: float
    trained_quantized: bool
    quantized_gap: float | None = None  # max |Δlogit|, full-precision merge vs the quantized model trained
    dtype: str = "float32"  # merged: the checkpoint's dtype; gguf: the quant type
    rounding: float = 0.0  # max |Δlogit| the written precision adds, against float32
    gguf_file: str | None = None
    gguf_file_diff: float | None = None  # read back vs the weights as rounded, float32
    ollama: bool = False
    kept_f16: list[str] = field(default_factory=list)
    trained: bool = True  # the training config is the run's (else: a model exported as it is, no run known)


# --------------------------------------------------------------------------- facts from the run


def data_licence(source: str) -> str:
    """The licence named in a PROVENANCE.md / README.md next to a local data file, if any."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        return "see the dataset's card (hub dataset)" if is_hub_id(source) else "unknown"
    for name in ("PROVENANCE.md", "README.md", "LICENSE"):
        doc = folder / name
        if doc.is_file():
            m = re.search(
                r"Licen[cs]e[^:\n]*:\s*\**([^*\n]+?)\**\s*(?:\(|$)", doc.read_text(encoding="utf-8"), re.M
            )
            if m:
                return f"{m.group(1).strip()} (from {name})"
    return "unknown (no PROVENANCE.md next to the data)"


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path or a data file."""
    return (
        bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name))
        and not Path(name).exists()
        and not name.endswith((".json", ".jsonl", ".csv"))
    )


def front_matter(text: str) -> dict[str, Any]:
    import yaml

    m = re.match(r"---\n(.*?)\n---", text, re.S)
    data = yaml.safe_load(m.group(1)) if m else None
    return data if isinstance(data, dict) else {}


def base_facts(base: str) -> dict[str, Any]:
    """What is known of the base model: its hub id and licence (a builtin's card, else the YAML of a
    local base directory's README.md)."""
    if base in BUILTIN_CARDS:
        return dict(BUILTIN_CARDS[base])
    readme = Path(base) / "README.md"
    if readme.is_file():
        meta = front_matter(readme.read_text(encoding="utf-8"))
        facts = {
            k: meta[k] for k in ("license", "license_name", "license_link") if isinstance(meta.get(k), str)
        }
        if isinstance(meta.get("base_model"), str) and is_hub_id(meta["base_model"]):
            facts["hub_id"] = meta["base_model"]
        return facts
    return {"hub_id": base} if is_hub_id(base) else {}


def eval_results(run_dir: Path) -> list[dict[str, Any]]:
    """The run's own evaluations: ``kaika eval generate … --output-dir RUN/eval/NAME`` summaries and
    ``kaika eval loss … --json RUN/eval/NAME.json`` files, for the tuned model (and its base beside
    it). A file that is not what kaika eval writes is left out with a warning: a card is no reason
    to lose an export."""
    results = []
    sources = [(f, "summary") for f in sorted((run_dir / EVAL_DIR).glob(f"*/{EVAL_SUMMARY}"))]
    sources += [(f, "loss") for f in sorted((run_dir / EVAL_DIR).glob("*.json"))]
    for path, kind in sources:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if kind == "summary":
                models = data["models"]
                name = Path(data.get("tasks_file") or path.parent.name).stem
                metrics = ("chrf", "stop_rate", "repetition", "judge_mean")
            else:
                models, name, metrics = data, path.stem, ("loss", "perplexity")
            tuned = models.get("adapter") or models.get("model")
            base = (models.get("base") or {}) if "adapter" in models else {}
            if not isinstance(tuned, dict):
                continue
            for metric in metrics:
                if tuned.get(metric) is not None:
                    value, before = float(tuned[metric]), base.get(metric)
                    before = None if before is None else float(before)
                    results.append({"dataset": name, "metric": metric, "value": value, "base": before})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("model card: %s is not a kaika eval result (%s); left out", path, e)
    return results


def data_report(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / REPORT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --------------------------------------------------------------------------- the card


def card_data(cfg: TrainConfig, run_dir: Path, kind: str, model_name: str, check: Check):
    """The hub's YAML metadata (``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import EvalResult, ModelCardData

    base = base_facts(cfg.model.base_model)
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=HUB_DATASETS.get(r["dataset"].lower(), r["dataset"]),
            dataset_name=r["dataset"],
            metric_type=r["metric"],
            metric_value=round(float(r["value"]), 4),
        )
        for r in eval_results(run_dir)
    ]
    adapted = check.trained or bool(check.merge_tol)  # a kaika run, or an adapter merged here
    tags = ["kaika"] + (["lora"] if adapted else []) + ["japanese"]
    tags += ["gguf", "llama.cpp"] if kind == "gguf" else ["merged"]
    relation = "finetune" if adapted else "quantized"
    return ModelCardData(
        base_model=base.get("hub_id"),
        base_model_relation=relation if base.get("hub_id") else None,
        license=base.get("license"),
        license_name=base.get("license_name") if base.get("license") == "other" else None,
        license_link=base.get("license_link") if base.get("license") == "other" else None,
        datasets=([d for d in cfg.data.data if is_hub_id(d)] or None) if check.trained else None,
        language=["ja"],
        library_name="transformers" if kind == "merged" else None,
        pipeline_tag="text-generation",
        tags=tags,
        model_name=model_name if results else None,
        eval_results=results or None,
    )


def licence_line(cfg: TrainConfig) -> str:
    base = base_facts(cfg.model.base_model)
    if "license_link" in base:
        return (
            f"its licence, the {base.get('license_name', base['license'])} ({base['license_link']}), applies "
            f"to this model too: `{BASE_NOTICES}/` holds the base's provenance and a copy of the terms, to pass "
            "on with the model"
        )
    if "license" in base:
        return f"licence `{base['license']}`, which applies to this model too"
    return "its licence applies to this model too (see the base model's card)"


def model_card(cfg: TrainConfig, template: Template, source: Path, check: Check) -> str:
    """The whole README.md: hub metadata, then the body."""
    kind = "gguf" if check.gguf_file else "merged"
    data = card_data(cfg, source, kind, source.resolve().name, check)
    return f"---\n{data.to_yaml()}\n---\n\n" + card_body(cfg, template, source, check)


def card_body(cfg: TrainConfig, template: Template, source: Path, check: Check) -> str:
    lora, train = cfg.lora, cfg.train
    sections = [
        intro(cfg, source, check),
        "## How to use it\n\n" + usage(template, check),
        "## Prompt format\n\n" + prompt_section(template),
    ]
    if not check.trained:
        return "\n".join(sections)
    sections += [
        "## Training data\n\n" + data_section(cfg, source),
        (
            "## Training configuration\n\n"
            f"{lora_words(lora)}, targets {', '.join(lora.target)}; "
            f"{train.epochs:g} epochs (max_steps {train.max_steps}), lr {train.lr:g}, global batch "
            f"{train.batch_size}, micro batch {train.micro_batch_size}, cutoff_len {cfg.data.cutoff_len}, seed "
            f"{train.seed}; train_on_inputs={cfg.data.train_on_inputs}. The full resolved config is in "
            f"`{MERGED_CONFIG_FILE}`.\n"
        ),
    ]
    results = results_section(source)
    if results:
        sections.append("## Evaluation\n\n" + results)
    return "\n".join(sections)


def intro(cfg: TrainConfig, source: Path, check: Check) -> str:
    gap = (
        f" (measured on the check prompts: logits within {check.quantized_gap:.3g} of the quantized base + adapter)"
        if check.quantized_gap is not None
        else ""
    )
    quant = (
        f"\nThe adapter was trained on a {cfg.model.quantization}-quantized base. It was merged into the base "
        "reloaded in full precision (float32), so this model is base + adapter unquantized and differs "
        f"slightly from the quantized model used in training{gap}.\n"
        if check.trained_quantized
        else ""
    )
    merged = (
        f"On the check prompts the merged weights' logits match base + adapter within {check.merge_diff:.2e} "
        f"in float32 (tolerance {check.merge_tol:.1e})"
        if check.merge_tol
        else "The model was exported as it is (nothing to merge)"
    )
    if check.gguf_file:
        origin = (
            "a LoRA adapter merged into its base model with peft's `merge_and_unload`"
            if check.merge_tol
            else "a model trained with kaika"
            if check.trained
            else "a model exported as it is"
        )
        what = (
            f"`{source.resolve().name}` ({origin}) as a GGUF file for llama.cpp, Ollama and LM Studio: "
            f"`{check.gguf_file}` ({check.dtype})."
        )
        verified = (
            f"{merged}. The GGUF file, read back with transformers' GGUF reader, reproduces the weights as "
            f"written ({check.dtype}) within {check.gguf_file_diff:.2e} in the logits; {check.dtype} itself "
            f"moves the logits by up to {check.rounding:.2e} against the float32 merged model."
        )
        if check.kept_f16:
            verified += (
                f" {len(check.kept_f16)} matrices whose rows do not divide into 32-wide blocks are f16."
            )
    else:
        what = (
            f"A LoRA adapter ({source.resolve().name}) merged into its base model with peft's `merge_and_unload`, "
            f"saved as a standard Hugging Face checkpoint ({check.dtype}, safetensors)."
        )
        verified = f"{merged}; the checkpoint reloaded from these files reproduces them." + (
            ""
            if check.dtype in ("float32", "fp32")
            else f" Rounding the weights to {check.dtype} moves the logits by up to {check.rounding:.2e}."
        )
    return (
        f"# {source.resolve().name} (kaika)\n\n{what}\n{quant}\n"
        f"- **Base model**: `{cfg.model.base_model}`; {licence_line(cfg)}\n"
        f"- **Check**: {verified}\n"
    )


def usage(template: Template, check: Check) -> str:
    if check.gguf_file:
        text = (
            f"```bash\nllama-cli -m {check.gguf_file} -cnv      # llama.cpp, with the chat template in the file\n"
            f"llama-server -m {check.gguf_file}          # an OpenAI-compatible server\n"
        )
        if check.ollama:
            text += "ollama create my-model -f Modelfile   # Ollama: the Modelfile next to this card\nollama run my-model\n"
        return text + "```\n"
    return (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'tok = AutoTokenizer.from_pretrained("PATH")\nmodel = AutoModelForCausalLM.from_pretrained("PATH")\n'
        f'messages = [{{"role": "user", "content": "{EXAMPLE_QUESTION}"}}]\n'
        'ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")\n'
        "print(tok.decode(model.generate(ids, max_new_tokens=128)[0][ids.shape[1]:], skip_special_tokens=True))\n"
        "```\n\nNo peft needed: the adapter is in the weights. `generation_config.json` stops on the run's "
        "end-of-turn tokens.\n"
    )


def prompt_section(template: Template) -> str:
    if isinstance(template, PromptTemplate):
        return (
            f"`{template.name}`: {template.description}\n\nPrompt the model exactly like this (the answer follows "
            "the last line); `template.json` holds the template where it travels, and the chat template in the "
            "tokenizer maps chat messages onto it (last user message → instruction, system messages → input, "
            f"earlier turns → earlier prompt/answer pairs):\n\n```\n{template.format(EXAMPLE_QUESTION)}```\n"
        )
    return f"`{template.name}`: the chat template in the tokenizer (and in the GGUF file), with the base's roles.\n"


def data_section(cfg: TrainConfig, source: Path) -> str:
    rows = (
        "\n".join(f"| `{d}` | {data_licence(d)} |" for d in cfg.data.data) or "| (not recorded) | unknown |"
    )
    text = (
        f"| data | licence |\n|---|---|\n{rows}\n\nThe model's outputs and weights may be subject to the data's "
        "licence terms as well as the base model's.\n"
    )
    report = data_report(source)
    if report:
        text += (
            f"\nData report: {report.get('kept', '?')} of {report.get('records', '?')} examples trained "
            f"({report.get('tokens', '?')} tokens, {report.get('supervised_tokens', '?')} of them supervised; "
            f"{report.get('truncated', 0)} answers cut at cutoff_len {report.get('cutoff_len', '?')}, "
            f"{report.get('dropped_prompt_too_long', 0)} prompts too long to keep).\n"
        )
    return text


def results_section(source: Path) -> str:
    results = eval_results(source)
    if not results:
        return ""
    rows = "\n".join(
        f"| {r['dataset']} | {r['metric']} | {fmt(r['base'])} | {fmt(r['value'])} |" for r in results
    )
    return (
        "Measured by `kaika eval` on the run (before export), base model vs this model:\n\n"
        f"| data | metric | base | this model |\n|---|---|--:|--:|\n{rows}\n"
    )


def fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


def lora_words(lora) -> str:
    """ "LoRA r=8, alpha=16, dropout=0.05", with the variant and init first ("DoRA r=8 …", "LoRA, PiSSA
    init r=8 … (saved converted to a plain LoRA of rank 16 on the unmodified base)")."""
    from kaika.modeling.lora import describe, mutates_base

    words = f"{describe(lora)} r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}"
    if mutates_base(lora):
        words += f" (saved converted to a plain LoRA of rank {2 * lora.r} on the unmodified base)"
    return words
