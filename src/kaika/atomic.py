"""Outputs a reader can trust: adapters are written aside, then moved into place; broken ones are named.

A kill at any moment (SIGKILL, power loss of the process, a full disk) must never leave a
half-written adapter where ``kaika generate`` (or plain ``PeftModel.from_pretrained``) would
load it. ``staged_output`` writes every file into a staging directory inside the output
directory, fsyncs it, then moves the files into place with ``os.replace`` (atomic within one
file system). The adapter weights are the commit point: the old weights file is removed
first and the new one is moved in last, so at every instant a reader sees either the old
adapter, no weights at all (reported as incomplete), or the whole new adapter — never new
files mixed with old weights, and never a truncated weights file.

``adapter_problem`` is the reader's side: it names what is wrong with an adapter directory
(missing or unreadable ``adapter_config.json``, missing, truncated or corrupt safetensors).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from kaika.errors import KaikaError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STAGE_PREFIX = ".kaika-saving-"
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
DISK_MESSAGES = re.compile(
    r"No space left|StorageFull|Disk quota|File too large|FileTooLarge|Read-only file system"
    r"|os error (28|27|30|122)\b"
)


def write_failure(exc: BaseException | None) -> str | None:
    """The reason when ``exc`` is a failed write (full disk, file too large, read-only), else None.

    torch.save raises OSError; safetensors and tokenizers (Rust) raise their own types whose
    message carries the OS error, so both are recognised.
    """
    if exc is None:
        return None
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror)
    text = str(exc)
    if DISK_MESSAGES.search(text):
        return f"{type(exc).__name__}: {text[:300]}"
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the renames that publish them (rename order ≠ write order on disk)."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            _fsync(path)
    _fsync(root)


def remove_stale_stages(out: Path) -> None:
    """Staging directories left by a save that was killed: never published, safe to delete."""
    for stale in out.glob(STAGE_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_output(
    out: Path,
    commit: str = ADAPTER_WEIGHTS,
    stale: Iterable[str] = (),
    hint: str = "Free some space and run again with --resume (the last checkpoint is kept)",
) -> Iterator[Path]:
    """Yield an empty directory to write into; on success publish its files into ``out``.

    ``commit`` (the adapter weights, an evaluation's summary) is removed from ``out`` before anything
    moves and is moved in last; then the files named in ``stale`` that this save did not write (an
    earlier save's, that would not belong with it) are deleted. On an exception nothing in ``out``
    changes and the staging directory is deleted; a failed write names ``hint``.
    """
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(out)
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))
    try:
        try:
            yield stage
        except Exception as e:
            reason = write_failure(e)
            if reason:
                raise KaikaError(
                    f"could not write the save to {out} ({reason}); nothing there was replaced. {hint}"
                ) from e
            raise
        _fsync_tree(stage)
        names = sorted(p.name for p in stage.iterdir())
        (out / commit).unlink(missing_ok=True)
        for name in set(stale) - set(names):
            (out / name).unlink(missing_ok=True)
        for name in sorted(names, key=lambda n: n == commit):  # the commit file last
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(stage / name, target)
        _fsync(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------- files outside training


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _target(path: Path, what: str) -> tuple[Path, bool]:
    """(the file to write, whether it is written through rather than replaced). A symbolic link is
    followed (the link stays, its file is replaced); a character device or a FIFO (``/dev/stdout``, a
    pipe) is written through: replacing it would put a regular file where the device was. A directory
    or another kind of special file is refused."""
    target = path.resolve() if path.is_symlink() else path
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target, False
    except OSError as e:
        raise KaikaError(f"{what} {path}: cannot look at it ({e.strerror})") from None
    if stat.S_ISREG(st.st_mode):
        return target, False
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return target, True
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    raise KaikaError(f"{what} {path} is {kind}; give the path of a file to write")


@contextlib.contextmanager
def written_files(
    paths: list[str | Path], what: str = "--output", binary: bool = False
) -> Iterator[list[IO]]:
    """``with written_files([a, b]) as (fa, fb):`` each file whole or not at all, the one writer of
    every output kaika writes outside a training run.

    Each file is written to a temporary file beside it, flushed to disk, given the mode a new file
    gets under the umask (or the mode of the file it replaces), and moved over the target when the
    block ends; if the block or a write fails (full disk, read-only directory, no permission), the
    temporary files are removed, no existing file is touched, and the failure is a ``KaikaError``
    naming the file and the reason. Devices and FIFOs are written through (see :func:`_target`).
    """
    targets = [(Path(p), *_target(Path(p), what)) for p in paths]
    opened: list[tuple[IO, Path | None]] = []  # (handle, temporary file or None when written through)
    current = targets[0][0] if targets else None
    try:
        for given, target, through in targets:
            current = given
            if through:
                handle = open(target, "wb" if binary else "w", encoding=None if binary else "utf-8")  # noqa: SIM115
                opened.append((handle, None))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".kaika-tmp")
            handle = os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8")
            opened.append((handle, Path(tmp)))
        yield [handle for handle, _ in opened]
        for (handle, tmp), (given, _, _) in zip(opened, targets, strict=True):
            current = given
            handle.flush()
            if tmp is not None:
                os.fsync(handle.fileno())
            handle.close()
        for (_, tmp), (given, target, _) in zip(opened, targets, strict=True):
            if tmp is None:
                continue
            current = given
            mode = stat.S_IMODE(os.stat(target).st_mode) if target.exists() else 0o666 & ~_umask()
            os.chmod(tmp, mode)
            os.replace(tmp, target)
            _fsync(target.parent)
    except BaseException as e:
        for handle, tmp in opened:
            with contextlib.suppress(OSError):
                handle.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or write_failure(e):
            reason = write_failure(e) or (e.strerror if isinstance(e, OSError) else str(e))
            raise KaikaError(
                f"could not write {what} {current} ({reason}); nothing was written there, and no existing file "
                "was changed"
            ) from e
        raise


@contextlib.contextmanager
def written_file(path: str | Path, what: str = "--output", binary: bool = False) -> Iterator[IO]:
    """:func:`written_files` for one file."""
    with written_files([path], what, binary) as (handle,):
        yield handle


def write_text(path: str | Path, text: str, what: str = "--output") -> None:
    with written_file(path, what) as f:
        f.write(text)


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None when it is."""
    from safetensors import safe_open

    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is truncated ({size} bytes)"
    try:
        # safetensors checks that the header is valid JSON and that the tensors it declares
        # cover the file exactly: a truncated or padded file fails here, before any tensor is read.
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
    except Exception as e:  # SafetensorError, OSError: the library's message says which
        return f"{path.name} is corrupt or truncated ({size} bytes): {e}"
    if not names:
        return f"{path.name} holds no tensors"
    return None


def read_marker(path: Path, missing: str = "is missing") -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object that marks a save as complete (an adapter's config, a checkpoint's state):
    ``(data, None)``, or ``(None, why it cannot be trusted)``."""
    if not path.is_file():
        return None, f"{path.name} {missing}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path.name} is unreadable ({e})"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def adapter_problem(adapter_dir: Path) -> str | None:
    """What makes ``adapter_dir`` unusable as a PEFT adapter, or None when it looks complete."""
    if not adapter_dir.is_dir():
        return f"{adapter_dir} does not exist or is not a directory"
    data, problem = read_marker(adapter_dir / ADAPTER_CONFIG)
    if problem:
        return problem
    if "peft_type" not in data:
        return f"{ADAPTER_CONFIG} is not a PEFT adapter config (no peft_type)"
    return safetensors_problem(adapter_dir / ADAPTER_WEIGHTS)
