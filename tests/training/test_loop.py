"""The training loop can be seen changing: the Trainer method kaika overrides is the one reviewed, and a
fixed tiny run's first losses are the stored ones (the loop's order: ``kaika.training.trainer.run_fit``)."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "tiny_run.json"

# sha256 of the source of ``transformers.Trainer._get_train_sampler`` as reviewed against
# ``KaikaTrainer._get_train_sampler`` (which takes the super()'s LengthGroupedSampler and its
# ``lengths``, and returns an order seeded per epoch) and ``SeededOrder._get_train_sampler`` (which
# replaces it whole). transformers 5.25.0: group_by_length gives LengthGroupedSampler over the
# per-process accumulated batch; batch_rebalance, sequential and random are returned as they are.
REVIEWED = {"1580d7493244e637"}


def test_the_trainer_method_kaika_overrides_is_the_one_reviewed():
    from transformers import Trainer

    source = inspect.getsource(Trainer._get_train_sampler)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest in REVIEWED, (
        f"transformers changed Trainer._get_train_sampler (sha256 {digest}): read the new version, check that "
        "KaikaTrainer._get_train_sampler and SeededOrder (kaika/training/trainer.py) still get what they expect "
        "(a LengthGroupedSampler with .lengths for group_by_length), run tests/training/test_faults.py, then add "
        "the digest to REVIEWED"
    )
    params = list(inspect.signature(Trainer._get_train_sampler).parameters)
    assert params == ["self", "train_dataset"]


def test_a_fixed_tiny_run_trains_the_stored_losses(tmp_path):
    """Data order, template, tokens, masking, loss, LoRA init, optimizer and schedule all move these
    numbers; float noise between CPUs and thread counts stays far below the tolerance."""
    import kaika

    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    out = tmp_path / "run"
    kaika.train(
        base_model="tiny-bloom-ja", data="seed-tasks-ja", output_dir=str(out), dtype="float32", max_steps=4,
        batch_size=4, micro_batch_size=2, logging_steps=1, verify=False, seed=0,
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["lr"] for r in steps] == pytest.approx(golden["lr"], rel=1e-9)
    assert [r["loss"] for r in steps] == pytest.approx(golden["loss"], rel=1e-4, abs=0), (
        "the first losses of the fixed tiny run moved: a change altered training. If it should (a new "
        "default, a fixed bug), say so in the commit and record the new numbers in " + str(GOLDEN)
    )
    assert [r["grad_norm"] for r in steps] == pytest.approx(golden["grad_norm"], rel=1e-3)
