"""``kaika dpo``: preference pairs → tokens → base + LoRA (fresh, or an SFT run's) → TRL's trainer → save and verify.

The losses are TRL's (``DPOTrainer`` for dpo and ipo; ``ORPOTrainer`` and ``CPOTrainer`` with
SimPO's loss from ``trl.experimental``); what is kaika's is around them: the pairs are validated
and encoded by :mod:`kaika.data.preference` with the encoder of ``kaika train`` and ``generate``
(TRL's own tokenization of prompt + answer as one text would let byte-level BPE merge across the
boundary), the order is seeded per epoch (resume and DDP reproduce it), and the run is guarded,
logged, checkpointed, saved aside and verified as ``kaika train``'s is.

The reference of dpo/ipo: with ``--from RUN`` a frozen copy of the run's adapter (TRL adds it to
the same PeftModel as a second adapter, ``ref``: one base in memory); for a fresh adapter the base
itself, the adapter switched off.
"""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kaika.config import DpoConfig, ModelArgs
from kaika.data.preference import PreferenceReport, encode_pairs, load_pairs
from kaika.data.prompts import AUTO, CHAT, Template, load_template, resolve_template
from kaika.data.records import split_records
from kaika.data.tokenize import resolve_pad_token
from kaika.data.unpaired import UnpairedReport, encode_unpaired, load_unpaired
from kaika.errors import KaikaError
from kaika.modeling.load import (
    ModelSource,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_source,
)
from kaika.modeling.lora import apply_lora, enable_gradient_checkpointing
from kaika.modeling.qkv import apply_slice_masks, parse_slices
from kaika.rundir import (
    LOG_FILE,
    REPORT_FILE,
    RunDir,
)
from kaika.training.saving import RunFiles, save_verified_adapter
from kaika.training.trainer import (
    Fitted,
    JsonlLogCallback,
    LoraPlus,
    SeededOrder,
    check_recipe,
    log_batch,
    mixed_precision,
    prepare_output_dir,
    run_fit,
    run_lock,
    training_arguments,
    world_size,
)

log = logging.getLogger(__name__)

VERIFY_PAIRS = 4
REFERENCE_FREE = ("orpo", "simpo")


@dataclass
class PreferenceResult:
    output_dir: Path
    global_step: int
    train_loss: float
    eval_loss: float | None
    train_seconds: float
    reward_accuracy: float | None  # the last logged (training) value
    reward_margin: float | None
    data_report: PreferenceReport | UnpairedReport
    model: Any = field(default=None, repr=False)  # the trained PeftModel, in memory
    kl: float | None = None  # kto: the last logged estimate of KL(policy ‖ reference)


def dpo(cfg: DpoConfig) -> PreferenceResult:
    out, run = check_config(cfg)
    if run is not None:
        cfg = replace(cfg, model=start_model_args(cfg.model, run))
    with run_lock(out):
        return _dpo(cfg, run, out)


def _dpo(cfg: DpoConfig, run: RunDir | None, out: Path) -> PreferenceResult:
    if cfg.data.template not in (AUTO, CHAT):
        load_template(cfg.data.template)  # a bad template file fails before the data is read
    train_pairs, val_pairs = load_data(cfg)  # all input checked before any model is loaded
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, run.tokenizer_source if run else source)
    resolve_pad_token(tokenizer)
    template = choose_template(cfg, run, tokenizer, train_pairs)
    train_rows, report = encode(cfg, train_pairs, template, tokenizer)
    val_rows, _ = encode(cfg, val_pairs, template, tokenizer)
    log.info("data: %s", report.summary())
    hint = (
        report.weights_hint(cfg.dpo.desirable_weight, cfg.dpo.undesirable_weight)
        if cfg.dpo.loss == "kto"
        else None
    )
    if hint:
        log.warning("kto: %s", hint)
    model = build_model(cfg, run, source)
    # --from: the run's adapter trains on (its shape is the run's); only LoRA+ is this command's
    lora = {"loraplus_lr_ratio": cfg.lora.loraplus_lr_ratio} if run is not None else asdict(cfg.lora)
    prepare_output_dir(cfg.train, model, tokenizer, lora)
    trainer = build_trainer(cfg, run, model, tokenizer, train_rows, val_rows)
    fitted = run_fit(trainer, cfg.train, bool(val_rows))
    result = save_and_verify(cfg, fitted, tokenizer, template, report, source, train_rows, out)
    log.info(
        "done: adapter in %s (%d steps, %.0f s; %s)",
        out,
        result.global_step,
        result.train_seconds,
        f"KL {_fmt(result.kl)}, reward margin {_fmt(result.reward_margin)}"
        if cfg.dpo.loss == "kto"
        else f"reward accuracy {_fmt(result.reward_accuracy)}, margin {_fmt(result.reward_margin)}",
    )
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def check_config(cfg: DpoConfig) -> tuple[Path, RunDir | None]:
    """What can be known wrong without reading data or loading a model fails here, first."""
    inputs = [*cfg.data.data, *cfg.data.val_data, *([cfg.dpo.from_run] if cfg.dpo.from_run else [])]
    out, launch = check_recipe(cfg, inputs, command="dpo")
    if launch.engine in ("fsdp", "deepspeed"):
        raise KaikaError(
            f"kaika dpo under {launch.describe()}: kaika runs TRL's preference trainers in one process or "
            "with DDP only, so far; launch with torchrun or configs/accelerate/ddp.yaml"
        )
    if cfg.dpo.loss == "kto" and cfg.train.micro_batch_size < 2:
        raise KaikaError(
            "--loss kto with --micro-batch-size 1: KTO estimates its KL term from the other answers of each "
            "micro batch, so it needs 2 or more (the KL estimate would equal the reward). Raise --micro-batch-size"
        )
    if cfg.dpo.precompute_ref and cfg.dpo.loss in REFERENCE_FREE:
        raise KaikaError(f"--precompute-ref: the {cfg.dpo.loss} loss has no reference model to precompute")
    run = None
    if cfg.dpo.from_run:
        run = RunDir.open(cfg.dpo.from_run)  # a missing or half-written adapter is refused here
        if Path(cfg.dpo.from_run).resolve() == Path(cfg.train.output_dir).resolve():
            raise KaikaError("--from and --output-dir are the same directory: the SFT run would be replaced")
    return out, run


def start_model_args(given: ModelArgs, run: RunDir) -> ModelArgs:
    """The base model of ``--from RUN``: the run's (its base, dtype, quantization, attention); a
    different --base-model is refused (the adapter was trained on the run's), a --dtype other than
    auto overrides the run's."""
    saved = run.model_args
    default = ModelArgs().base_model
    if given.base_model not in (default, saved.base_model):
        raise KaikaError(
            f"--from {run.name}: its adapter was trained on {saved.base_model}, not {given.base_model}; "
            "drop --base-model (the run's base is used)"
        )
    return replace(saved, dtype=given.dtype if given.dtype != "auto" else saved.dtype)


def load_data(cfg: DpoConfig) -> tuple[list[dict], list[dict]]:
    """Pairs, or for kto single answers with their labels (pairs split in two)."""
    if cfg.dpo.loss != "kto":
        pairs = load_pairs(cfg.data.data, cfg.data.columns)
        if cfg.data.val_data:
            return pairs, load_pairs(cfg.data.val_data, cfg.data.columns)
        return split_records(pairs, cfg.data.val_set_size, cfg.train.seed, "validation pairs")
    records = load_unpaired(cfg.data.data, cfg.data.columns)
    if cfg.data.val_data:
        return records, load_unpaired(cfg.data.val_data, cfg.data.columns)
    # Split by source record: the two halves of a pair (same prompt) stay on one side.
    groups = [list(g) for _, g in itertools.groupby(records, key=lambda r: r["where"])]
    train, val = split_records(groups, cfg.data.val_set_size, cfg.train.seed, "validation records")
    return [r for g in train for r in g], [r for g in val for r in g]


def encode(cfg: DpoConfig, records: list[dict], template, tokenizer):
    if cfg.dpo.loss != "kto":
        return encode_pairs(records, template, tokenizer, cfg.data.cutoff_len)
    rows, report = encode_unpaired(records, template, tokenizer, cfg.data.cutoff_len)
    # KTO estimates its KL term from each micro batch's answers paired with other prompts, in the
    # order the batches come (TRL trains KTO in a fixed order): shuffled once here, by the seed, so
    # that batches mix prompts and labels.
    random.Random(cfg.train.seed).shuffle(rows)
    return rows, report


def choose_template(cfg: DpoConfig, run: RunDir | None, tokenizer, pairs: list[dict]) -> Template:
    """``auto`` continues an SFT run with the template it trained with (its answers are in that
    format); otherwise as ``kaika train`` chooses."""
    if run is not None and cfg.data.template == AUTO:
        template = run.template
    else:
        template = resolve_template(cfg.data.template, tokenizer, any("messages" in p for p in pairs))
    log.info(
        "template: %s (%s); loss %s, beta %g; loss on the answers only",
        template.name,
        "the base model's chat template" if template.kind == "chat" else "kaika's template",
        cfg.dpo.loss,
        cfg.beta,
    )
    return template


def build_model(cfg: DpoConfig, run: RunDir | None, source: ModelSource):
    """The policy: the SFT run's adapter, trainable (its q/k/v slices held as it trained them), or
    a fresh LoRA of ``cfg.lora`` on the base."""
    from peft import PeftModel
    from transformers import set_seed

    model = load_model(cfg.model, source)
    set_seed(cfg.train.seed)
    if run is None:
        mixed = mixed_precision(resolve_dtype(cfg.model.dtype))
        return apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing, mixed)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = PeftModel.from_pretrained(model, run.path, is_trainable=True)
    lora = run.config.lora if run.config is not None else None
    slices = parse_slices(lora.qkv) if lora is not None else None
    if slices:
        apply_slice_masks(model, slices, lora.r)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "continuing the adapter of %s: %s trainable parameters of %s",
        run.name,
        f"{trainable:,}",
        f"{total:,}",
    )
    return model


# --------------------------------------------------------------------------- TRL's trainers


def _import_trainers():
    """TRL's three trainers; ORPO and CPO live in ``trl.experimental``, which warns on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import DPOConfig, DPOTrainer
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer, CPOConfig, CPOTrainer


def kto_classes():
    from trl import KTOConfig, KTOTrainer

    class KaikaKTOTrainer(LoraPlus, KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """Encoded by kaika.data.unpaired; what is left of TRL's preparation is the KL pairing: in each
            micro batch of the fixed order, every prompt with the previous record's answer (the first
            with the last's), as TRL pairs them."""
            if not self.calculate_KL:
                return dataset

            def rotate(batch):
                answers = batch["completion_ids"]
                return {"KL_completion_ids": answers[-1:] + answers[:-1]}

            return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

    return KaikaKTOTrainer, KTOConfig


# TRL's chunked log-probabilities, sized for a CPU. Off CUDA/XPU TRL scores every position, the
# prompt's too (compact scoring is tied to its Triton kernel, to spare Neuron recompilations), in
# tiles of 4096 tokens × 32768 vocabulary entries, whose fp32 temporaries (0.5 GB each) are mapped
# and unmapped at every tile. Measured on 2 cores, gemma-3-270m bf16, micro batch 4 of seed-prefs-ja,
# one DPO step: 36-44 tokens/s as TRL ships, 235-241 with compact scoring and 512 × 4096 tiles
# (8 MB), the same loss (tests/training/test_dpo.py checks it against the formula).
CPU_TOKEN_TILE, CPU_VOCAB_TILE = 512, 4096


def tune_for_cpu() -> None:
    """Score only the answers' positions, in cache-sized tiles (see above); a no-op on GPUs."""
    import torch

    if torch.cuda.is_available():
        return
    import trl.kernels.chunked_logprob as kernels
    import trl.trainer.utils as trl_utils

    trl_utils._use_triton = lambda device: True  # read once per call, for `compact` only
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_VOCAB_TILE
    kernels.TOKEN_CHUNK_SIZE = CPU_TOKEN_TILE


def paired_rows(feature: dict) -> dict[str, list[int]]:
    """kaika's encoded pair in the row layout of TRL's ORPO and CPO trainers (prompt, then each
    answer after it, labels -100 over the prompt)."""
    p = feature["prompt_ids"]
    row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
    for side in ("chosen", "rejected"):
        a = feature[f"{side}_ids"]
        row[f"{side}_input_ids"] = p + a
        row[f"{side}_attention_mask"] = [1] * (len(p) + len(a))
        row[f"{side}_labels"] = [-100] * len(p) + a
    return row


def trainer_classes():
    DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer, CPOConfig, CPOTrainer = _import_trainers()

    class KaikaDPOTrainer(LoraPlus, SeededOrder, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # encoded by kaika.data.preference: nothing for TRL to tokenize

    class KaikaORPOTrainer(LoraPlus, SeededOrder, ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            return paired_rows(feature)

    class KaikaCPOTrainer(LoraPlus, SeededOrder, CPOTrainer):
        def tokenize_row(self, feature, model=None):
            return paired_rows(feature)

    return {
        "dpo": (KaikaDPOTrainer, DPOConfig),
        "ipo": (KaikaDPOTrainer, DPOConfig),
        "orpo": (KaikaORPOTrainer, ORPOConfig),
        "simpo": (KaikaCPOTrainer, CPOConfig),
        "kto": kto_classes(),
    }


def loss_arguments(cfg: DpoConfig) -> dict[str, Any]:
    """The TRL config fields of ``--loss``."""
    # kaika enables checkpointing on the model itself (modeling.lora); TRL defaults it on in its args
    common = {"beta": cfg.beta, "max_length": cfg.data.cutoff_len, "activation_checkpointing": False}
    if cfg.dpo.loss in ("dpo", "ipo"):
        return {
            **common,
            "loss_type": ["sigmoid" if cfg.dpo.loss == "dpo" else "ipo"],
            "precompute_ref_log_probs": cfg.dpo.precompute_ref,
        }
    if cfg.dpo.loss == "kto":
        return {
            "beta": cfg.beta,
            "max_length": cfg.data.cutoff_len,
            "activation_checkpointing": False,  # kaika enables it on the model itself
            "loss_type": "kto",
            "desirable_weight": cfg.dpo.desirable_weight,
            "undesirable_weight": cfg.dpo.undesirable_weight,
            "precompute_ref_log_probs": cfg.dpo.precompute_ref,
            "train_sampling_strategy": "sequential",  # the KL pairing is made in this order (see encode)
        }
    # ORPO's and CPO's batches carry no attention_mask of their own: tokens are not counted there.
    common["include_num_input_tokens_seen"] = "no"
    if cfg.dpo.loss == "orpo":
        return common
    return {**common, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": cfg.dpo.simpo_gamma}


def build_trainer(cfg: DpoConfig, run: RunDir | None, model, tokenizer, train_rows, val_rows):
    from datasets import Dataset

    log_batch(cfg.train)
    tune_for_cpu()
    trainer_cls, config_cls = trainer_classes()[cfg.dpo.loss]
    out = Path(cfg.train.output_dir)
    args = training_arguments(
        replace(cfg.train, group_by_length=False),  # kaika's seeded shuffle (SeededOrder) instead
        out,
        resolve_dtype(cfg.model.dtype),
        bool(val_rows),
        world_size(),
        cls=config_cls,
        **loss_arguments(cfg),
    )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(out / LOG_FILE)],
    )
    trainer.loraplus_lr_ratio = cfg.lora.loraplus_lr_ratio
    if run is None and "ref" in getattr(trainer.model, "peft_config", {}):
        # TRL copies a given adapter as the reference; a fresh one (B = 0) is the base itself, which
        # switching the adapter off gives without a second adapter's memory and compute.
        trainer.model.delete_adapter("ref")
    return trainer


# --------------------------------------------------------------------------- save


def last_logged(history: list[dict], key: str) -> float | None:
    return next((float(h[key]) for h in reversed(history) if key in h), None)


def save_and_verify(
    cfg: DpoConfig,
    fitted: Fitted,
    tokenizer,
    template: Template,
    report: PreferenceReport,
    source: ModelSource,
    train_rows,
    out: Path,
) -> PreferenceResult:
    result = PreferenceResult(
        out,
        fitted.global_step,
        fitted.train_loss,
        fitted.eval_loss,
        fitted.seconds,
        last_logged(fitted.history, "rewards/accuracies"),
        last_logged(fitted.history, "rewards/margins"),
        report,
        fitted.model,
        last_logged(fitted.history, "kl"),
    )

    files = RunFiles(cfg, tokenizer, fitted.history, REPORT_FILE, asdict(report), template, source)
    answer = "completion_ids" if cfg.dpo.loss == "kto" else "chosen_ids"
    rows = [{"input_ids": r["prompt_ids"] + r[answer]} for r in train_rows[:VERIFY_PAIRS]]
    # Only the trained adapter: not the frozen reference copy that --from adds beside it.
    save_verified_adapter(fitted, out, files, rows, selected_adapters=["default"])
    return result
