"""Training that survives faults: signals, non-finite loss, full disks, interrupted checkpoints.

``guarded_training`` wraps ``Trainer.train``. What it adds to the Trainer, and why:

* **SIGTERM / SIGINT (Ctrl-C)** set a flag; at the end of the current optimizer step the
  Trainer writes a normal checkpoint and stops, and kaika exits with 128 + the signal number
  and says how to continue (``--resume``). A second Ctrl-C (a second later or more) quits at
  once. Under several processes the flag is reduced over all ranks every step, so they all
  stop at the same step (a rank that stopped alone would leave the others waiting in the
  gradient all-reduce). transformers' own ``enable_jit_checkpoint`` handles SIGTERM only,
  waits 3 s first, and lets ``train()`` return as if training had finished.
* **A non-finite loss** (nan/inf gradients, or weights that became non-finite) stops training
  before the bad optimizer step is applied and before any checkpoint of it is written; kaika
  reports the step, the last good checkpoint and what to try. No adapter is written.
  (The Trainer's ``logging_nan_inf_filter`` hides such losses from the log instead.)
* **Interrupted checkpoints**: transformers 5 writes ``checkpoint-N`` in place (no temporary
  name) and writes ``trainer_state.json`` last. A checkpoint whose ``trainer_state.json`` is
  missing or unreadable, or whose safetensors are truncated, was cut short: ``--resume``
  skips (and removes) it and continues from the newest complete one, instead of crashing in
  it as ``resume_from_checkpoint=True`` would.
* **Disks**: before training, the output directory must be writable and its file system must
  have room for the checkpoints kept and the adapter; a write that fails during training
  (disk full, file too large, read-only) becomes a message naming the last checkpoint.
* **Ranks agree on the data**: with several processes, every rank must have tokenized the
  same training and validation examples (nodes reading different copies of a file would
  otherwise train silently on different data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from kaika.atomic import read_marker, safetensors_problem, write_failure
from kaika.errors import KaikaError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"  # written last by Trainer._save_checkpoint: the completion mark
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FP16_OVERFLOW_PATIENCE = (
    8  # fp16 loss scaling skips overflowing steps by design; this many in a row is not recovering
)


class TrainingStopped(KaikaError):
    """Training ended early on purpose (signal) or for a reason the user must act on (nan/inf)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- before training


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path) -> None:
    """Fail now, with the reason, if ``out`` cannot be created or written (root ignores modes, so try)."""
    base = nearest_existing(out)
    if not base.is_dir():
        raise KaikaError(
            f"cannot create output_dir {out}: {base} is a file, not a directory; choose another --output-dir"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".kaika-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise KaikaError(
            f"output_dir {out} is not writable ({base}: {e.strerror}); choose another --output-dir"
        ) from None


def _tokenizer_bytes(tokenizer) -> int:
    source = Path(str(getattr(tokenizer, "name_or_path", "")))
    files = [source / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    size = sum(f.stat().st_size for f in files if f.is_file())
    return size or 64 * len(tokenizer)  # ~58 bytes per token in BLOOM's tokenizer.json


def needed_bytes(model, tokenizer, save_total_limit: int) -> int:
    """About what the run writes at its peak: (save_total_limit + 1) checkpoints (a new one is
    written before the oldest is rotated out) plus the final adapter, each with the tokenizer."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in trainable)
    adam = sum(2 * p.numel() * 4 for p in trainable)  # exp_avg and exp_avg_sq, fp32
    tok = _tokenizer_bytes(tokenizer)
    checkpoint = weights + adam + tok + 64 * 1024  # + rng, scheduler, state, args
    keep = max(save_total_limit, 1) + 1
    return keep * checkpoint + weights + tok


def check_disk_space(out: Path, model, tokenizer, save_total_limit: int) -> None:
    need = needed_bytes(model, tokenizer, save_total_limit)
    base = nearest_existing(out)
    free = shutil.disk_usage(base).free
    if free < need:
        mb = 1024 * 1024
        raise KaikaError(
            f"not enough disk space for {out}: this run writes about {need / mb:.1f} MB "
            f"({save_total_limit} checkpoint(s) kept + 1 being written + the adapter) and {base} has "
            f"{free / mb:.1f} MB free. Free some space, lower --save-total-limit, or choose another --output-dir"
        )


# --------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from, or None when it is complete."""
    state, problem = read_marker(path / STATE_FILE, missing="is missing (the save was interrupted)")
    if problem:
        return problem
    if state.get("global_step") != checkpoint_step(path):
        return f"{STATE_FILE} is for step {state.get('global_step')}, not {checkpoint_step(path)}"
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            return problem
    return None


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=checkpoint_step, reverse=True)


def last_good_checkpoint(ckpt_dir: Path) -> Path | None:
    return next((c for c in checkpoints(ckpt_dir) if checkpoint_problem(c) is None), None)


def resume_checkpoint(ckpt_dir: Path, remove_incomplete: bool) -> Path:
    """The newest complete checkpoint; newer incomplete ones are reported (and removed by rank 0)."""
    for ckpt in checkpoints(ckpt_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if remove_incomplete:  # rank 0 only; the other ranks reach the same verdict from the same files
            log.warning(
                "%s is incomplete (%s): removed it, resuming from an earlier checkpoint", ckpt, problem
            )
            shutil.rmtree(ckpt, ignore_errors=True)
    raise KaikaError(
        f"--resume: no complete checkpoint in {ckpt_dir}; run without --resume (and with --overwrite) "
        "to start again"
    )


def trim_log(log_file: Path, step: int) -> None:
    """Drop log rows written after ``step`` by the run that was cut short: they are trained again."""
    if not log_file.is_file():
        return
    lines = log_file.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    if len(kept) != len(lines):
        tmp = log_file.with_name(log_file.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, log_file)


# --------------------------------------------------------------------------- during training


def _max_abs(tensors: list[torch.Tensor]) -> float:
    """max |x| over all tensors in one device sync; nan if any element is nan (amax propagates it)."""
    # Sharded parameters (FSDP2 DTensors) are checked shard by shard; the flag is reduced over ranks.
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t.detach() for t in local if t.numel()]  # ZeRO-3 leaves empty placeholders
    if not local:
        return 0.0
    return float(torch.stack([t.abs().amax().float() for t in local]).amax())


SETTINGS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "seed", "weight_decay", "warmup_steps", "lr_scheduler_type", "bf16", "fp16", "max_grad_norm",
    "save_steps", "logging_steps",
)  # fmt: skip


def run_fingerprint(trainer) -> dict[str, Any]:
    """What every process of a run must share, compared before the first step: kaika's version, the
    training settings (by name, so a difference can be named), the model (its config and every
    parameter's name, shape, dtype and whether it trains) and the data; the host names the process."""
    import socket

    from kaika import __version__

    model = trainer.model
    config = getattr(model, "config", None)
    config_text = ""
    if config is not None:
        fields = {
            k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")
        }
        config_text = json.dumps(fields, sort_keys=True, default=str)
    h = hashlib.sha256(config_text.encode())
    for name, p in model.named_parameters():
        h.update(f"{name} {tuple(getattr(p, 'ds_shape', p.shape))} {p.dtype} {p.requires_grad}".encode())
    return {
        "host": socket.gethostname(),
        "kaika": __version__,
        "settings": {k: getattr(trainer.args, k, None) for k in SETTINGS},
        "model": h.hexdigest(),
        "data": data_fingerprint(trainer.train_dataset, trainer.eval_dataset),
    }


def ranks_differ(rank: int, mine: dict[str, Any], first: dict[str, Any]) -> str:
    """What rank ``rank`` (on its host) has that rank 0 has not, in words."""
    parts = []
    if mine["kaika"] != first["kaika"]:
        parts.append(f"kaika {mine['kaika']} vs {first['kaika']}")
    settings = [k for k in SETTINGS if mine["settings"].get(k) != first["settings"].get(k)]
    if settings:
        parts.append(
            "the training settings ("
            + ", ".join(f"{k} {mine['settings'].get(k)} vs {first['settings'].get(k)}" for k in settings)
            + ")"
        )
    if mine["model"] != first["model"]:
        parts.append("the model (another base model, LoRA shape or dtype)")
    if mine["data"] != first["data"]:
        parts.append("the tokenized training data (other data files, template, tokenizer or cutoff_len)")
    return f"rank {rank} on {mine['host']} differs from rank 0 on {first['host']} in " + ", ".join(parts)


def data_fingerprint(*datasets) -> str:
    """A hash of every id list of every example (training rows: input_ids and labels; preference
    pairs: prompt, chosen and rejected ids), for the ranks of a run to check they hold the same data."""
    h = hashlib.sha256()
    for ds in datasets:
        h.update(f"[{len(ds or [])}]".encode())
        for ex in ds or []:
            for key in sorted(k for k in ex if k.endswith("ids") or k == "labels"):
                h.update(key.encode())
                h.update(np.asarray(ex[key], dtype=np.int64).tobytes())
    return h.hexdigest()


class FaultWatch(TrainerCallback):
    """Turns signals and non-finite values into a clean stop at a step boundary (see module doc)."""

    def __init__(self, fp16: bool, fingerprint: dict[str, Any] | None = None):
        self.fp16 = fp16
        self.fingerprint = fingerprint
        self.requested: int | None = None  # signal number received, not yet acted on
        self.stopped_by: int | None = None  # signal that stopped training at a step boundary
        self.nonfinite: tuple[int, str] | None = None  # (step, what)
        self._first_sigint = 0.0
        self._overflows = 0
        self._previous: dict[int, Any] = {}

    # signals ---------------------------------------------------------------------------------

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT:
            # torchrun forwards the terminal's Ctrl-C to workers that already got it: ignore echoes.
            if self._first_sigint and time.monotonic() - self._first_sigint > 1.0:
                raise KeyboardInterrupt
            self._first_sigint = self._first_sigint or time.monotonic()
        if self.requested is None:
            self.requested = signum
            log.warning(
                "%s received: saving a checkpoint at the end of this step, then stopping%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to quit at once, without it)" if signum == signal.SIGINT else "",
            )

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. a notebook worker): keep default behaviour
                return

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # callback events -------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1 and self.fingerprint is not None:
            self._check_ranks_agree(args)

    def _check_ranks_agree(self, args) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        prints: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(prints, self.fingerprint)
        problems = [ranks_differ(rank, p, prints[0]) for rank, p in enumerate(prints) if p != prints[0]]
        if problems:
            raise KaikaError(
                "the processes of this run do not agree, so it stopped before the first step: "
                + "; ".join(problems)
                + ". Every process must run the same kaika with the same command, data files, template, "
                "tokenizer and base model (on several nodes: the same copy of each on every node)"
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        peak = _max_abs([p.grad for p in params])
        if np.isfinite(peak):
            self._overflows = 0
            return
        if self.fp16:  # the grad scaler skips this step and lowers its scale: normal, unless it persists
            self._overflows += 1
            if self._overflows < FP16_OVERFLOW_PATIENCE:
                return
        self.nonfinite = (state.global_step + 1, f"the gradient is {'nan' if np.isnan(peak) else 'inf'}")
        for p in params:  # optimizers skip parameters without a gradient: the bad step changes nothing
            p.grad = None
        control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.nonfinite is None:
            peak = _max_abs([p for p in model.parameters() if p.requires_grad])
            if not np.isfinite(peak):
                self.nonfinite = (state.global_step, "the adapter weights became non-finite")
        stop, bad = self.requested is not None, self.nonfinite is not None
        if args.world_size > 1:
            # Every rank must leave the loop at the same step, or the others wait forever in the
            # next all-reduce: agree on both flags (one tiny collective per optimizer step).
            import torch.distributed as dist

            if dist.is_initialized():
                flags = torch.tensor([int(stop), int(bad)], device=args.device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                stop, bad = (bool(v) for v in flags.tolist())
                if bad and self.nonfinite is None:
                    self.nonfinite = (state.global_step, "another process saw non-finite values")
        if bad:  # never checkpoint or evaluate a broken model
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True
        elif stop:
            self.stopped_by = self.requested or signal.SIGTERM  # a rank without the signal follows the others
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


PEER_LOST = re.compile(
    r"Connection (reset|closed|refused)|Broken pipe|Socket Timeout|timed out|Timeout|NCCL (error|communicator)"
    r"|ProcessGroup\w* .*(abort|timeout)|peer",
    re.IGNORECASE,
)


def lost_peer(exc: BaseException | None) -> str | None:
    """The collective library's words when ``exc`` says another process of the run is gone (killed,
    crashed, its node down, or silent past the collective timeout), else None."""
    if exc is None or not isinstance(exc, RuntimeError):
        return None
    text = " ".join(str(exc).split())
    distributed = (
        isinstance(exc, getattr(torch.distributed, "DistError", ())) or "gloo" in text or "NCCL" in text
    )
    if not distributed or not PEER_LOST.search(text):
        return None
    text = re.sub(r"^\[[^\]]*/third_party/[^\]]*\] ", "", text)  # the C++ source location
    return text.split(". This is typically")[0][:300]


class guarded_training:
    """``with guarded_training(trainer, resume, log_file) as resume_from: trainer.train(resume_from)``.

    Checks the disk, picks the checkpoint to resume from, watches the run, and after it turns
    a stop into a ``TrainingStopped`` and a failed write into a ``KaikaError``.
    """

    def __init__(self, trainer, resume: bool, log_file: Path):
        self.trainer = trainer
        self.resume = resume
        self.log_file = log_file
        self.ckpt_dir = Path(trainer.args.output_dir)
        self.main = trainer.args.process_index == 0
        fingerprint = run_fingerprint(trainer) if trainer.args.world_size > 1 else None
        self.watch = FaultWatch(fp16=bool(trainer.args.fp16), fingerprint=fingerprint)

    def __enter__(self) -> str | None:
        start = None
        if self.resume:
            start = resume_checkpoint(self.ckpt_dir, remove_incomplete=self.main)
            log.info("resuming from %s (step %d)", start, checkpoint_step(start))
            if self.main:
                trim_log(self.log_file, checkpoint_step(start))
        self.trainer.add_callback(self.watch)
        self.watch.install()
        return str(start) if start else None

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.watch.restore()
        reason = write_failure(exc)
        if reason:
            raise KaikaError(
                f"training stopped: a write failed ({reason}). {self._last_good()} "
                "Free some space (or fix the directory) and run again with --resume"
            ) from exc
        lost = lost_peer(exc)
        if lost:
            raise TrainingStopped(
                f"training stopped at step {self.trainer.state.global_step + 1}: this process lost another "
                f"process of the run ({lost}); a node or process died, or the network between them failed. "
                f"{self._last_good()} When every node is back, run the same command on each with --resume",
                exit_code=1,
            ) from exc
        if exc is not None:
            return False
        step = self.trainer.state.global_step
        if self.watch.nonfinite is not None:
            bad_step, what = self.watch.nonfinite
            lr = self.trainer.args.learning_rate
            raise TrainingStopped(
                f"training stopped at step {bad_step}: the loss became non-finite ({what}). "
                f"{self._last_good()} No adapter was written. What to try: a lower learning rate "
                f"(--lr is {lr:g}; try {lr / 10:g}) with --overwrite, more warm-up steps (--warmup-steps); "
                "with float16 weights, activations can overflow: use --dtype bfloat16 or float32; "
                "check the data near this step for unusual examples"
            )
        if self.watch.stopped_by is not None:
            name = signal.Signals(self.watch.stopped_by).name
            raise TrainingStopped(
                f"stopped by {name} at step {step}: checkpoint saved in {self.ckpt_dir / f'checkpoint-{step}'}. "
                "Run the same command with --resume to continue",
                exit_code=128 + int(self.watch.stopped_by),
            )
        return False

    def _last_good(self) -> str:
        good = last_good_checkpoint(self.ckpt_dir)
        if good is None:
            return "No checkpoint was saved before it."
        return f"The last good checkpoint is {good} (step {checkpoint_step(good)})."
