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
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kaika.atomic import staged_output
from kaika.config import ModelArgs
from kaika.modeling.load import ModelSource
from kaika.modeling.qkv import check_block_structure
from kaika.modeling.verify import verify_adapter
from kaika.training.launch import detect_launch, peft_model_of, trainable_state
from kaika.training.trainer import Fitted, is_main_process

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
    with staged_output(out) as stage:
        peft_model.save_pretrained(stage, state_dict=state, selected_adapters=selected_adapters)
        write_files(stage)
        if verify is not None:
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
