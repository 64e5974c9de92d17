"""``kaika export``: a run, an adapter or a merged model as a GGUF file for llama.cpp and Ollama.

export() reads top to bottom: check the paths; merge base + adapter in float32 (``merge``'s own
step, checked against the unmerged model); write the GGUF file into a temporary directory beside
the target (:mod:`kaika.modeling.to_gguf`); read it back with transformers' GGUF reader, which
undoes llama.cpp's names and layouts on its own, and compare its logits

* with the merged model holding the weights as the file rounds them: equal within float32 noise,
  or the names, layouts or hyperparameters are wrong;
* with the float32 merged model: what the quant type itself does, reported (the rounding of each
  weight matrix is bounded per quant type before that: measured, docs/export.md);

then write the model card, the base's notices and terms, the training config and (``--ollama``) a
Modelfile, and only then move the directory into place. A failed export leaves nothing behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kaika.data.messages import jinja_chat_template
from kaika.data.prompts import ChatTemplate, Template
from kaika.data.segments import prompt_ids, stop_ids
from kaika.errors import KaikaError
from kaika.guard import check_inputs_outside, is_kaika_hidden
from kaika.inference.card import Check, base_facts, model_card
from kaika.inference.merge import (
    Merged,
    check_out_dir,
    compare,
    merge_in_memory,
    save_notices,
    written_aside,
)
from kaika.inference.ollama import modelfile
from kaika.modeling.to_gguf import QUANTS, reader_config, rope_of, write_gguf
from kaika.modeling.verify import masked_logits
from kaika.rundir import MERGED_CONFIG_FILE, RunDir, save_config, save_template

log = logging.getLogger(__name__)

FORMATS = ("gguf",)
# The file read back must reproduce the weights as written: float32 noise of two loads of one model.
FILE_RTOL = 1e-4
# What rounding may do to one weight matrix, as relative RMS error ||w' - w|| / ||w||, before the
# export is refused: about 2.5x what was measured on every matrix of gemma-3-270m and the tiny test
# models (f16 2.1e-4, bf16 1.7e-3, q8_0 5.4e-3 to 6.0e-3; docs/export.md).
WEIGHT_RTOL = {"f16": 5e-4, "bf16": 4e-3, "q8_0": 1.5e-2}


@dataclass
class ExportResult:
    out_dir: Path
    gguf_file: Path
    quant: str
    file_diff: float  # max |Δlogit|, the file read back vs the weights as rounded for it
    file_tol: float
    quant_diff: float  # max |Δlogit|, the file read back vs the float32 merged model (reported)
    weight_error: float  # the largest relative RMS error the rounding put on one matrix
    weight_bound: float
    files: list[str]
    kept_f16: list[str]


def export(
    source: str | Path,
    out_dir: str | Path,
    *,
    format: str = "gguf",  # the option's name, --format
    quant: str = "f16",
    base_model: str | None = None,
    ollama: bool = False,
    force: bool = False,
) -> ExportResult:
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.suffix == ".gguf" and not out_dir.is_dir():
        raise KaikaError(
            f"{out_dir}: kaika export writes a directory (the GGUF file, its Modelfile and model card); give "
            f"one such as {out_dir.with_suffix('')}/ and the file is named after it"
        )
    if format not in FORMATS:
        raise KaikaError(f"unknown export format {format!r}; kaika writes {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise KaikaError(f"unknown GGUF quant {quant!r}; use {', '.join(QUANTS)}")
    run = RunDir.open(source, base_model, adapter=False)
    check_out_dir(out_dir, source, force)
    check_inputs_outside(out_dir, [run.source.path], "writing the exported model")
    m = merge_in_memory(run)
    name = f"{out_dir.name}.gguf" if out_dir.name.endswith(quant) else f"{out_dir.name}-{quant}.gguf"
    template, tokenizer = m.template, m.tokenizer
    stops = stop_ids(template, tokenizer)  # EOS, and a chat template's end of turn
    chat = template.source if isinstance(template, ChatTemplate) else jinja_chat_template(template)
    licence = base_facts(m.cfg.model.base_model).get("license")

    with written_aside(out_dir) as tmp:
        written = write_gguf(
            m.model,
            tokenizer,
            tmp / name,
            quant,
            name=out_dir.name,
            chat_template=chat,
            end_of_turn=stops[-1] if len(stops) > 1 else None,
            add_bos=prompts_start_with_bos(template, tokenizer),
            metadata={"license": licence} if licence else None,
        )
        if not written.weight_error <= WEIGHT_RTOL[quant]:  # NaN included
            raise KaikaError(
                f"GGUF export: {quant} rounding changed a weight matrix by {written.weight_error:.2e} (relative "
                f"RMS), more than the {WEIGHT_RTOL[quant]:.0e} expected of it; nothing was written. Try --quant f16"
            )
        file_diff, file_tol, quant_diff = verify_gguf(tmp / name, written.expected, m)
        check = Check(
            m.diff,
            m.tol,
            m.trained_quantized,
            quantized_gap=m.quantized_gap,
            dtype=quant,
            rounding=quant_diff,
            gguf_file=name,
            gguf_file_diff=file_diff,
            ollama=ollama,
            kept_f16=written.kept_f16,
            trained=m.run.config is not None,
        )
        save_notices(m.run, tmp)
        save_config(m.cfg, tmp, MERGED_CONFIG_FILE)
        save_template(template, tmp)
        (tmp / "README.md").write_text(model_card(m.cfg, template, source, check), encoding="utf-8")
        if ollama:
            stop_texts = [tokenizer.decode([i]) for i in stops]
            terms = base_facts(m.cfg.model.base_model)
            notice = (
                f"{terms.get('license_name', terms.get('license'))}: {terms['license_link']}"
                if "license_link" in terms
                else None
            )
            (tmp / "Modelfile").write_text(
                modelfile(name, template, tokenizer, stop_texts, notice), encoding="utf-8"
            )
        files = sorted(p.name for p in tmp.iterdir() if not is_kaika_hidden(p.name))
    log.info(
        "GGUF %s written to %s (read back: max |Δlogit| %.2e vs the written weights; %s moves the logits by %.2e)",
        quant,
        out_dir / name,
        file_diff,
        quant,
        quant_diff,
    )
    return ExportResult(
        out_dir,
        out_dir / name,
        quant,
        file_diff,
        file_tol,
        quant_diff,
        written.weight_error,
        WEIGHT_RTOL[quant],
        files,
        written.kept_f16,
    )


def prompts_start_with_bos(template: Template, tokenizer) -> bool:
    """Whether kaika's prompts begin with BOS (a tokenizer that adds it, a chat template that writes
    it): the file then tells llama.cpp to add it, and Ollama's TEMPLATE leaves it out."""
    bos = tokenizer.bos_token_id
    return bos is not None and prompt_ids(template, tokenizer, [{"role": "user", "content": "?"}])[:1] == [
        bos
    ]


@torch.no_grad()
def verify_gguf(path: Path, expected: dict[str, torch.Tensor], m: Merged) -> tuple[float, float, float]:
    """Read ``path`` back with transformers and compare (see the module docstring). ``m.model`` ends
    holding the weights as the file rounds them.

    The tensors are read by ``from_pretrained(gguf_file=…)`` into a model of the merged model's own
    config: transformers' reader fills some hyperparameters with defaults that are not llama.cpp's
    (GPT-2's context, Gemma 3's attention scale), so the hyperparameters it does read are compared
    with the config one by one instead."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    check_hyperparameters(load_gguf_checkpoint(str(path))["config"], m.model.config)
    merged_logits = masked_logits(m.model, m.batch)
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=reader_config(m.model.config), dtype=torch.float32
        )
    except Exception as e:  # transformers could not make sense of the file: not one to publish
        raise KaikaError(
            f"verification failed: transformers cannot read the GGUF file back ({e}); nothing was written"
        ) from e
    got = masked_logits(reloaded.eval(), m.batch)
    del reloaded
    _, unexpected = m.model.load_state_dict(expected, strict=False)
    if unexpected:
        raise KaikaError(f"GGUF export: tensors the model does not have: {unexpected[:3]}")
    file_diff, file_tol = compare(
        got,
        masked_logits(m.model, m.batch),
        FILE_RTOL,
        "the GGUF file read back does not reproduce the weights it was written from (tensor names or layouts)",
    )
    quant_diff = (got - merged_logits).abs().max().item()  # the quant type's own effect: reported
    return file_diff, file_tol, quant_diff


def check_hyperparameters(read: dict, config) -> None:
    """Every hyperparameter transformers' reader takes from the file equals the model's (token ids
    aside: the file holds the tokenizer's, which generation uses)."""
    wrong = []
    for key, value in read.items():
        if key.endswith("_token_id") or key.startswith("_") or not isinstance(value, int | float):
            continue
        mine = (
            rope_of(config, "full_attention")["theta"] if key == "rope_theta" else getattr(config, key, None)
        )
        if not isinstance(mine, int | float) or isinstance(mine, bool):
            continue
        if abs(float(value) - float(mine)) > 1e-6 * max(abs(float(mine)), 1e-6):
            wrong.append(f"{key} {value} (the model has {mine})")
    if wrong:
        raise KaikaError(
            f"verification failed: the GGUF file's hyperparameters differ from the model's: {'; '.join(wrong)}; "
            "nothing was written"
        )
