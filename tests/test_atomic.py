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
