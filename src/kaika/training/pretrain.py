"""``kaika pretrain``: raw text → tokens → packed rows → (new or loaded) model → Trainer → save and verify.

Continued pretraining (LoRA, or every weight with ``--full``) or training from scratch
(``--from-scratch CONFIG``). Checkpoints, resume, logging and the Trainer setup are those of
``kaika train`` (:mod:`kaika.training.trainer`); packing lives in :mod:`kaika.data.packing`, the
held-out loss in :mod:`kaika.training.loss`, the save check in :mod:`kaika.modeling.verify`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kaika.atomic import staged_output
from kaika.config import PretrainConfig
from kaika.data.packing import PackedCollator, enable_packed_attention, pack_documents
from kaika.data.records import DOC_FILES, DataError, Problem, iter_source, split_records
from kaika.data.tokenize import pad_batch, resolve_pad_token
from kaika.errors import KaikaError
from kaika.modeling.load import (
    DTYPES,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_source,
)
from kaika.modeling.verify import verify_full_model
from kaika.rundir import (
    CHECKPOINTS,
    PRETRAIN_REPORT_FILE,
)
from kaika.training.faults import last_good_checkpoint
from kaika.training.launch import detect_launch, engine_dtype
from kaika.training.loss import token_weighted_loss
from kaika.training.saving import RunFiles, release_training_memory, save_verified_adapter
from kaika.training.trainer import (
    Fitted,
    check_recipe,
    fit,
    is_main_process,
    mixed_precision,
    prepare_output_dir,
    run_lock,
    training_arguments,
    world_size,
)

log = logging.getLogger(__name__)

FULL_WEIGHTS = "model.safetensors"  # a full model's save is committed by its weights, moved in last
VERIFY_ROWS = 4
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
NUL_TEXT = "holds NUL characters (\\x00): a binary or corrupt file, not text; remove it"


@dataclass
class PackReport:
    documents: int
    characters: int
    tokens: int  # with one EOS per document
    rows: int
    cutoff_len: int
    pad_tokens: int  # only in the last row
    chars_per_token: float


@dataclass
class PretrainResult:
    output_dir: Path
    global_step: int
    train_loss: float
    tokens_seen: int
    train_seconds: float
    heldout: dict[str, float] | None  # loss, perplexity, tokens on the held-out text
    train_report: PackReport
    model: Any = field(default=None, repr=False)


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    out = check_pretrain_config(cfg)
    cfg = replace(cfg, model=replace(cfg.model, dtype=engine_dtype(detect_launch(), cfg.model.dtype)))
    compute = resolve_dtype(cfg.model.dtype)  # what the weights are multiplied in (autocast)
    with run_lock(out):  # a second run into the same directory is refused, not interleaved
        return _pretrain(master_weights(cfg), out, compute)


def _pretrain(cfg: PretrainConfig, out: Path, compute: torch.dtype) -> PretrainResult:
    train_docs, val_docs = load_documents(cfg)  # all input checked before any model is built
    tokenizer = build_tokenizer(cfg, train_docs, out)
    train_set, train_report = pack(cfg, tokenizer, train_docs, "train")
    val_set, _ = pack(cfg, tokenizer, val_docs, "held-out") if val_docs else ([], None)
    # The distributed state first: ZeRO-3 partitions the base as it loads, FSDP loads it on rank 0 only.
    args = training_arguments(cfg.train, out, compute, False, world_size())
    model = build_model(cfg, tokenizer, mixed_precision(compute))
    if cfg.pretrain.packing == "document":
        enable_packed_attention(model)
    prepare_output_dir(cfg.train, model, tokenizer, None if is_full(cfg) else asdict(cfg.lora))
    # Held-out text is scored once, at the end, token-weighted (the Trainer's eval averages batches).
    collator = PackedCollator(cfg.pretrain.packing)
    ratio = 0.0 if is_full(cfg) else cfg.lora.loraplus_lr_ratio
    fitted = fit(args, cfg.train, model, tokenizer, train_set, [], collator, ratio)
    heldout = score_heldout(fitted, val_set, cfg) if val_set else None
    result = save_and_verify(cfg, fitted, tokenizer, train_set, train_report, heldout, out)
    log.info(
        "done: %s in %s (%d steps, %d tokens, %.0f s)%s",
        "model" if is_full(cfg) else "adapter",
        out,
        result.global_step,
        result.tokens_seen,
        result.train_seconds,
        f", held-out perplexity {heldout['perplexity']:.2f}" if heldout else "",
    )
    return result


def is_full(cfg: PretrainConfig) -> bool:
    return cfg.pretrain.full or cfg.pretrain.from_scratch is not None


def master_weights(cfg: PretrainConfig) -> PretrainConfig:
    """--dtype auto with every weight trained: float32 weights, multiplied in the dtype auto picks (bf16
    under autocast where the device computes it, float32 with TF32 on other GPUs). The optimizer updates
    the weights themselves, and bf16 weights would round most small updates away (LoRA keeps float32
    adapter weights for that reason while its frozen base may be bf16)."""
    if not is_full(cfg) or cfg.model.dtype != "auto":
        return cfg
    log.info("dtype auto with every weight trained (--full): float32 weights (master weights)")
    return replace(cfg, model=replace(cfg.model, dtype="float32"))


def check_pretrain_config(cfg: PretrainConfig) -> Path:
    p = cfg.pretrain
    if not p.data:
        raise KaikaError("no training text: pass --data FILE_OR_DIR (UTF-8 .txt, JSONL with a text field…)")
    inputs = [*p.data, *p.val_data, *([p.from_scratch] if p.from_scratch else [])]
    out, launch = check_recipe(cfg, inputs, command="pretrain", full=is_full(cfg))
    if is_full(cfg) and launch.sharded:
        raise KaikaError(
            f"kaika pretrain --full under {launch.describe()}: the whole-model save of sharded weights is not "
            "built yet; train every weight with DDP or DeepSpeed ZeRO-2, or LoRA (without --full) under "
            "FSDP/ZeRO-3"
        )
    if p.from_scratch and not Path(p.from_scratch).exists():
        raise KaikaError(f"--from-scratch {p.from_scratch}: no such file or directory")
    return out


# --------------------------------------------------------------------------- text


def _text_files(directory: Path) -> list[Path]:
    """Every text file of a directory; files of other kinds are refused by name (none left unread in
    silence), its README/LICENSE/PROVENANCE and Markdown files skipped as documentation."""
    files = sorted(f for f in directory.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(directory).parts))  # fmt: skip
    data = [f for f in files if not DOC_FILES.search(f.name)]
    others = [f for f in data if f.suffix not in TEXT_SUFFIXES]
    if others:
        names = ", ".join(str(f.relative_to(directory)) for f in others[:8]) + (
            " …" if len(others) > 8 else ""
        )
        raise KaikaError(
            f"{directory} holds {len(others)} file(s) that are not text kaika reads (.txt, .jsonl, .json): "
            f"{names}. Move them out, or give the text files themselves"
        )
    if not data:
        raise KaikaError(f"{directory} holds no .txt, .jsonl or .json file")
    return data


def read_documents(sources: list[str], text_field: str) -> list[str]:
    """Every document of ``sources``, in order; all problems in all files reported together."""
    problems: list[Problem] = []
    docs: list[str] = []
    for source in sources:
        path = Path(source)
        is_dataset = path.is_dir() and any((path / m).exists() for m in ("dataset_info.json", "state.json"))
        files = _text_files(path) if path.is_dir() and not is_dataset else [path]
        for file in files:
            if file.suffix == ".txt":
                try:
                    text = file.read_bytes().decode("utf-8")
                    if "\x00" in text:  # a binary file read as text, or a corrupt one
                        problems.append(Problem(str(file), "file", None, NUL_TEXT))
                        continue
                    docs.append(text)
                except OSError as e:
                    problems.append(Problem(str(file), "file", None, f"cannot read: {e.strerror}"))
                except UnicodeDecodeError as e:
                    raw = file.read_bytes()
                    line = raw[: e.start].count(b"\n") + 1
                    problems.append(
                        Problem(str(file), f"line {line}", None, "invalid UTF-8; re-save the file as UTF-8")
                    )
                continue
            for where, rec in iter_source(str(file) if file.exists() else source, problems):
                text = rec.get(text_field) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
                    problems.append(
                        Problem(
                            str(file),
                            where,
                            text_field,
                            f"missing or not a string (record has: {keys}); choose the field with --text-field",
                        )
                    )
                    continue
                if "\x00" in text:
                    problems.append(Problem(str(file), where, text_field, NUL_TEXT))
                    continue
                docs.append(text)
    if problems:
        raise DataError(problems)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise KaikaError(f"no text in {', '.join(sources)}")
    return docs


def load_documents(cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    p = cfg.pretrain
    docs = read_documents(p.data, p.text_field)
    if p.val_data:
        return docs, read_documents(p.val_data, p.text_field)
    return split_records(docs, p.val_set_size, cfg.train.seed, what="held-out documents")


# --------------------------------------------------------------------------- tokenizer, packing


def build_tokenizer(cfg: PretrainConfig, train_docs: list[str], out: Path):
    from transformers import AutoTokenizer

    p = cfg.pretrain
    ckpt = last_good_checkpoint(out / CHECKPOINTS) if cfg.train.resume else None
    if ckpt is not None and (ckpt / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(ckpt)  # the exact tokenizer the run started with
    elif p.from_scratch and p.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(p.tokenizer)
    elif p.from_scratch:
        from kaika.modeling.builtin import train_tokenizer

        log.info("training a byte-level BPE tokenizer (%d tokens) on the training text", p.vocab_size)
        tokenizer = train_tokenizer(p.vocab_size, (line for d in train_docs for line in d.split("\n")))
    else:
        tokenizer = load_tokenizer(cfg.model, resolve_source(cfg.model))
    resolve_pad_token(tokenizer)
    if tokenizer.eos_token_id is None:
        raise KaikaError("the tokenizer has no EOS token, which separates packed documents; use another")
    return tokenizer


def pack(cfg: PretrainConfig, tokenizer, docs: list[str], what: str):
    from tqdm.auto import tqdm

    p = cfg.pretrain
    encoded = [
        tokenizer(d, add_special_tokens=False)["input_ids"]
        for d in tqdm(docs, desc=f"tokenizing {what}", unit="doc", disable=len(docs) < 50)
    ]
    rows = pack_documents(encoded, p.cutoff_len, tokenizer.eos_token_id, tokenizer.pad_token_id, p.packing)
    tokens = sum(len(e) + 1 for e in encoded)
    report = PackReport(
        documents=len(docs),
        characters=sum(len(d) for d in docs),
        tokens=tokens,
        rows=len(rows),
        cutoff_len=p.cutoff_len,
        pad_tokens=len(rows) * p.cutoff_len - tokens,
        chars_per_token=round(sum(len(d) for d in docs) / max(tokens, 1), 3),
    )
    log.info(
        "%s: %d documents, %d tokens (%.2f chars/token) packed into %d rows of %d",
        what,
        report.documents,
        report.tokens,
        report.chars_per_token,
        report.rows,
        report.cutoff_len,
    )
    return rows, report


# --------------------------------------------------------------------------- model


def architecture_config(path: str, tokenizer):
    """A transformers config from ``path`` with the tokenizer's vocabulary size and special ids."""
    from transformers import AutoConfig

    from kaika.config import load_yaml

    src = Path(path)
    if src.is_dir():
        config = AutoConfig.from_pretrained(src)
    else:
        fields = dict(load_yaml(src)) if src.suffix in (".yaml", ".yml") else _load_json(src)
        model_type = fields.pop("model_type", "bloom")
        try:
            config = AutoConfig.for_model(model_type, **fields)
        except (ValueError, TypeError) as e:
            raise KaikaError(f"{src}: not a valid {model_type} config: {e}") from None
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise KaikaError(f"cannot read architecture config {path}: {e}") from None
    if not isinstance(data, dict):
        raise KaikaError(f"{path}: an architecture config must be a JSON object of config fields")
    return data


def build_model(cfg: PretrainConfig, tokenizer, mixed: bool = False):
    from transformers import AutoModelForCausalLM, GenerationConfig, set_seed

    from kaika.modeling.lora import apply_lora, enable_gradient_checkpointing

    p = cfg.pretrain
    set_seed(cfg.train.seed)  # the same seed draws the same initial weights (or LoRA A)
    if p.from_scratch:
        config = architecture_config(p.from_scratch, tokenizer)
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(cfg.model.dtype))
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        n = sum(t.numel() for t in model.parameters())
        log.info("new %s model from %s: %.2f M parameters", config.model_type, p.from_scratch, n / 1e6)
    else:
        model = load_model(cfg.model, resolve_source(cfg.model))
    if is_full(cfg):
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model
    return apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing, mixed)


# --------------------------------------------------------------------------- held-out text, save


def score_heldout(fitted: Fitted, rows: list[dict[str, list[int]]], cfg: PretrainConfig) -> dict[str, float]:
    """Token-weighted loss and perplexity over every target token of the held-out rows; logged as
    the run's eval loss (the training log, the loss curve) through the Trainer's own ``log``."""
    collate = PackedCollator(cfg.pretrain.packing)
    size = cfg.train.micro_batch_size
    batches = (collate(rows[i : i + size]) for i in range(0, len(rows), size))
    heldout = asdict(token_weighted_loss(fitted.model, batches))
    fitted.trainer.log({"eval_loss": heldout["loss"]})
    return heldout


def save_and_verify(
    cfg: PretrainConfig, fitted: Fitted, tokenizer, train_set, report: PackReport, heldout, out: Path
) -> PretrainResult:
    model = fitted.model
    result = PretrainResult(
        out,
        fitted.global_step,
        fitted.train_loss,
        fitted.tokens_seen,
        fitted.seconds,
        heldout,
        report,
        model,
    )
    summary = {
        "train": asdict(report),
        "heldout": heldout,
        "global_step": result.global_step,
        "tokens_seen": result.tokens_seen,
        "train_seconds": round(result.train_seconds, 1),
        "train_loss": result.train_loss,
    }

    source = None if cfg.pretrain.from_scratch else resolve_source(cfg.model)
    files = RunFiles(
        cfg,
        tokenizer,
        fitted.history,
        PRETRAIN_REPORT_FILE,
        summary,
        source=source,
        fingerprint=not is_full(cfg),  # an adapter: the base it needs is recorded
    )
    rows = [{"input_ids": r["input_ids"]} for r in train_set[:VERIFY_ROWS]]  # packed rows: no padding added
    if not is_full(cfg):
        save_verified_adapter(fitted, out, files, rows)
        return result
    release_training_memory(fitted.trainer)
    if not is_main_process():
        return result
    # Written aside, verified there, then moved into `out`, weights last (as kaika train does).
    with staged_output(out, commit=FULL_WEIGHTS) as stage:
        save_full_model(cfg, model, stage)
        files(stage)
        if cfg.train.verify:
            batch = pad_batch(rows, tokenizer.pad_token_id)
            verify_full_model(stage, model, batch, cfg.model, cast=cfg.pretrain.save_dtype != "auto")
    return result


def save_full_model(cfg: PretrainConfig, model, out: Path) -> None:
    """safetensors in ``save_dtype``, in one file (the commit point of the staged save). The trained
    model is rounded to that dtype in place first, so the model in memory is exactly the one on
    disk (and verification can be strict)."""
    trained_dtype = next(model.parameters()).dtype
    save_dtype = DTYPES.get(cfg.pretrain.save_dtype, trained_dtype)
    model.to(save_dtype)
    try:
        model.save_pretrained(out, safe_serialization=True, max_shard_size="1000GB")
    finally:
        model.to(trained_dtype)
