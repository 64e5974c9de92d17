"""--packing for instruction tuning: whole examples per row, the same loss and gradients as unpacked.

Tolerance: a packed row runs the same per-example attention (block-diagonal mask; on BLOOM ALiBi
restarting per example) in a longer matrix, so only float32 summation order differs: relative
error < 1e-5, as for the fast loss. Attention leaking across examples moves the loss of these
random tiny models by ~4e-4 relative (BLOOM; more on Llama), and gradients more; a boundary token
trained on changes the target count.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import build_model, seed_records, write_jsonl
from kaika.config import TrainConfig
from kaika.data.examples import encode_records
from kaika.data.packing import PackedExamplesCollator, enable_packed_attention, pack_examples
from kaika.data.prompts import load_template
from kaika.data.tokenize import IGNORE_INDEX
from kaika.modeling.attention import set_attention
from kaika.training.loss import causal_lm_loss_sum
from kaika.training.sft import train


def features(tokenizer, n: int, train_on_inputs: bool):
    feats, _ = encode_records(seed_records(n), load_template("alpaca_ja"), tokenizer, 96, train_on_inputs)
    return feats


def test_pack_examples_keeps_every_example_whole_and_once(ja_tokenizer):
    feats = features(ja_tokenizer, 40, train_on_inputs=True)
    rows = pack_examples(feats, cutoff_len=256)
    assert len(rows) < len(feats) / 2  # short seed tasks: several per row
    seen = []
    for row in rows:
        n = len(row["input_ids"])
        assert n <= 256 and len(row["labels"]) == len(row["position_ids"]) == n
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [n]
        for a, b in zip(starts, starts[1:], strict=False):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE_INDEX  # never predicted from the previous example
            seen.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a + 1 : b])))
    want = [(tuple(f["input_ids"]), tuple(f["labels"][1:])) for f in feats]
    assert sorted(seen) == sorted(want)


def lora(base_dir, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config).train()


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss_sum, count = causal_lm_loss_sum(model, batch)
    loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss_sum.item(), int(count), grads


@pytest.mark.parametrize(("arch", "attention"), [("bloom", "sdpa"), ("bloom", "eager"), ("llama", None)])
def test_packed_loss_and_lora_gradients_equal_unpacked(tmp_path, ja_tokenizer, arch, attention):
    # train_on_inputs: every token is a target, so each example boundary is tested.
    feats = features(ja_tokenizer, 12, train_on_inputs=True)
    model = lora(build_model(arch, ja_tokenizer, tmp_path / arch))
    if attention:
        set_attention(model, attention)
    enable_packed_attention(model)
    collate = PackedExamplesCollator(ja_tokenizer.pad_token_id)

    rows = pack_examples(feats, cutoff_len=256)
    assert len(rows) < len(feats)
    packed = loss_and_grads(model, collate(rows))
    unpacked = loss_and_grads(model, collate(feats))  # one example per row, padded
    assert packed[1] == unpacked[1] == sum(len(f["input_ids"]) - 1 for f in feats)
    assert abs(packed[0] - unpacked[0]) / unpacked[0] < 1e-5
    for name, g in unpacked[2].items():
        assert g.abs().sum() > 0, name
        assert float((packed[2][name] - g).norm() / g.norm()) < 1e-5, name

    # Without the block mask (plain causal attention over the row) the loss is another number.
    model.zero_grad(set_to_none=True)
    batch = collate(rows)
    leaky_sum, _ = causal_lm_loss_sum(
        model,
        {
            "input_ids": batch["input_ids"],
            "labels": batch["labels"],
            "attention_mask": torch.ones_like(batch["input_ids"]),
        },
    )
    assert abs(leaky_sum.item() - unpacked[0]) / unpacked[0] > 1e-4


@pytest.mark.slow
def test_train_with_packing_end_to_end(tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", seed_records(24))
    cfg = TrainConfig()
    cfg.data.data, cfg.data.cutoff_len = [str(data)], 256
    cfg.data.val_set_size = 4
    t = cfg.train
    t.output_dir, t.batch_size, t.micro_batch_size, t.max_steps, t.logging_steps = (
        str(tmp_path / "run"),
        4,
        2,
        4,
        1,
    )
    t.eval_steps, cfg.data.packing = 2, True
    with caplog.at_level(logging.INFO, logger="kaika"):
        result = train(cfg)
    assert result.global_step == 4
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("packing:"))
    assert message.startswith("packing: 20 examples into ") and "batch sizes count rows" in message
    rows = int(message.split(" into ")[1].split()[0])
    assert rows < 20
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    assert any(
        "eval_loss" in row for row in log
    )  # evaluation runs unpacked examples through the same collator
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
