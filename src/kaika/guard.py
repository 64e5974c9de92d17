"""What kaika may write over and delete, and who may write a directory at once.

Three rules every command that writes follows:

* **An output is never one of its inputs.** :func:`check_not_input` refuses an output file that
  is an input file (``--output p.jsonl`` for ``--file p.jsonl``), and an output directory that
  would be replaced while it holds an input (``--data run/x.jsonl --output-dir run --overwrite``).
* **Only what kaika wrote is deleted.** Every directory kaika creates as an output carries an
  owner file (:data:`OWNER_FILE`); ``--overwrite`` and ``--force`` replace a directory only when
  it is empty, carries that file, or holds nothing but the files a kaika run or merged model is
  made of, its kaika config among them (merged models, and runs written before the owner file). Anything else is refused, naming a file
  that is not kaika's, and the refusal comes before any data is read or model loaded.
* **One writer per run directory.** :class:`DirLock` holds an ``fcntl`` lock on a file inside the
  directory for as long as a run writes there. The kernel drops the lock when its process dies, so
  a lock file left by a killed run is recognised (its pid is no longer running), reported, and
  taken over rather than obeyed forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from kaika.errors import KaikaError

log = logging.getLogger(__name__)

OWNER_FILE = ".kaika-owner"
LOCK_FILE = ".kaika-lock"
# Names a kaika run or merged model is made of: a directory holding only these (and hidden
# staging leftovers) was written by kaika even without an owner file.
KAIKA_NAMES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "base_model", "checkpoints",
    "data_report.json", "kaika_config.yaml", "kaika_pretrain.yaml", "kaika_pretrain_config.yaml",
    "kaika_training_config.yaml", "kaika_dpo.yaml",
    "loss_curve.png", "template.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "trainer_log.jsonl", "sweep_result.json", "eval", "config.json",
    "generation_config.json", "model.safetensors", "model.safetensors.index.json", "runs", "results.csv",
    "results.md", "results.json", "sweep.png", "stops.md", "tokenizer.model", "vocab.json", "merges.txt",
    "base_fingerprint.json", "lora_init",
}  # fmt: skip
KAIKA_FILE_PREFIXES = ("model-0",)  # model-00001-of-00002.safetensors


def claim(path: Path, kind: str) -> None:
    """Create ``path`` (if needed) and mark it as a kaika output of ``kind`` ("run", "merge", …)."""
    path.mkdir(parents=True, exist_ok=True)
    owner = path / OWNER_FILE
    if not owner.exists():
        record = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        owner.write_text(json.dumps(record) + "\n", encoding="utf-8")


# The saved configs of kaika train, pretrain (and its old name), dpo, and of a merged model.
KAIKA_CONFIGS = (
    "kaika_config.yaml", "kaika_pretrain.yaml", "kaika_pretrain_config.yaml", "kaika_dpo.yaml",
    "kaika_training_config.yaml",
)  # fmt: skip


def is_kaika_hidden(name: str) -> bool:
    """kaika's own hidden files (the owner file, the lock, staging leftovers): not a run's content."""
    return name.startswith(".kaika")


def not_ours(path: Path) -> str | None:
    """Why directory ``path`` cannot be shown to be kaika's (so must not be deleted), or None."""
    if not path.is_dir() or (path / OWNER_FILE).is_file():
        return None
    # kaika's own hidden files (the lock, staging leftovers) say nothing either way: a directory
    # holding only those is as good as empty.
    names = sorted(p.name for p in path.iterdir() if not is_kaika_hidden(p.name))
    if not names:
        return None
    for name in names:
        if name not in KAIKA_NAMES and not name.startswith(KAIKA_FILE_PREFIXES):
            return f"it holds {name!r}, which kaika did not write"
    if not any(name in KAIKA_CONFIGS for name in names):
        # A model downloaded from the hub has only names kaika also writes: the config file is the proof.
        return f"it has no kaika config ({' or '.join(KAIKA_CONFIGS)}), so kaika cannot tell it wrote it"
    return None


def check_replaceable(path: Path, flag: str) -> None:
    """Refuse (before anything is read or loaded) to let ``flag`` delete a directory kaika did not write,
    or one holding another kaika output (a merged model or an export written inside a run)."""
    if path.exists() and not path.is_dir():
        raise KaikaError(f"{path} exists and is a file, not a directory; choose another output directory")
    nested = (
        sorted(p.name for p in path.iterdir() if p.is_dir() and (p / OWNER_FILE).is_file())
        if path.is_dir()
        else []
    )
    if nested:
        raise KaikaError(
            f"{flag} would delete {path}, which holds another kaika output: {', '.join(nested)} (a merged model "
            "or an export written into it). Move it out first, or choose another output directory"
        )
    reason = not_ours(path)
    if reason is not None:
        raise KaikaError(
            f"{flag} only replaces a directory kaika wrote, and {path} is not one: {reason}. "
            "Choose another output directory, or move its files away yourself"
        )


def empty_owned(path: Path, keep: Iterable[str] = (OWNER_FILE, LOCK_FILE)) -> None:
    """Delete the contents of ``path`` (checked replaceable again first), keeping ``keep``."""
    check_replaceable(path, "--overwrite")
    kept = set(keep)
    for entry in path.iterdir():
        if entry.name in kept:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def replace_owned(path: Path, flag: str) -> None:
    """Delete directory ``path`` entirely, once :func:`check_replaceable` agrees."""
    check_replaceable(path, flag)
    if path.exists():
        shutil.rmtree(path)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_not_input(output: str | Path, inputs: Iterable[str | Path], what: str) -> None:
    """Refuse an output file that is one of the inputs (same path, or the same file by another name)."""
    out = Path(output)
    for item in inputs:
        if _same(out, Path(item)):
            raise KaikaError(
                f"{what} {out} is also an input of this command; writing it would destroy the input. "
                "Choose another output path"
            )


def check_output_file(output: str | Path, inputs: Iterable[str | Path], what: str = "--output") -> None:
    """An output file path that can be written: not an input, not a directory, not under a file."""
    out = Path(output)
    check_not_input(out, inputs, what)
    if out.is_dir():
        raise KaikaError(f"{what} {out} is a directory; give the path of a file to write")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise KaikaError(f"{what} {out}: {parent} is a file, so nothing can be written under it")


def check_inputs_outside(directory: str | Path, inputs: Iterable[str | Path], flag: str) -> None:
    """Refuse to replace ``directory`` (``flag``) while one of the inputs lies inside it."""
    root = Path(directory).resolve()
    for item in inputs:
        p = Path(item)
        if p.exists() and (p.resolve() == root or p.resolve().is_relative_to(root)):
            raise KaikaError(
                f"{flag} would delete {directory}, which holds the input {item}; "
                "move the input elsewhere or choose another output directory"
            )


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class DirLock:
    """``with DirLock(path, what):`` one writer at a time in directory ``path``.

    The lock is an exclusive, non-blocking ``flock`` on ``path/.kaika-lock``, which records the
    holder's pid, host and start time. A second process is refused at once with the holder named.
    A lock file whose process is gone (killed: the kernel released its lock) is reported and
    taken over. The directory is created if needed; if this lock created it and nothing else was
    written there, it is removed again on exit, so a refused or failed start leaves nothing behind.
    """

    def __init__(self, path: str | Path, what: str = "run"):
        self.path = Path(path)
        self.what = what
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> DirLock:
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self._cleanup_created()
                raise KaikaError(
                    f"another kaika process ({holder}) is writing to {self.path}; wait for it to finish, "
                    "or choose another output directory"
                ) from None
            except OSError as e:  # a file system without locks (some NFS and FUSE mounts): ENOLCK, EOPNOTSUPP
                os.close(fd)
                log.warning(
                    "%s: this file system cannot lock files (%s), so kaika cannot stop a second process from "
                    "writing here at the same time: make sure only one kaika %s writes to it",
                    self.path,
                    e.strerror or e,
                    self.what,
                )
                return self
            # The holder before us may have unlinked the file between our open and our flock: then
            # we hold a lock on a file nobody else sees. Retry until the locked file is the one there.
            try:
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = _read_holder(fd)
        if stale:
            log.warning(
                "%s: a previous kaika process (%s) ended without releasing its lock (killed?); taking it over",
                self.path,
                stale,
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        os.close(self.fd)  # releases the flock
        self.fd = None
        self._cleanup_created()

    def _cleanup_created(self) -> None:
        if self.created and self.path.is_dir():
            leftovers = [p for p in self.path.iterdir() if p.name not in (LOCK_FILE, OWNER_FILE)]
            if not leftovers:
                shutil.rmtree(self.path, ignore_errors=True)


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw) if raw else None
    except (OSError, ValueError):
        return "unknown pid"
    if not record:
        return ""
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
