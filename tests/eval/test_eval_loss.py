"""``kaika eval loss`` on a plain model: exact supervised-token loss, batch-size independence.

Base vs adapter on a trained run is in test_eval_e2e.py."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import build_model, seed_records, write_jsonl
from kaika.data.prompts import load_template
from kaika.data.tokenize import IGNORE_INDEX, encode_example
from kaika.errors import KaikaError
from kaika.eval.loss import eval_loss


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, ja_tokenizer):
    return build_model("bloom", ja_tokenizer, tmp_path_factory.mktemp("eval-loss") / "base")


@torch.no_grad()
def hand_loss(model_dir, tokenizer, records, cutoff_len: int) -> tuple[float, int]:
    """Token by token: feed each prefix alone, take -log p(next token) where the label is supervised."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    template = load_template("alpaca_ja")  # the default template a plain model dir is evaluated with
    nll, count = 0.0, 0
    for rec in records:
        enc = encode_example(
            tokenizer, template.format(rec["instruction"], rec["input"]), rec["output"], cutoff_len
        )
        for t in range(1, len(enc.input_ids)):
            if enc.labels[t] == IGNORE_INDEX:
                continue
            logits = model(torch.tensor([enc.input_ids[:t]])).logits[0, -1]
            nll -= torch.log_softmax(logits.double(), -1)[enc.labels[t]].item()
            count += 1
    return nll / count, count


def test_loss_equals_hand_computation(tmp_path, base_dir, ja_tokenizer):
    records = seed_records(max_chars=80)[5:7]
    data = write_jsonl(tmp_path / "heldout.jsonl", records)
    got = eval_loss(base_dir, str(data), batch_size=2, cutoff_len=100, dtype="float32")
    assert list(got) == ["model"]
    expected, count = hand_loss(base_dir, ja_tokenizer, records, cutoff_len=100)
    assert got["model"].tokens == count
    assert got["model"].loss == pytest.approx(expected, rel=1e-5)
    assert got["model"].perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_loss_does_not_depend_on_batch_size(tmp_path, base_dir):
    # Lengths differ a lot, so a mean of per-batch means would differ between batchings.
    records = seed_records(max_chars=200)[:7]
    data = str(write_jsonl(tmp_path / "heldout.jsonl", records))
    one, three, seven = (eval_loss(base_dir, data, batch_size=b, dtype="float32")["model"] for b in (1, 3, 7))
    assert one.tokens == three.tokens == seven.tokens
    assert three.loss == pytest.approx(one.loss, rel=1e-6)
    assert seven.loss == pytest.approx(one.loss, rel=1e-6)


def test_full_logits_path_gives_the_same_loss(tmp_path, base_dir, monkeypatch):
    """Models without ``logits_to_keep`` get full logits, then the same positions are scored."""
    import kaika.training.loss as loss_mod  # the one scoring function eval loss uses

    data = str(write_jsonl(tmp_path / "heldout.jsonl", seed_records(max_chars=200)[:4]))
    kept = eval_loss(base_dir, data, batch_size=2)["model"]
    monkeypatch.setattr(loss_mod, "_accepts_logits_to_keep", lambda model: False)
    full = eval_loss(base_dir, data, batch_size=2)["model"]
    assert full.tokens == kept.tokens
    assert full.loss == pytest.approx(kept.loss, rel=1e-6)


def test_bad_input_is_a_clear_error(tmp_path, base_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n', encoding="utf-8")
    with pytest.raises(KaikaError, match=r"bad.jsonl, line 1: field 'output': missing"):
        eval_loss(base_dir, str(bad))
    with pytest.raises(KaikaError, match="no supervised token"):
        eval_loss(base_dir, str(write_jsonl(tmp_path / "long.jsonl", seed_records(3))), cutoff_len=4)
