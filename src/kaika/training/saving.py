"""The end of every adapter recipe (``kaika train``, ``dpo``, ``pretrain`` with LoRA): one staged save-and-verify.

In order, on every rank:

1. the trained weights are taken whole: where the launch shards them (FSDP2 DTensors, ZeRO-3
   partitions), every rank takes part in gathering them, and every rank gets the whole tensors;
2. what training held and no longer needs (the optimizer state, the gradients, the engine's buffers)
   is released, so that verification's fresh base fits where the trained one was;
3. rank 0 alone writes the adapter aside (:func:`kaika.atomic.staged_output`) with the recipe's other
   files, checks that the slices ``--lora-qkv`` holds at zero are zero, verifies the save
   (:func:`kaika.modeling.verify.verify_adapter`: tensors bit for bit, then a fresh base with the
   reloaded adapter), and moves it into the output directory. A sharded run verifies on the CPU: its
   base does not fit one device, which is why it was sharded.

What a recipe writes beside its weights is one :class:`RunFiles`: the tokenizer (with the chat
template the run trained on), the config, the template, the base's notices and fingerprint, the
recipe's report and the loss curve; :func:`save_verified_adapter` is the whole end of train, dpo and
pretrain-LoRA, and ``pretrain --full`` writes the same files beside its whole model.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kaika.atomic import staged_output
from kaika.config import ModelArgs
from kaika.data.prompts import Template
from kaika.data.tokenize import pad_batch
from kaika.modeling.initial import INIT_DIR, initial_of, save_converted
from kaika.modeling.load import ModelSource, resolve_source
from kaika.modeling.qkv import check_block_structure
from kaika.modeling.verify import verify_adapter, verify_converted_adapter
from kaika.rundir import (
    CURVE_FILE,
    save_base_fingerprint,
    save_base_notices,
    save_config,
    save_template,
    save_tokenizer,
)
from kaika.training.launch import detect_launch, peft_model_of, trainable_state
from kaika.training.trainer import Fitted, is_main_process, plot_loss_curve

log = logging.getLogger(__name__)


@dataclass
class VerifyOn:
    """What verification needs: how the base is loaded, and a batch the model is compared on."""

    model_args: ModelArgs
    source: ModelSource
    batch: dict[str, torch.Tensor]


def release_training_memory(trainer) -> None:
    """Drop what only training needed: optimizer state, scheduler, gradients, the engine's buffers; and
    the autocast accelerate wrapped the model's forward in for mixed precision, so that the trained
    model computes in its own dtype afterwards, as its saved copy will (the Python API returns it)."""
    model = trainer.model
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        model = trainer.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    trainer.optimizer = trainer.lr_scheduler = None
    for param in model.parameters():
        param.grad = None
    if accelerator is not None:  # DeepSpeed's engine (and its flat buffers) go with its last reference
        accelerator._models.clear()
        accelerator._optimizers.clear()
        accelerator._schedulers.clear()
        accelerator.deepspeed_engine_wrapped = None
        trainer.model_wrapped = model
        if hasattr(trainer, "deepspeed"):
            trainer.deepspeed = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class RunFiles:
    """The files of a run beside its weights, the same for every recipe; call it on the staging directory."""

    config: Any  # TrainConfig, DpoConfig, PretrainConfig
    tokenizer: Any
    history: list[dict]  # the trainer's log, for the loss curve
    report_file: str
    report: dict[str, Any]
    template: Template | None = None  # None: pretraining (plain text, no prompt template)
    source: ModelSource | None = None  # the base; None: a model built from scratch
    fingerprint: bool = True  # record the base's fingerprint (an adapter needs that base)

    def __call__(self, stage: Path) -> None:
        if self.template is not None and self.template.kind == "chat":
            # other tools prompt the run (and its merge) with what it trained on
            self.tokenizer.chat_template = self.template.source
        save_tokenizer(self.tokenizer, stage)
        save_config(self.config, stage)
        if self.template is not None:
            save_template(self.template, stage)
        if self.source is not None:
            save_base_notices(self.source.path, stage)
            if self.fingerprint:
                save_base_fingerprint(self.source, stage)
        (stage / self.report_file).write_text(json.dumps(self.report, indent=2) + "\n", encoding="utf-8")
        plot_loss_curve(self.history, stage / CURVE_FILE)


def save_verified_adapter(
    fitted: Fitted,
    out: Path,
    files: RunFiles,
    rows: list[dict[str, list[int]]],
    selected_adapters: list[str] | None = None,
) -> None:
    """The end of an adapter recipe: the adapter and ``files`` saved into ``out`` (staged), verified on
    ``rows`` (a few of its training rows, ``input_ids``) unless the run's ``--no-verify``."""
    cfg = files.config
    verify = None
    if cfg.train.verify:
        batch = pad_batch(rows, files.tokenizer.pad_token_id)
        verify = VerifyOn(cfg.model, files.source or resolve_source(cfg.model), batch)
    save_adapter(fitted, out, files, verify, selected_adapters)


def save_adapter(
    fitted: Fitted,
    out: Path,
    write_files: Callable[[Path], Any],
    verify: VerifyOn | None,
    selected_adapters: list[str] | None = None,
) -> None:
    """Save the trained adapter into ``out`` (staged, verified); ``write_files(stage)`` writes the
    recipe's other files beside it. Every rank calls it; rank 0 writes."""
    from peft import get_peft_model_state_dict

    peft_model = peft_model_of(fitted.model)
    sharded = detect_launch().sharded
    state = trainable_state(peft_model) if sharded else None  # every rank takes part
    release_training_memory(fitted.trainer)
    if not is_main_process():
        return
    check_block_structure(peft_model, state)  # --lora-qkv: unchosen slices must still be exactly zero
    if sharded:  # the fresh base of the check loads whole, not partitioned by ZeRO-3 as training's did
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    initial = initial_of(peft_model)
    with staged_output(out) as stage:
        if initial is not None:  # --lora-init pissa/olora: a plain LoRA on the unmodified base
            assert state is None, "pissa/olora are refused under sharded launches"
            save_converted(peft_model, stage, out / INIT_DIR, selected_adapters=selected_adapters)
        else:
            peft_model.save_pretrained(stage, state_dict=state, selected_adapters=selected_adapters)
        write_files(stage)
        if verify is not None and initial is not None:
            verify_converted_adapter(stage, peft_model, initial, verify.model_args, verify.source)
        elif verify is not None:
            memory = None if state is None else get_peft_model_state_dict(peft_model, state_dict=state)
            verify_adapter(
                stage,
                peft_model,
                verify.model_args,
                verify.source,
                verify.batch,
                memory=memory,
                device="cpu" if sharded else None,
            )
