"""What kaika may overwrite and delete, and one writer per run directory (kaika.guard)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import seed_records, write_jsonl
from kaika.errors import KaikaError
from kaika.guard import (
    LOCK_FILE,
    DirLock,
    check_inputs_outside,
    check_not_input,
    check_output_file,
    check_replaceable,
    claim,
    replace_owned,
)

HOLD = """
import sys, time
from pathlib import Path
from kaika.guard import DirLock, claim
with DirLock(sys.argv[1]):
    claim(Path(sys.argv[1]), "run")
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_only_directories_kaika_wrote_are_replaced(tmp_path):
    mine = tmp_path / "mine"
    claim(mine, "run")
    (mine / "anything.bin").write_bytes(b"x")
    replace_owned(mine, "--force")  # carries the owner file
    assert not mine.exists()

    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.txt").write_text("keep")
    with pytest.raises(KaikaError, match="precious.txt"):
        replace_owned(user, "--force")
    # A model downloaded from the hub has only names kaika writes too: without a kaika config it is not ours.
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hub / name).write_text("{}")
    with pytest.raises(KaikaError, match="no kaika config"):
        check_replaceable(hub, "--force")
    merged = tmp_path / "merged"  # a merged model: kaika's names and its config
    merged.mkdir()
    for name in ("config.json", "model.safetensors", "kaika_training_config.yaml"):
        (merged / name).write_text("{}")
    check_replaceable(merged, "--force")
    locked = tmp_path / "locked"  # only kaika's lock inside (a run that just started): as good as empty
    locked.mkdir()
    (locked / LOCK_FILE).write_text("{}")
    check_replaceable(locked, "--overwrite")
    assert (user / "precious.txt").read_text() == "keep" and len(list(hub.iterdir())) == 3


def test_outputs_are_never_inputs(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("{}\n")
    with pytest.raises(KaikaError, match="also an input"):
        check_not_input(tmp_path / "." / "p.jsonl", [data], "--output")
    os.link(data, tmp_path / "hard.jsonl")  # the same file under another name
    with pytest.raises(KaikaError, match="also an input"):
        check_not_input(tmp_path / "hard.jsonl", [data], "--output")
    with pytest.raises(KaikaError, match="is a directory"):
        check_output_file(tmp_path, [data])
    with pytest.raises(KaikaError, match="is a file"):
        check_output_file(data / "x.jsonl", [])
    with pytest.raises(KaikaError, match="holds the input"):
        check_inputs_outside(tmp_path, [data], "--overwrite")
    check_inputs_outside(
        tmp_path / "run", [data, "seed-tasks-ja"], "--overwrite"
    )  # a builtin name is no path


def test_lock_refuses_a_second_writer_and_takes_over_a_killed_ones(tmp_path, caplog):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        with (
            pytest.raises(KaikaError, match=rf"another kaika process \(pid {holder.pid} .*is writing to"),
            DirLock(run),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    record = json.loads((run / LOCK_FILE).read_text())  # left behind by the kill
    assert record["pid"] == holder.pid
    with caplog.at_level("WARNING"), DirLock(run):
        pass
    assert f"pid {holder.pid}" in caplog.text and "ended without releasing its lock" in caplog.text
    assert not (run / LOCK_FILE).exists()
    # A directory the lock created, left empty by a refused or failed start, is removed again.
    fresh = tmp_path / "fresh"
    with DirLock(fresh):
        assert fresh.is_dir()
    assert not fresh.exists()


def test_two_trainings_into_one_directory(tmp_path, capsys):
    # A second `kaika train --overwrite` into the directory another run is writing is refused at
    # once, with the holder named, and deletes nothing of the first run.
    from kaika.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", seed_records(4, max_chars=60))
    run = tmp_path / "run"
    holder = hold_lock(run)
    (run / "trainer_log.jsonl").write_text('{"step": 1}\n')  # what the first run has written so far
    try:
        start = time.monotonic()
        code = main(["train", "--base-model", "tiny-bloom-ja", "--data", str(data), "--output-dir", str(run),
                  "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--overwrite"])  # fmt: skip
        assert code == 2 and time.monotonic() - start < 30
        assert f"another kaika process (pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / "trainer_log.jsonl").read_text() == '{"step": 1}\n'
