"""Atomic adapter writes and the reader's check: a broken adapter is named, never loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kaika.atomic import ADAPTER_CONFIG, ADAPTER_WEIGHTS, STAGE_PREFIX, adapter_problem, staged_output
from kaika.cli import main
from kaika.errors import KaikaError
from kaika.rundir import check_adapter_dir


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, ja_tokenizer):
    """A real PEFT LoRA adapter of a tiny BLOOM, saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from helpers import build_model

    root = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(build_model("bloom", ja_tokenizer, root / "base"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query_key_value"], init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    return root / "adapter"


def copy_of(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_complete_adapter_passes(adapter_dir):
    assert adapter_problem(adapter_dir) is None
    check_adapter_dir(adapter_dir)


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_truncated_weights_are_named(adapter_dir, tmp_path, keep):
    bad = copy_of(adapter_dir, tmp_path / "bad")
    data = (bad / ADAPTER_WEIGHTS).read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    (bad / ADAPTER_WEIGHTS).write_bytes(data[:cut])
    with pytest.raises(
        KaikaError, match=rf"not a complete adapter: {ADAPTER_WEIGHTS} is (corrupt or )?truncated"
    ):
        check_adapter_dir(bad)


def test_missing_or_broken_config_is_named(adapter_dir, tmp_path):
    bad = copy_of(adapter_dir, tmp_path / "noconfig")
    (bad / ADAPTER_CONFIG).unlink()
    with pytest.raises(KaikaError, match=f"{ADAPTER_CONFIG} is missing"):
        check_adapter_dir(bad)
    (bad / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": ')  # cut mid-write
    with pytest.raises(KaikaError, match=f"{ADAPTER_CONFIG} is unreadable"):
        check_adapter_dir(bad)
    (bad / ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(KaikaError, match="not a PEFT adapter config"):
        check_adapter_dir(bad)


def test_generate_cli_refuses_a_corrupt_adapter(adapter_dir, tmp_path, capsys):
    bad = copy_of(adapter_dir, tmp_path / "bad")
    with (bad / ADAPTER_WEIGHTS).open("r+b") as f:
        f.truncate(1000)
    assert main(["generate", str(bad), "こんにちは"]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not a complete adapter: {ADAPTER_WEIGHTS} is corrupt or truncated (1000 bytes)" in err
    assert "Traceback" not in err


def test_staged_output_replaces_whole_or_not_at_all(adapter_dir, tmp_path):
    out = copy_of(adapter_dir, tmp_path / "run")
    (out / "trainer_log.jsonl").write_text("{}\n")  # run files that are not part of the adapter stay
    old = (out / ADAPTER_WEIGHTS).read_bytes()

    with pytest.raises(RuntimeError), staged_output(out) as stage:
        (stage / ADAPTER_WEIGHTS).write_bytes(b"half")
        raise RuntimeError("killed while writing")
    assert (out / ADAPTER_WEIGHTS).read_bytes() == old and adapter_problem(out) is None
    assert not list(out.glob(STAGE_PREFIX + "*"))

    with staged_output(out) as stage:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            (stage / name).write_bytes((adapter_dir / name).read_bytes())
        (stage / "new.txt").write_text("new")
        assert (out / ADAPTER_WEIGHTS).read_bytes() == old  # nothing published before the end
    assert adapter_problem(out) is None
    assert (out / "new.txt").read_text() == "new" and (out / "trainer_log.jsonl").is_file()
    assert not list(out.glob(STAGE_PREFIX + "*"))


def test_a_save_killed_midway_leaves_the_old_adapter(adapter_dir, tmp_path):
    """SIGKILL a process while it writes a large adapter: readers still see the complete old one."""
    out = copy_of(adapter_dir, tmp_path / "run")
    old = (out / ADAPTER_WEIGHTS).read_bytes()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom kaika.atomic import staged_output\n"
            "with staged_output(Path(sys.argv[1])) as stage:\n"
            "    f = (stage / 'adapter_model.safetensors').open('wb')\n"
            "    while True:\n"
            "        f.write(b'x' * 65536); f.flush(); time.sleep(0.001)\n",
            str(out),
        ]
    )
    deadline = time.monotonic() + 60
    while not any(s.stat().st_size > 1 << 20 for s in out.glob(STAGE_PREFIX + "*/*")):
        assert writer.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    writer.kill()
    writer.wait()
    assert (out / ADAPTER_WEIGHTS).read_bytes() == old and adapter_problem(out) is None
    assert list(out.glob(STAGE_PREFIX + "*"))  # the killed save's leftovers, outside the adapter
    with staged_output(out) as stage:  # the next save clears them
        (stage / "x").write_text("")
    assert not list(out.glob(STAGE_PREFIX + "*"))
    json.loads((out / ADAPTER_CONFIG).read_text())


# --------------------------------------------------------------------------- the one writer of files


def test_written_files_appear_whole_keep_the_mode_and_follow_links(tmp_path):
    import os
    import stat

    from kaika.atomic import written_file, written_files

    existing = tmp_path / "old.jsonl"
    existing.write_text("old\n")
    existing.chmod(0o640)
    new = tmp_path / "missing" / "parent" / "new.jsonl"
    with written_files([existing, new]) as (a, b):
        a.write("first\n")
        b.write("second\n")
        assert existing.read_text() == "old\n" and not new.exists()  # nothing visible until the end
    assert existing.read_text() == "first\n" and new.read_text() == "second\n"
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640  # the replaced file's mode
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask  # a new file's mode, as the umask says
    link = tmp_path / "link.jsonl"
    link.symlink_to(existing)
    with written_file(link) as f:
        f.write("through the link\n")
    assert link.is_symlink() and existing.read_text() == "through the link\n"
    with pytest.raises(ValueError), written_file(existing) as f:  # the block fails: nothing changes
        f.write("half")
        raise ValueError
    assert existing.read_text() == "through the link\n"
    assert not list(tmp_path.rglob("*.kaika-tmp"))


def test_a_device_or_a_fifo_is_written_through_never_replaced_and_a_directory_is_refused(tmp_path):
    import os
    import stat
    import threading

    from kaika.atomic import written_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    with written_file(fifo) as f:
        f.write("streamed\n")
    reader.join(timeout=10)
    assert got == ["streamed\n"] and stat.S_ISFIFO(fifo.stat().st_mode)
    device = tmp_path / "null"
    try:  # a device node of the test's own (major 1, minor 3: what /dev/null is), never the machine's
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        device = None
    if device is not None:
        with written_file(device) as f:
            f.write("gone\n")
        assert stat.S_ISCHR(device.stat().st_mode)  # still the device
    with pytest.raises(KaikaError, match="is a directory"), written_file(tmp_path):
        pass
    if device is None:
        pytest.skip("mknod is not allowed here: the character-device case was not run (the FIFO case was)")


def test_a_full_or_read_only_disk_is_a_clear_error_and_leaves_nothing(tmp_path):
    """On a file system the test mounts itself (a 64 kB tmpfs, then the same read-only): the writer and a
    command that uses it (data convert) fail with the file and the reason; the old file is untouched."""
    from helpers import in_mount_namespace, seed_records, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", seed_records(200))  # converted, larger than the disk
    (tmp_path / "disk").mkdir()
    script = """
        mount -t tmpfs -o size=64k none "$1" || exit 90
        echo old > "$1/out.jsonl"
        "$PY" -c 'import sys
from kaika.atomic import written_file
from kaika.errors import KaikaError
try:
    with written_file(sys.argv[1]) as f:
        f.write("x" * 200_000)
except KaikaError as e:
    print("refused:", e)' "$1/out.jsonl"
        ls -a "$1"
        cat "$1/out.jsonl"
        "$PY" -m kaika data convert "$2" -o "$1/conv.jsonl" --to messages; echo "rc $?"
        mount -o remount,ro "$1"
        "$PY" -m kaika data convert "$2" -o "$1/conv.jsonl" --to messages; echo "rc $?"
    """
    done = in_mount_namespace(script, str(tmp_path / "disk"), str(data))
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err
    assert "refused: could not write --output" in out and "No space left on device" in out
    assert ".kaika-tmp" not in out and "\nold\n" in out  # no temporary file left, the old file as it was
    assert out.count("rc 2") == 2 and "Traceback" not in err
    assert "could not write the converted file" in err and "No space left on device" in err
    assert "Read-only file system" in err
