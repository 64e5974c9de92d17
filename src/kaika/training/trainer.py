"""The training layer every recipe shares (``kaika train``, ``kaika pretrain``, ``kaika sweep``).

* the output directory's rules: :func:`check_output_dir` (validates, creates nothing) and
  :func:`prepare_output_dir` (empties it on ``--overwrite``, once all input has been checked);
* :func:`fit`: ``TrainingArguments`` from :class:`~kaika.config.TrainArgs`, the Trainer with
  kaika's loss and sampler, the progress bar and the JSON log, run under
  :func:`~kaika.training.faults.guarded_training`; it returns a :class:`Fitted` with what the
  recipes report;
* :class:`KaikaTrainer`: transformers' ``Trainer`` with the loss of :mod:`kaika.training.loss`
  and a length-grouped sampler whose order a resumed or multi-process run reproduces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import ProgressCallback, Trainer, TrainerCallback

from kaika.config import TrainArgs, check
from kaika.errors import KaikaError
from kaika.guard import DirLock, check_inputs_outside, check_replaceable, claim, empty_owned, is_kaika_hidden
from kaika.modeling.initial import record_initial
from kaika.modeling.lora import check_lora_choices, warn_unused_lora
from kaika.modeling.qkv import mask_sharded_slice_grads
from kaika.rundir import CHECKPOINTS, LOG_FILE
from kaika.training.faults import check_disk_space, check_writable, guarded_training
from kaika.training.launch import (
    Launch,
    ShardedOnCpu,
    ShardReport,
    check_launch,
    detect_launch,
    log_launch,
    peft_model_of,
)
from kaika.training.loss import (
    FastLoss,
    LogitTransform,
    causal_lm_loss_sum,
    logit_transform,
    probe_output_layer,
    supports_fast_loss,
)

log = logging.getLogger(__name__)

# Seconds a collective waits for the other processes before it fails (transformers' default: 1800). A
# node that died is usually seen at once by its launcher; this bounds the rest (a node that hangs).
DDP_TIMEOUT = 900


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------- output directory


TENSORBOARD_DIR = "tensorboard"


def check_tracker(report_to: str) -> None:
    """A tracker that is not installed is refused before any data or model loads (each tracker's
    module and kaika's extra that installs it share its name)."""
    if report_to == "none":
        return
    import importlib.util

    if importlib.util.find_spec(report_to) is None:
        raise KaikaError(
            f"--report-to {report_to} needs the {report_to} package: pip install 'kaika[{report_to}]'"
        )


def check_recipe(
    cfg: Any, inputs: list[str], command: str = "train", full: bool = False
) -> tuple[Path, Launch]:
    """The early checks every recipe makes, before it reads data or loads a model: the config's choices
    and bounds again (the Python API may assign fields after building it), the batch against the world
    size, the quantization, the launch, the inputs an ``--overwrite`` would delete, the output directory.
    Returns the output directory and the launch (for the recipe's own checks, which follow)."""
    from kaika.modeling.load import quantization_config, resolve_dtype

    check(cfg)
    gradient_accumulation(cfg.train, world_size())
    quantization_config(cfg.model, resolve_dtype(cfg.model.dtype))
    launch = detect_launch()
    check_launch(launch, cfg.model.quantization, cfg.train.gradient_checkpointing, full=full, command=command)
    from_run = getattr(getattr(cfg, "dpo", None), "from_run", None)
    if full or from_run:  # no fresh LoRA is built: its shape options do not apply
        warn_unused_lora(cfg.lora, "--full" if full else "--from", ratio_too=full)
    else:
        check_lora_choices(cfg.lora, cfg.model.quantization, launch.sharded, command)
    log_launch(launch)
    if cfg.train.overwrite:
        check_inputs_outside(cfg.train.output_dir, inputs, "--overwrite")
    return check_output_dir(cfg.train), launch


def check_output_dir(args: TrainArgs) -> Path:
    """Refuse to clobber work, or a tracker that is not installed; creates nothing (input is
    validated before anything is written)."""
    check_tracker(args.report_to)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise KaikaError(f"output_dir {out} exists and is a file")
    if args.resume and args.overwrite:
        raise KaikaError(
            "--resume and --overwrite contradict each other: --resume continues the run in "
            f"{out}, --overwrite deletes it first. Pass one of them"
        )
    check_writable(out)
    contents = [p for p in out.iterdir() if not is_kaika_hidden(p.name)] if out.is_dir() else []
    if args.resume:
        if not list((out / CHECKPOINTS).glob("checkpoint-*")):
            raise KaikaError(
                f"--resume: no checkpoint in {out / CHECKPOINTS}; run without --resume to start fresh"
            )
        return out
    if contents and not args.overwrite:
        raise KaikaError(
            f"output_dir {out} is not empty: pass --overwrite to replace it, --resume to continue "
            "its training, or choose another --output-dir"
        )
    if contents:
        check_replaceable(out, "--overwrite")
    return out


def run_lock(out: Path):
    """One process writes a run directory at a time (rank 0 holds the lock for a multi-process run)."""
    return DirLock(out) if is_main_process() else contextlib.nullcontext()


def prepare_output_dir(args: TrainArgs, model, tokenizer, lora: dict[str, Any] | None = None) -> None:
    """--overwrite: the old run goes (rank 0 only), now that data, config and model have all loaded;
    first, the disk must hold what the run will write (refused before anything is written).
    ``lora``: the LoRA settings a resume must repeat (:func:`record_lora`)."""
    out = Path(args.output_dir)
    if not is_main_process():
        return
    check_disk_space(out, model, tokenizer, args.save_total_limit or 1)
    if args.overwrite and not args.resume and out.exists():
        empty_owned(out)
    claim(out, "run")
    record_lora(out, lora, args.resume)
    record_initial(out, peft_model_of(model), args.resume)  # --lora-init pissa/olora only


LORA_RECORD = "lora.json"  # in checkpoints/: the LoRA settings the checkpoints were trained with


def record_lora(out: Path, lora: dict[str, Any] | None, resume: bool) -> None:
    """A fresh run writes its LoRA settings beside its checkpoints; a resumed one must give the same:
    another variant, rank or LoRA+ ratio would load the checkpoint's adapter or optimizer state into
    a model or parameter groups it does not fit (an error deep in torch, or, for a changed LoRA+
    ratio, the old learning rates silently restored)."""
    if lora is None:
        return
    path = out / CHECKPOINTS / LORA_RECORD
    if not resume:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(lora, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return
    if not path.is_file():  # a run from before this record, or checkpoints copied from elsewhere
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    differ = sorted(k for k in set(saved) | set(lora) if saved.get(k) != lora.get(k))
    if differ:
        changes = "; ".join(f"{k}: {saved.get(k)!r}, now {lora.get(k)!r}" for k in differ)
        raise KaikaError(
            f"--resume: the run in {out} was trained with other LoRA settings ({changes}); its checkpoints "
            "(adapter and optimizer state) only fit those. Give the same LoRA options to resume it"
        )


def gradient_accumulation(args: TrainArgs, world_size: int) -> int:
    per_step = args.micro_batch_size * world_size
    if args.batch_size < per_step or args.batch_size % per_step:
        raise KaikaError(
            f"batch_size {args.batch_size} must be a multiple of micro_batch_size "
            f"{args.micro_batch_size} × {world_size} process(es) = {per_step}"
        )
    return args.batch_size // per_step


# --------------------------------------------------------------------------- fit


@dataclass
class Fitted:
    """What a finished ``fit`` leaves: the trainer (model, state) and the training time."""

    trainer: Any
    seconds: float
    start_tokens: int = 0  # tokens the resumed checkpoint had seen: not trained in this call

    @property
    def model(self):
        return self.trainer.model

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.trainer.state.log_history

    @property
    def global_step(self) -> int:
        return self.trainer.state.global_step

    @property
    def tokens_seen(self) -> int:
        return self.trainer.state.num_input_tokens_seen

    @property
    def tokens_per_second(self) -> float:
        trained = self.tokens_seen - self.start_tokens
        return trained / self.seconds if self.seconds else 0.0

    @property
    def train_loss(self) -> float:
        """Trainer's whole-run mean; for a resume with nothing left to train (no summary was
        logged), the mean of the losses the checkpoint logged."""
        summary = next((h["train_loss"] for h in reversed(self.history) if "train_loss" in h), None)
        if summary is not None:
            return float(summary)
        logged = [h["loss"] for h in self.history if "loss" in h]
        return float(sum(logged) / len(logged)) if logged else math.nan

    @property
    def eval_loss(self) -> float | None:
        return next((h["eval_loss"] for h in reversed(self.history) if "eval_loss" in h), None)


def mixed_precision(dtype: torch.dtype) -> bool:
    """Whether a run whose compute dtype is ``dtype`` trains under autocast: bf16 everywhere, fp16 on
    CUDA (with its GradScaler). The trainable weights are then kept in float32."""
    return dtype == torch.bfloat16 or (dtype == torch.float16 and torch.cuda.is_available())


def precision_arguments(dtype: torch.dtype) -> dict[str, Any]:
    """The Trainer's precision flags for the run's compute dtype (``--dtype``, resolved).

    Never inferred from the model's parameters: after peft's k-bit preparation a quantized base's
    norms, embeddings and output layer are float32 whatever the compute dtype, and ``pretrain --full``
    keeps float32 master weights while it computes in bf16. float32 on an Ampere or newer GPU
    multiplies in TF32 (the matmul precision PyTorch and transformers call "high")."""
    from transformers.utils import is_torch_tf32_available

    cuda = torch.cuda.is_available()
    return {
        "bf16": dtype == torch.bfloat16,
        "fp16": cuda and dtype == torch.float16,
        "tf32": True if cuda and dtype == torch.float32 and is_torch_tf32_available() else None,
    }


def training_arguments(
    t: TrainArgs, out: Path, dtype: torch.dtype, evaluate: bool, processes: int, cls=None, **extra
):
    """``TrainingArguments`` (or its subclass ``cls``, e.g. TRL's ``DPOConfig`` with ``extra``) from ``t``,
    for compute dtype ``dtype``.

    Building them sets up the processes' distributed state (and, under a DeepSpeed launch, the config
    that makes ``from_pretrained`` partition the weights as they load): the recipes build them before
    they load the model."""
    from transformers import TrainingArguments

    from kaika.training.launch import detect_launch

    cuda = torch.cuda.is_available()
    launch = detect_launch()
    kwargs = dict(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation(t, processes),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        **precision_arguments(dtype),
        # DeepSpeed on CPUs is reached only through accelerate's non-CPU path, told to use gloo (else it
        # counts one process, while DeepSpeed initialises every rank: the batch arithmetic breaks).
        use_cpu=not cuda and launch.engine != "deepspeed",
        ddp_backend="gloo" if not cuda and launch.engine == "deepspeed" else None,
        report_to=[] if t.report_to == "none" else [t.report_to],
        run_name=out.name,  # the run's name in W&B and MLflow
        disable_tqdm=False,  # transformers ties the bar to its log level, which the CLI keeps quiet
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        ddp_find_unused_parameters=False if processes > 1 else None,
        # A node that died stops the others within this time instead of the default 30 minutes.
        ddp_timeout=DDP_TIMEOUT,
    )
    return (cls or TrainingArguments)(**{**kwargs, **extra})


def log_batch(t: TrainArgs) -> None:
    processes = world_size()
    log.info(
        "global batch %d = micro batch %d × accumulation %d × %d process(es)",
        t.batch_size,
        t.micro_batch_size,
        gradient_accumulation(t, processes),
        processes,
    )


def fit(
    args, t: TrainArgs, model, tokenizer, train_set, val_set, collator, loraplus_lr_ratio: float = 0.0
) -> Fitted:
    """Train ``model`` on ``train_set`` (batched by ``collator``), checkpoints and log in ``t.output_dir``;
    ``args`` are the run's :func:`training_arguments`, built before the model was loaded;
    ``loraplus_lr_ratio``: LoRA+ (:class:`LoraPlus`), 0 for off."""
    out = Path(t.output_dir)
    log_batch(t)
    trainer = KaikaTrainer(
        model=model,
        fast_loss=FastLoss(t.fast_loss, t.fast_loss),
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(out / LOG_FILE)],
    )
    trainer.loraplus_lr_ratio = loraplus_lr_ratio
    return run_fit(trainer, t, bool(val_set))


def run_fit(trainer, t: TrainArgs, evaluate: bool) -> Fitted:
    """Run a built trainer (kaika's, or TRL's preference trainers) under kaika's progress bar, JSON
    log, planned-steps stop and fault guard; evaluate the last step when it was not.

    The loop is transformers' ``Trainer.train``; kaika changes it only through the pieces below, in
    the order they act (callbacks run in the order of ``trainer.callback_handler.callbacks``):

    1. **before the loop** — ``guarded_training`` (faults.py) installs the signal handlers, finds the
       checkpoint to resume, and adds ``FaultWatch``; the sampler is ``KaikaTrainer._get_train_sampler``'s
       ``EpochLengthGroupedSampler`` (or ``SeededOrder``'s shuffle for TRL's trainers): an order that
       depends on (seed, epoch) alone, so resume and DDP replay it.
    2. **train begin** — ``TokensPerSecond`` starts its clock; ``StopAtPlannedSteps`` *may stop* the
       loop (``PlannedStepsDone``: a resumed run with nothing left); ``ShardReport`` logs each rank's
       share of the weights; ``FaultWatch`` compares the ranks' settings, model and data and *may stop*
       it (``KaikaError`` naming the difference).
    3. **each epoch begin** — ``_SamplerEpoch`` tells the sampler its epoch.
    4. **each step** — ``KaikaTrainer.compute_loss`` (kaika's chunked loss where it is the model's own),
       ``training_step`` (then the ``--lora-qkv`` masks on sharded gradients); before the optimizer
       step ``FaultWatch`` *may stop* on a non-finite gradient; at step end ``FaultWatch`` *may stop*
       on a signal (SIGINT/SIGTERM: a checkpoint, then ``TrainingStopped``), ``EvaluateLastStep`` asks
       for an evaluation at the last step.
    5. **each log** — ``TokensPerSecond`` adds tokens/s (first in line, so every later callback sees
       it), ``JsonlLogCallback`` writes ``trainer_log.jsonl``, ``LossProgressCallback`` updates the bar,
       then the trackers (TensorBoard, W&B, MLflow).
    6. **after the loop** — ``guarded_training`` turns a lost peer or a collective timeout into
       ``TrainingStopped`` with the last good checkpoint and ``--resume``; the last step is evaluated
       here if it was not (a resume with nothing left to train).

    ``tests/training/test_loop.py`` fails when the Trainer method kaika overrides changes, and when a
    fixed tiny run's first losses move."""
    out = Path(t.output_dir)
    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        # In a terminal: kaika's bar (loss and lr on it). In a notebook transformers shows its own
        # HTML table of the logs (NotebookProgressCallback), which is kept.
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgressCallback())
    # First in line: every later callback (the JSON log, TensorBoard, W&B, MLflow) sees tokens/s in the logs.
    trainer.callback_handler.callbacks.insert(0, TokensPerSecond())
    for cb in trainer.callback_handler.callbacks:
        if (
            type(cb).__name__ == "TensorBoardCallback" and cb.logging_dir is None
        ):  # TENSORBOARD_LOGGING_DIR unset
            cb.logging_dir = str(out / TENSORBOARD_DIR)
    planned = StopAtPlannedSteps()
    trainer.add_callback(planned)
    trainer.add_callback(ShardReport())
    if evaluate:
        trainer.add_callback(EvaluateLastStep())
    start = time.perf_counter()
    try:
        with guarded_training(trainer, t.resume, out / LOG_FILE) as resume_from:  # signals, nan/inf, disk
            try:
                trainer.train(resume_from_checkpoint=resume_from)
            except PlannedStepsDone as done:
                for cb in trainer.callback_handler.callbacks:  # the bar opened at train begin
                    if isinstance(cb, ProgressCallback) and cb.training_bar is not None:
                        cb.training_bar.close()
                log.info("%s; saving it", done)
        seconds = time.perf_counter() - start
        last = trainer.state.global_step
        if evaluate and not any(
            "eval_loss" in h and h.get("step") == last for h in trainer.state.log_history
        ):
            trainer.evaluate()  # a resume with nothing left to train: its last step's evaluation
    finally:
        if t.report_to == "wandb" and is_main_process():
            import wandb

            wandb.finish()  # transformers leaves the W&B run open: the next run (a sweep's) would log into it
    return Fitted(trainer, seconds, planned.start_tokens)


class EvaluateLastStep(TrainerCallback):
    """The last step is evaluated inside training, like every eval_steps-th one, so that trackers
    get it before they close their run at train end (MLflow would open a second one for it)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_evaluate = True


class PlannedStepsDone(Exception):
    """Raised before the first step of a resumed run whose checkpoint already has every planned step."""


class StopAtPlannedSteps(TrainerCallback):
    """Resume never trains past the planned steps.

    Trainer checks its stop condition only after a step, so a run resumed from a checkpoint that
    already holds all ``max_steps`` (a run killed during its final save, or a finished run resumed)
    would train one step more. At train begin the checkpoint's weights, optimizer and step are
    loaded; if nothing is left to do, stop there, with the model as the checkpoint left it.
    """

    start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_tokens = state.num_input_tokens_seen
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise PlannedStepsDone(
                f"--resume: the checkpoint is at step {state.global_step} of {state.max_steps} planned, "
                "nothing left to train"
            )


# --------------------------------------------------------------------------- what the user sees


class LossProgressCallback(ProgressCallback):
    """Transformers' progress bar (steps, ETA) with the latest loss and lr on it, and one short line
    per evaluation, instead of a dict printed at every log step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = self.training_bar
        if not state.is_world_process_zero or bar is None or not logs:
            return
        if "loss" in logs:
            bar.set_postfix(
                loss=f"{float(logs['loss']):.4f}", lr=f"{float(logs.get('learning_rate', 0)):.2e}"
            )
        if "eval_loss" in logs:
            bar.write(f"step {state.global_step}: eval loss {float(logs['eval_loss']):.4f}")


# What preference trainers (TRL's) log, under kaika's names in trainer_log.jsonl.
PREFERENCE_LOGS = {
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "kl": "kl",  # KTO: its estimate of KL(policy ‖ reference)
}


class TokensPerSecond(TrainerCallback):
    """Adds ``tokens_per_s`` (non-pad tokens trained since the previous log, per second) to each
    training log, for the JSON log and every tracker."""

    def __init__(self):
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._last is None or not state.num_input_tokens_seen:
            return  # 0: not counted
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        logs["tokens_per_s"] = round((seen - self._last[1]) / max(now - self._last[0], 1e-9), 2)
        self._last = (now, seen)


class JsonlLogCallback(TrainerCallback):
    """One JSON line per log event: step, loss, eval_loss, lr, tokens/s (non-pad tokens); for
    preference tuning also the reward margin and accuracy and the answers' log-probabilities
    (``eval_`` prefixed for the validation pairs)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key, name in (
            ("loss", "loss"),
            ("eval_loss", "eval_loss"),
            ("learning_rate", "lr"),
            ("grad_norm", "grad_norm"),
            ("train_loss", "train_loss"),
        ):
            if key in logs:
                row[name] = float(logs[key])
        for key, name in PREFERENCE_LOGS.items():
            for prefix in ("", "eval_"):
                if prefix + key in logs:
                    row[prefix + name] = float(logs[prefix + key])
        if "tokens_per_s" in logs:
            row["tokens_per_s"] = logs["tokens_per_s"]
        if len(row) > 2:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> None:
    # A Figure of its own, not pyplot: no backend switched, so a notebook's inline plots keep working.
    from matplotlib.figure import Figure

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    margin = [(h["step"], h["rewards/margins"]) for h in history if "rewards/margins" in h]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    for points, label, style in ((train, "train loss", "-"), (val, "eval loss", "o--")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" if margin else "loss (supervised tokens)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if margin:  # preference tuning: the reward margin (chosen minus rejected) on its own scale
        right = ax.twinx()
        (line,) = right.plot(*zip(*margin, strict=True), "g:", label="reward margin")
        right.set_ylabel("reward margin")
        handles, labels = handles + [line], labels + ["reward margin"]
    if handles:
        ax.legend(handles, labels)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- the Trainer


class LoraPlus:
    """A Trainer mixin: with ``loraplus_lr_ratio`` set, the optimizer is peft's LoRA+ one (LoRA B, and
    every trained vector — DoRA magnitudes, biases — at ``lr × ratio``; A at ``lr``), built where the
    Trainer builds its own, so FSDP and DeepSpeed see it as theirs. The Trainer's optimizer class and
    arguments (betas, eps, weight decay) are kept."""

    loraplus_lr_ratio: float = 0.0

    def create_optimizer(self, model=None):
        if not self.loraplus_lr_ratio or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = dict(kwargs)
        lr = kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            optimizer_cls,
            lr=lr,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **kwargs,
        )
        groups = [(len(g["params"]), g["lr"]) for g in self.optimizer.param_groups if g["params"]]
        log.info(
            "LoRA+: %s",
            ", ".join(f"{n} tensors at lr {group_lr:.3g}" for n, group_lr in groups),
        )
        return self.optimizer


class KaikaTrainer(LoraPlus, ShardedOnCpu, Trainer):
    """transformers' Trainer with kaika's training loss (:mod:`kaika.training.loss`); evaluation,
    prediction and models without ``logits_to_keep`` use the Trainer's own loss.

    Which loss is checked on the model itself (:meth:`_choose_loss`): at construction, or, when the
    launch shards the weights (FSDP, ZeRO-3), at the first training step, once the engine holds the
    model and every rank can take part in the check's forward pass."""

    def __init__(self, *args, fast_loss: FastLoss | None = None, **kwargs):
        self._epoch_sampler: EpochLengthGroupedSampler | None = None
        super().__init__(*args, **kwargs)
        self._levers = fast_loss or FastLoss()
        self._loss_chosen = False
        self.fast_loss: FastLoss | None = None
        self.logit_transform: LogitTransform | None = None
        if not detect_launch().sharded:
            self._pick_loss(self.model)
        self.add_callback(_SamplerEpoch(self))

    def _pick_loss(self, model) -> None:
        self.fast_loss, self.logit_transform = self._choose_loss(self._levers, model)
        self._loss_chosen = True

    def _choose_loss(self, levers: FastLoss, model) -> tuple[FastLoss | None, LogitTransform | None]:
        """kaika's loss where it is the model's own (checked on the model itself), else the Trainer's."""
        if not levers.any:
            return None, None
        if not supports_fast_loss(model):
            log.info("loss: the model's own (its forward takes no logits_to_keep)")
            return None, None
        transform = logit_transform(model)
        if levers.chunked:
            problem = probe_output_layer(model, transform)
            if problem:
                log.warning(
                    "loss: the model's own, with full logits (slower, more memory): %s. kaika's chunked "
                    "loss would train another objective",
                    problem,
                )
                return None, None
            if transform:
                log.info("loss: chunked, with the model's logit transform (%s)", transform)
        return levers, transform

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        mask_sharded_slice_grads(self.model)  # --lora-qkv under FSDP2: the masks follow the shards
        return loss

    def _get_train_sampler(self, train_dataset=None):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            # transformers groups over one process's accumulated batch, so the order would change with
            # the number of processes; grouping over the global batch keeps a DDP run's data order that
            # of one process with the same global batch. Its shuffle also draws from the global RNG at
            # the moment the epoch starts to iterate, which a mid-epoch resume cannot reproduce (the
            # RNG is restored only after the skipped batches are drawn): the order is seeded per epoch.
            global_batch = (
                self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            )
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = self._epoch_sampler = EpochLengthGroupedSampler(global_batch, sampler.lengths, seed)
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._loss_chosen and model.training:
            self._pick_loss(model)  # the first step of a sharded run: every rank is here
        if self.fast_loss is None or return_outputs or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss_sum, count = causal_lm_loss_sum(model, inputs, self.fast_loss, transform=self.logit_transform)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # The count over the whole accumulated (and, with average_tokens_across_devices, gathered)
            # batch: training_step then adds the micro-batch losses up unscaled, as it does for the model's loss.
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
            return loss
        # No global count: the Trainer's rule for such models, mean per micro-batch, divided by the accumulation.
        return loss_sum / count.clamp(min=1)


class EpochLengthGroupedSampler(Sampler):
    """transformers' length grouping (shuffle, then sort by length inside mega-batches) with an
    order that depends only on (seed, epoch): every process, and a run resumed in the middle of
    an epoch, sees the same order as an uninterrupted single-process run."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.batch_size, self.lengths, self.seed = batch_size, lengths, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class EpochShuffleSampler(Sampler):
    """A uniform shuffle whose order depends only on (seed, epoch), for trainers that are not
    kaika's (TRL's preference trainers): a resumed or multi-process run sees the order of an
    uninterrupted single-process one (transformers' own shuffle draws from the global RNG)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class SeededOrder:
    """Mixin for a ``Trainer`` subclass: its training order is :class:`EpochShuffleSampler`'s."""

    _epoch_sampler = None

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._epoch_sampler = EpochShuffleSampler(len(dataset), seed)
        if not any(isinstance(cb, _SamplerEpoch) for cb in self.callback_handler.callbacks):
            self.add_callback(_SamplerEpoch(self))
        return self._epoch_sampler


class _SamplerEpoch(TrainerCallback):
    """Tells the sampler which epoch starts. accelerate forwards ``set_epoch`` only through some of
    its data loader wrappers (not through a skip-batches wrapper around a sharded one), so the
    Trainer's own epoch counter is the source: a resumed run's state.epoch is mid-epoch (2.5 →
    epoch 2), a fresh epoch starts at the previous one's exact end (2.0)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer._epoch_sampler is not None:
            self.trainer._epoch_sampler.set_epoch(math.floor(state.epoch or 0))
