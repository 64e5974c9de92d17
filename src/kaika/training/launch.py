"""How this process was launched, and what that asks of a recipe, decided before anything loads.

kaika adds no launcher of its own: ``torchrun`` and ``accelerate launch`` start the processes, and
their environment says what was asked — how many processes on how many nodes (``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``RANK``), and for ``accelerate launch`` with a config file, which engine:
DDP, FSDP (``ACCELERATE_USE_FSDP``, ``FSDP_*``) or DeepSpeed ZeRO (``ACCELERATE_USE_DEEPSPEED``,
``ACCELERATE_DEEPSPEED_*``). :func:`detect_launch` reads it into a :class:`Launch`, and
:func:`check_launch` refuses, before any data is read or model loaded, every combination kaika
cannot honour, naming both sides (a quantized base under ZeRO-3, FSDP1, two activation
checkpointings, several GPUs without a launcher…).

What the engines need from the recipes, and where it is done:

* **the model loads after the distributed state exists** (the recipes build ``TrainingArguments``
  first): ZeRO-3 then partitions the weights as they load (``zero3_init_flag``), FSDP loads them on
  rank 0 only (``fsdp_cpu_ram_efficient_loading``);
* **FSDP on a CPU**: accelerate turns an FSDP launch into plain multi-CPU data parallel when there is
  no GPU (nothing sharded, no warning). :class:`ShardedOnCpu` gives the Trainer's accelerator the FSDP
  state the launch asked for, so the same FSDP2 code (accelerate's ``fully_shard`` preparation) runs
  on CPUs over gloo as on GPUs over NCCL;
* **parameters that live in pieces** (FSDP2 DTensors, ZeRO-3 partitions): :func:`gathered` gives the
  whole tensors of a few parameters to every rank for a moment (the output layer for the chunked
  loss), :func:`trainable_state` gathers the trained weights for the final save, which rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainerCallback

from kaika.errors import KaikaError, require_extra

log = logging.getLogger(__name__)

Engine = Literal["single", "ddp", "fsdp", "deepspeed"]
ENGINE_NAMES = {"single": "one process", "ddp": "DDP", "fsdp": "FSDP", "deepspeed": "DeepSpeed"}


@dataclass(frozen=True)
class Launch:
    """The processes of this run and the engine that ties them together."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    engine: Engine = "single"
    zero_stage: int | None = None  # DeepSpeed
    fsdp_version: int | None = None  # FSDP
    fsdp_activation_checkpointing: bool = False

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def sharded(self) -> bool:
        """Whether the model's weights live in pieces across the ranks (FSDP, ZeRO-3)."""
        return self.engine == "fsdp" or (self.engine == "deepspeed" and self.zero_stage == 3)

    def describe(self) -> str:
        what = ENGINE_NAMES[self.engine]
        if self.engine == "deepspeed":
            what += f" ZeRO-{self.zero_stage}"
        elif self.engine == "fsdp":
            what += str(self.fsdp_version)
        if self.world_size == 1:
            return what
        nodes = f" on {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{what} over {self.world_size} processes{nodes}"


def _flag(env, name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def _zero_stage(env) -> int:
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and Path(path).is_file():  # a DeepSpeed JSON config named in the accelerate config
        try:
            return int(json.loads(Path(path).read_text(encoding="utf-8"))["zero_optimization"]["stage"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return 0


def detect_launch(env=None) -> Launch:
    """The launch of this process, from the environment its launcher set."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    common = {
        "world_size": world,
        "rank": int(env.get("RANK", "0")),
        "local_rank": int(env.get("LOCAL_RANK", "0")),
        "local_world_size": int(env.get("LOCAL_WORLD_SIZE", str(world))),
    }
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return Launch(**common, engine="deepspeed", zero_stage=_zero_stage(env))
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return Launch(
            **common,
            engine="fsdp",
            fsdp_version=int(env.get("FSDP_VERSION", "1")),
            fsdp_activation_checkpointing=_flag(env, "FSDP_ACTIVATION_CHECKPOINTING"),
        )
    return Launch(**common, engine="ddp" if world > 1 else "single")


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_launch(
    launch: Launch,
    quantization: str,
    gradient_checkpointing: bool,
    full: bool = False,
    command: str = "train",
) -> None:
    """Refuse, before anything loads, what this launch cannot run, naming both sides and what to do."""
    gpus = visible_gpus()
    if launch.world_size == 1 and gpus > 1:
        # The Trainer would fall back to nn.DataParallel: replicas of BLOOM's attention forwards bound
        # to GPU 0's weights, a chunked loss that sees one replica's hidden states, a global batch
        # silently multiplied by the GPU count. One process per GPU (DDP) is the way.
        raise KaikaError(
            f"this machine has {gpus} GPUs and kaika was started as one process; kaika trains on several "
            f"GPUs with one process per GPU: torchrun --nproc_per_node {gpus} -m kaika {command} … "
            f"(or accelerate launch). For one GPU: CUDA_VISIBLE_DEVICES=0 kaika {command} …"
        )
    if launch.engine == "deepspeed":
        require_extra("deepspeed", ("deepspeed",), "accelerate launch with a DeepSpeed config")
        if launch.zero_stage not in (0, 1, 2, 3):
            raise KaikaError(f"DeepSpeed ZeRO stage {launch.zero_stage}: kaika knows stages 0 to 3")
        if quantization != "none":
            raise KaikaError(
                f"--quantization {quantization} under DeepSpeed ZeRO-{launch.zero_stage}: DeepSpeed cannot "
                "partition or cast bitsandbytes' quantized layers. Train a quantized base with DDP "
                "(configs/accelerate/ddp.yaml, or torchrun), or drop --quantization under DeepSpeed"
            )
    if launch.engine == "fsdp":
        if launch.fsdp_version != 2:
            raise KaikaError(
                f"FSDP version {launch.fsdp_version}: kaika trains with FSDP2 (fully_shard); set "
                "fsdp_version: 2 in the accelerate config (as configs/accelerate/fsdp.yaml does)"
            )
        if quantization == "8bit":
            raise KaikaError(
                "--quantization 8bit under FSDP: bitsandbytes' 8-bit layers cannot be sharded. Use "
                "--quantization 4bit (stored in the run's dtype, which FSDP can shard) or DDP"
            )
        if gradient_checkpointing and launch.fsdp_activation_checkpointing:
            raise KaikaError(
                "--gradient-checkpointing and the accelerate config's fsdp_activation_checkpointing both "
                "recompute activations: keep one (set fsdp_activation_checkpointing: false, or drop "
                "--gradient-checkpointing)"
            )
    if full and quantization != "none":
        raise KaikaError("full-parameter training cannot use a quantized base: drop --quantization")


def engine_dtype(launch: Launch, dtype: str) -> str:
    """``--dtype`` as this launch can train in. DeepSpeed on CPUs trains in float32 only: transformers'
    Trainer takes bf16 on a CPU only through accelerate's CPU path, which DeepSpeed does not use."""
    if launch.engine != "deepspeed" or torch.cuda.is_available() or dtype == "float32":
        return dtype
    if dtype == "auto":
        log.info("dtype auto under DeepSpeed on CPUs: float32 (DeepSpeed's CPU path has no bf16 autocast)")
        return "float32"
    raise KaikaError(
        f"--dtype {dtype} under DeepSpeed on a machine without a GPU: DeepSpeed's CPU path trains in float32 "
        "only; use --dtype float32 (or auto), or DDP for bf16 on CPUs"
    )


def log_launch(launch: Launch) -> None:
    if launch.world_size > 1 or launch.engine != "single":
        log.info("launch: %s", launch.describe())


# --------------------------------------------------------------------------- parameters in pieces


def is_partitioned(param) -> bool:
    """A ZeRO-3 partitioned parameter (its data is this rank's slice, or empty)."""
    return hasattr(param, "ds_id")


def is_dtensor(tensor) -> bool:
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


@contextlib.contextmanager
def gathered(*params) -> Iterator[list]:
    """The whole tensors of ``params`` on every rank, inside the block; every rank must enter it.

    ZeRO-3 partitions are gathered (read-only: nothing written to them is kept); FSDP2 DTensors are
    assembled with ``full_tensor`` (differentiable: a gradient flows back to the shards); whole
    tensors are given as they are.
    """
    present = [p for p in params if p is not None]
    if any(is_partitioned(p) for p in present):
        import deepspeed

        with deepspeed.zero.GatheredParameters(present, modifier_rank=None):
            yield list(params)
        return
    yield [p.full_tensor() if p is not None and is_dtensor(p) else p for p in params]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Every trained parameter, whole and on the CPU, by its state-dict name; every rank must call it
    (a sharded engine gathers), and every rank gets the same dict."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered(*(p for _, p in named)) as whole:
        return {name: w.detach().to("cpu", copy=True) for (name, _), w in zip(named, whole, strict=True)}


def peft_model_of(model):
    """The PeftModel inside whatever the engine wrapped it in (DDP, DeepSpeed's engine)."""
    while not hasattr(model, "peft_config") and hasattr(model, "module"):
        model = model.module
    return model


class ShardedOnCpu:
    """Mixin for a transformers ``Trainer``: an FSDP launch shards on a machine without a GPU too.

    accelerate sets its FSDP state only on GPU-like devices; on CPUs it runs the same launch as plain
    data parallel (``MULTI_CPU``), the weights whole on every rank, without a word. Here the FSDP
    plugin is built from the launcher's ``FSDP_*`` settings, as accelerate builds it on a GPU, and the
    accelerator is told to prepare the model with FSDP: accelerate's own ``fully_shard`` path, over
    gloo. Every test that claims sharding checks the parameters (DTensors, each rank a slice).
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if detect_launch().engine != "fsdp" or state.distributed_type != DistributedType.MULTI_CPU:
            return
        plugin = FullyShardedDataParallelPlugin()
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True
        log.info(
            "FSDP%d on CPUs: accelerate's fully_shard preparation over %s", plugin.fsdp_version, state.backend
        )


def weight_share(model) -> tuple[int, int]:
    """(elements of the model's weights this rank holds, elements of the whole model)."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
            local, total = local + p.ds_tensor.numel(), total + p.ds_numel
        elif is_dtensor(p):  # FSDP2: this rank's rows
            local, total = local + p.to_local().numel(), total + p.numel()
        else:
            local, total = local + p.numel(), total + p.numel()
    return local, total


class ShardReport(TrainerCallback):
    """Where the weights are, measured, in the log. A sharded
    launch that silently runs whole copies (accelerate's FSDP on CPUs, before :class:`ShardedOnCpu`)
    shows here as 100 %."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        launch = detect_launch()
        if launch.world_size == 1 or model is None:
            return
        local, total = weight_share(model)
        where = (
            "sharded"
            if launch.sharded
            else "a whole copy on every rank"
            + (", optimizer state and gradients sharded" if launch.engine == "deepspeed" else "")
        )
        log.info(
            "weights: this rank holds %.1f%% of the model's %s parameters (%s, %s)",
            100 * local / max(total, 1),
            f"{total:,}",
            launch.describe(),
            where,
        )
