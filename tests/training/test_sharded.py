"""FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 run as shipped (configs/accelerate/*.yaml), killed and resumed.

Each engine runs ``kaika train`` in two processes on CPUs (gloo; DeepSpeed on its CPU accelerator),
is SIGKILLed once a checkpoint exists, and is resumed to the end with ``--resume``. Its adapter must
be the one a single process trains with the same global batch, uninterrupted: bit for bit in float32
on CPU (the two ranks' gradients meet in one sum of two operands, the same association as one
process's accumulation; measured 0.0). ``atol=1e-5`` is the DDP test's bound (tests/training/
test_scaling.py says why); a wrong batch split, a lost optimizer state or a replayed batch moves the
weights by ~1e-3 or more. With ``--lora-qkv q,v`` the k rows of every B must be exactly zero: under
FSDP2 the slice masks follow the shards (the hooks on whole parameters no longer run there).

Sharding is checked, not assumed: accelerate turns an FSDP launch on CPUs into plain data parallel,
so the test reads what each run measured of its own weights (``weights: this rank holds …``) and,
for ZeRO-2, finds each rank's optimizer partition in the checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import seed_records, write_jsonl
from kaika.config import TrainConfig
from kaika.training.faults import checkpoint_problem
from kaika.training.sft import train
from launchers import (
    accelerate,
    adapter,
    assert_same_adapter,
    kaika,
    kill_tree,
    log_rows,
    logged_step,
    one_thread,
    run,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow

STEPS, SAVE = 6, 2
COMMON = [
    "--cutoff-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2",
    "--logging-steps", "1", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0",
    "--lora-qkv", "q,v", "--dtype", "float32", "--max-steps", str(STEPS), "--save-steps", str(SAVE),
]  # fmt: skip
ENGINES = {"fsdp2": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
HOLDS = re.compile(r"weights: this rank holds ([\d.]+)% of the model's [\d,]+ parameters \(([^)]*)\)")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sharded") / "train.jsonl", seed_records(8, max_chars=100))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One process, the same global batch (2 micro-batches × accumulation 2), never interrupted."""
    cfg = TrainConfig()
    cfg.model.dtype = "float32"
    cfg.data.data, cfg.data.cutoff_len = [str(data)], 128
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.qkv = 8, 16, 0.0, ["q,v"]
    t = cfg.train
    t.output_dir = str(tmp_path_factory.mktemp("reference") / "run")
    t.batch_size, t.micro_batch_size, t.lr, t.max_steps, t.save_steps, t.logging_steps = (
        4,
        2,
        1e-2,
        STEPS,
        SAVE,
        1,
    )
    with one_thread():
        return train(cfg).output_dir


def k_rows_are_zero(out: Path) -> None:
    """tiny-bloom-ja: 4 heads of 32 dims; BLOOM's fused rows are [q0 k0 v0 q1 k1 v1 …] per head."""
    for name, b in adapter(out).items():
        if "lora_B" in name:
            k = [row for head in range(4) for row in range((3 * head + 1) * 32, (3 * head + 2) * 32)]
            assert b[k].abs().max() == 0, name
            assert b.abs().max() > 0, name


@pytest.mark.parametrize("engine", ENGINES)
def test_killed_and_resumed_engine_trains_the_one_process_adapter(engine, data, reference, tmp_path):
    out = tmp_path / "run"
    cmd = kaika(
        "train", *COMMON, "--data", str(data), "--output-dir", str(out), launcher=accelerate(ENGINES[engine])
    )
    ckpts = out / "checkpoints"

    # 1. SIGKILL every process once a checkpoint is complete and the next step is logged.
    proc = start(cmd)
    wait_for(proc, lambda: logged_step(out) > SAVE and checkpoint_problem(ckpts / f"checkpoint-{SAVE}") is None,
             f"step {SAVE + 1}")  # fmt: skip
    kill_tree(proc)
    assert not (out / "adapter_model.safetensors").exists()

    # 2. --resume to the end.
    done = run([*cmd, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and "verified: the saved adapter is the trained one" in done.stderr

    # Sharded as the config says, measured by the run itself.
    share, how = HOLDS.search(done.stderr).groups()
    if engine == "zero2":
        assert float(share) == 100.0 and "optimizer state and gradients sharded" in how, how
        last = max(ckpts.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
        partitions = sorted(p.name for p in last.glob("global_step*/*optim_states.pt"))
        assert (
            len(partitions) == 2
            and any("rank_0" in p for p in partitions)
            and any("rank_1" in p for p in partitions)
        )
    else:
        assert float(share) < 60.0 and "sharded" in how, how
    if engine == "zero3":  # partitioned as it loaded, not loaded whole and partitioned afterwards
        assert "ZeRO-3 partitioned the base as it loaded: this process holds 50.0%" in done.stderr

    assert_same_adapter(out, reference, atol=1e-5, context=engine)
    k_rows_are_zero(out)
    rows = [r for r in log_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the log reads as one run
    want = [r["loss"] for r in log_rows(reference) if "loss" in r]
    assert [r["loss"] for r in rows] == pytest.approx(want, rel=1e-5)


def test_fsdp2_shards_a_4bit_base_and_trains_the_one_process_adapter(data, tmp_path):
    """QLoRA under FSDP2: the 4-bit weights are stored in the run's dtype (bnb_4bit_quant_storage), so
    fully_shard splits them like any other weight."""
    args = [*COMMON, "--quantization", "4bit", "--max-steps", "3", "--data", str(data)]
    done = run(
        kaika("train", *args, "--output-dir", str(tmp_path / "fsdp"), launcher=accelerate("fsdp.yaml"))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    share, how = HOLDS.search(done.stderr).groups()
    assert float(share) < 60.0 and "FSDP2" in how, how
    one = run(kaika("train", *args, "--output-dir", str(tmp_path / "one")))
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_adapter(tmp_path / "fsdp", tmp_path / "one", atol=1e-5)
    k_rows_are_zero(tmp_path / "fsdp")
