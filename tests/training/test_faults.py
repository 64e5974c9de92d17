"""Faults: non-finite loss, unwritable or full disks, torn checkpoints, process-count mistakes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import in_mount_namespace, seed_records, write_jsonl
from kaika.config import TrainConfig
from kaika.errors import KaikaError
from kaika.training.faults import TrainingStopped, checkpoint_problem, resume_checkpoint, trim_log
from kaika.training.sft import train


def make_config(tmp_path, **train_kw) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.data = [str(write_jsonl(tmp_path / "train.jsonl", seed_records(8, max_chars=100)))]
    cfg.data.cutoff_len = 128
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.batch_size = cfg.train.micro_batch_size = 4
    cfg.train.logging_steps = 1
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


# --------------------------------------------------------------------------- nan / inf


def test_exploding_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    # Warm-up keeps step 1 harmless (lr 0); step 2's lr of ~3e29 sends the weights to ~1e29, so
    # step 3's forward pass overflows and its gradient is nan.
    cfg = make_config(tmp_path, lr=1e30, warmup_steps=3, max_steps=8, save_steps=2)
    with pytest.raises(TrainingStopped) as err:
        train(cfg)
    msg = str(err.value)
    run = tmp_path / "run"
    assert "training stopped at step 3: the loss became non-finite (the gradient is nan)" in msg
    assert f"The last good checkpoint is {run / 'checkpoints' / 'checkpoint-2'} (step 2)" in msg
    assert "No adapter was written" in msg and "--lr is 1e+30; try 1e+29" in msg and "bfloat16" in msg
    assert not (run / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2"
    ]  # nothing of step 3


def test_weights_overflowing_to_inf_stop_before_any_checkpoint(tmp_path):
    # An lr beyond float32's range turns the first update itself into inf.
    cfg = make_config(tmp_path, lr=1e39, max_steps=4, save_steps=1)
    with pytest.raises(
        TrainingStopped, match=r"at step 1: .*weights became non-finite.*No checkpoint was saved"
    ):
        train(cfg)
    run = tmp_path / "run"
    assert not (run / "adapter_model.safetensors").exists()
    assert not list((run / "checkpoints").glob("checkpoint-*"))


# --------------------------------------------------------------------------- output dir


def test_output_dir_under_a_file_fails_before_anything_is_read(tmp_path):
    (tmp_path / "file").write_text("")
    cfg = make_config(tmp_path)
    cfg.model.base_model = str(tmp_path / "no-such-model")  # proves nothing was loaded
    cfg.train.output_dir = str(tmp_path / "file" / "run")
    with pytest.raises(KaikaError, match=r"cannot create output_dir .*file is a file, not a directory"):
        train(cfg)


def test_read_only_output_dir_is_a_clear_error_before_training(tmp_path):
    cfg = make_config(tmp_path)
    (tmp_path / "ro").mkdir()
    done = in_mount_namespace(
        'mount -t tmpfs -o ro,size=1m none "$1" && exec "$PY" -m kaika train --data "$2" --output-dir "$1/run"',
        str(tmp_path / "ro"),
        cfg.data.data[0],
    )
    assert done.returncode == 2, done.stderr
    assert f"output_dir {tmp_path / 'ro' / 'run'} is not writable" in done.stderr
    assert "Read-only file system" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_disk_too_small_and_disk_full_midway(tmp_path):
    """1. A 1 MB file system cannot hold the checkpoints: refused before training.
    2. A disk that fills up after the first checkpoint: a clear error naming that checkpoint, no
       torn checkpoint used, and --resume (once there is room) finishes the run."""
    from kaika.modeling.builtin import builtin_model_path

    builtin_model_path("tiny-bloom-ja")  # built outside the small disks
    data = make_config(tmp_path).data.data[0]
    (tmp_path / "disk").mkdir()
    args = f"--data {data} --cutoff-len 128 --batch-size 4 --micro-batch-size 4 --logging-steps 1 --max-steps 9 --save-steps 3"
    script = f"""
        mount -t tmpfs -o size=1m none "$1" || exit 90
        "$PY" -m kaika train {args} --output-dir "$1/small" 2> "$2/small.err"; echo $? > "$2/small.rc"
        ls -A "$1" > "$2/small.ls"
        umount "$1"; mount -t tmpfs -o size=8m none "$1" || exit 91
        "$PY" -m kaika train {args} --output-dir "$1/run" 2> "$2/full.err" &
        pid=$!
        while [ ! -f "$1/run/checkpoints/checkpoint-3/trainer_state.json" ]; do
            kill -0 $pid 2>/dev/null || exit 92; sleep 0.01
        done
        dd if=/dev/zero of="$1/filler" bs=4k 2>/dev/null
        wait $pid; echo $? > "$2/full.rc"
        cp -r "$1/run" "$2/after-full"
        rm "$1/filler"
        "$PY" -m kaika train {args} --output-dir "$1/run" --resume 2> "$2/resume.err"; echo $? > "$2/resume.rc"
        cp -r "$1/run" "$2/after-resume"
    """
    done = in_mount_namespace(script, str(tmp_path / "disk"), str(tmp_path))
    assert done.returncode == 0, done.stderr
    small = (tmp_path / "small.err").read_text()
    assert (tmp_path / "small.rc").read_text().strip() == "2", small
    assert "not enough disk space" in small and "MB free" in small and "Traceback" not in small
    assert (tmp_path / "small.ls").read_text() == ""  # refused before anything was written: no run dir left

    full = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "2", full
    assert "training stopped: a write failed" in full and "No space left on device" in full, full
    assert "The last good checkpoint is" in full and "Traceback" not in full
    after = tmp_path / "after-full"
    assert not (after / "adapter_model.safetensors").exists()
    for ckpt in (after / "checkpoints").glob(
        "checkpoint-*"
    ):  # a torn one may exist, but is recognised as such
        if ckpt.name != "checkpoint-3":
            assert checkpoint_problem(ckpt) is not None, ckpt

    resumed = (tmp_path / "resume.err").read_text()
    assert (tmp_path / "resume.rc").read_text().strip() == "0", resumed
    final = tmp_path / "after-resume"
    assert (final / "adapter_model.safetensors").is_file()
    steps = [json.loads(x)["step"] for x in (final / "trainer_log.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] and steps == sorted(steps) and steps[-1] == 9


# --------------------------------------------------------------------------- checkpoints


def fake_checkpoint(root: Path, step: int, state: str | None = "ok") -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    if state == "ok":
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    elif state == "torn":
        (ckpt / "trainer_state.json").write_text('{"global_step": ')
    return ckpt


def test_resume_skips_torn_checkpoints_and_says_why(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2)
    fake_checkpoint(root, 4)
    fake_checkpoint(root, 6, state=None)  # killed before trainer_state.json
    fake_checkpoint(root, 8, state="torn")  # killed while writing it
    (root / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00")  # truncated
    assert resume_checkpoint(root, remove_incomplete=False) == root / "checkpoint-2"
    assert (root / "checkpoint-8").exists()  # other ranks only read
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(root, remove_incomplete=True) == root / "checkpoint-2"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"]
    text = caplog.text
    assert "checkpoint-8 is incomplete (trainer_state.json is unreadable" in text
    assert "checkpoint-6 is incomplete (trainer_state.json is missing" in text
    assert "checkpoint-4 is incomplete (adapter_model.safetensors is truncated" in text
    shutil.rmtree(root / "checkpoint-2")
    with pytest.raises(KaikaError, match="no complete checkpoint"):
        resume_checkpoint(root, remove_incomplete=True)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_resume_in_the_middle_of_an_epoch_replays_the_same_batches(tmp_path, group_by_length):
    # 8 examples, global batch 4 as 2 × accumulation 2: two steps per epoch, so checkpoint-3 sits in
    # the middle of epoch 1. Resuming there must draw the epoch's second half of the same shuffle
    # (a shuffle drawn from the global RNG when the resumed epoch starts gives another order) and
    # restore the dropout RNG. Same process, same shapes: bitwise equal, measured 0.0.
    cfg = make_config(tmp_path, max_steps=8, save_steps=3, save_total_limit=4, micro_batch_size=2, lr=1e-2)
    cfg.train.group_by_length = group_by_length
    cfg.lora.dropout = 0.1
    ref = train(cfg)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "run" / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3"
    )
    cfg.train.output_dir, cfg.train.resume = str(resumed), True
    again = train(cfg)
    assert again.global_step == 8
    from safetensors.torch import load_file

    a = load_file(Path(ref.output_dir) / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k and a[k].abs().max() > 1e-3 for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_resume_never_trains_past_the_planned_steps(tmp_path):
    # A run killed during its final save has its last checkpoint at max_steps but no adapter; a
    # finished run resumed has both. Either way --resume has nothing left to train: it must save
    # the checkpoint's adapter, bit for bit the uninterrupted run's, without a step more.
    from safetensors.torch import load_file

    cfg = make_config(tmp_path, max_steps=4, save_steps=2, lr=1e-2)
    ref = train(cfg)
    weights = Path(ref.output_dir) / "adapter_model.safetensors"
    expected = load_file(weights)
    weights.unlink()  # the kill during the final save
    cfg.train.resume = True
    for _ in range(2):  # the torn run, then the finished one
        again = train(cfg)
        assert again.global_step == 4
        got = load_file(weights)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        log = [
            json.loads(line) for line in (Path(ref.output_dir) / "trainer_log.jsonl").read_text().splitlines()
        ]
        assert max(row.get("step", 0) for row in log) == 4


def test_trim_log_keeps_the_rows_up_to_the_resumed_step(tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    rows = [{"step": s, "loss": 1.0} for s in range(1, 6)] + [{"step": 4, "eval_loss": 2.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # cut by a kill
    trim_log(log, 4)
    assert [json.loads(x) for x in log.read_text().splitlines()] == [r for r in rows if r["step"] <= 4]


def test_global_batch_must_divide_over_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = make_config(tmp_path)
    cfg.model.base_model = str(tmp_path / "no-such-model")
    cfg.train.batch_size, cfg.train.micro_batch_size = 8, 2
    with pytest.raises(
        KaikaError, match=r"batch_size 8 must be a multiple of micro_batch_size 2 × 3 process\(es\) = 6"
    ):
        train(cfg)


def test_quantized_models_load_whole_onto_each_ranks_own_device(monkeypatch):
    from kaika.modeling.load import quantized_device_map

    for rank in ("0", "1", "3"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert quantized_device_map() == {"": "cpu"}  # bitsandbytes computes on the CPU too
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert quantized_device_map() == {"": int(rank)}  # never "auto", never another rank's GPU
        monkeypatch.undo()


@pytest.mark.parametrize(
    ("name", "kind", "extra"),
    [
        ("ddp.yaml", "MULTI_GPU", {}),
        ("fsdp.yaml", "FSDP", {"fsdp_version": 2, "fsdp_transformer_layer_cls_to_wrap": "BloomBlock"}),
        ("deepspeed_zero2.yaml", "DEEPSPEED", {"zero_stage": 2}),
        ("deepspeed_zero3.yaml", "DEEPSPEED", {"zero_stage": 3}),
    ],
)
def test_shipped_accelerate_configs_load_with_accelerates_own_loader(name, kind, extra):
    # Only DDP runs here (test_scaling.py); the others need GPUs. accelerate's loader rejects
    # unknown keys, so a misspelt key in a shipped file fails here rather than on a cluster.
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parents[2] / "configs" / "accelerate" / name))
    assert config.distributed_type.name == kind and config.num_processes == 2
    section = config.fsdp_config if kind == "FSDP" else config.deepspeed_config
    for key, value in extra.items():
        assert section[key] == value, key
    assert config.mixed_precision == "no"  # precision comes from kaika's --dtype, not the launcher
