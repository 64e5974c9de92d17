"""kaika's fast loss gives the plain transformers loss and gradients (fp32, relative error < 1e-5)."""

from __future__ import annotations

import pytest
import torch

from helpers import build_model, seed_records
from kaika.data.examples import encode_records
from kaika.data.prompts import load_template
from kaika.data.tokenize import IGNORE_INDEX
from kaika.modeling.attention import set_attention
from kaika.training.loss import FastLoss, LinearCrossEntropy, causal_lm_loss_sum
from kaika.training.trainer import KaikaTrainer

LEVERS = [FastLoss(True, True), FastLoss(True, False), FastLoss(False, True)]
TOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def features(tokenizer, n: int, cutoff_len: int = 96):
    feats, _ = encode_records(seed_records(n), load_template("alpaca_ja"), tokenizer, cutoff_len)
    return feats


def collate(tokenizer, feats):
    from transformers import DataCollatorForSeq2Seq

    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX)(feats)


def lora_model(base_dir, seed: int = 0):
    """A LoRA whose A and B are both random, so every LoRA gradient is non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ja_tokenizer):
    out = {}
    for arch in ("bloom", "llama"):
        out[arch] = build_model(arch, ja_tokenizer, tmp_path_factory.mktemp(arch))
    return out


@pytest.mark.parametrize(
    ("arch", "levers", "attention"),
    [("bloom", levers, "eager") for levers in LEVERS]
    + [("bloom", FastLoss(), "sdpa"), ("llama", FastLoss(), "eager")],
    ids=lambda x: x if isinstance(x, str) else f"labels{int(x.label_positions_only)}-chunks{int(x.chunked)}",
)
def test_loss_and_lora_grads_equal_full_logits(tiny, ja_tokenizer, arch, levers, attention):
    """The baseline is transformers' own: eager attention, full logits. The ``sdpa`` case is all of
    kaika's defaults at once (fused attention too) against it."""
    model = lora_model(tiny[arch]).train()
    batch = collate(ja_tokenizer, features(ja_tokenizer, 4))
    assert (batch["labels"] == IGNORE_INDEX).float().mean() > 0.2  # prompt and padding are masked

    want = model(**batch).loss  # transformers: full [B, T, V] logits, mean over supervised tokens
    want.backward()
    want_grads = lora_grads(model)
    if attention == "sdpa":
        assert set_attention(model, "sdpa") > 0

    # 7 rows per chunk: several chunks and a ragged last one.
    loss_sum, count = causal_lm_loss_sum(model, batch, levers, chunk_bytes=7 * 4 * len(ja_tokenizer))
    got = loss_sum / count
    got.backward()
    got_grads = lora_grads(model)

    assert count == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert abs(got.item() - want.item()) / want.item() < TOL
    assert want_grads.keys() == got_grads.keys() and len(want_grads) >= 4  # A and B of 2 layers or more
    for name, g in want_grads.items():
        assert g.abs().sum() > 0, name
        assert rel_err(got_grads[name], g) < TOL, name


def test_accumulation_normalises_by_the_whole_batch(tiny, ja_tokenizer):
    """Two micro-batches with unequal supervised counts: the exact loss is Σ losses / Σ counts."""
    model = lora_model(tiny["bloom"]).train()
    feats = features(ja_tokenizer, 6)
    micro = [collate(ja_tokenizer, feats[:1]), collate(ja_tokenizer, feats[1:6])]
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
    total = sum(counts)
    assert counts[0] != counts[1]

    want = sum(model(**b, num_items_in_batch=torch.tensor(total)).loss for b in micro)  # transformers' rule
    want.backward()
    want_grads = lora_grads(model)
    got = 0.0
    for b in micro:
        loss_sum, _ = causal_lm_loss_sum(model, b)
        (loss_sum / total).backward()
        got += loss_sum.item() / total
    got_grads = lora_grads(model)

    assert abs(got - want.item()) / want.item() < TOL
    for name, g in want_grads.items():
        assert rel_err(got_grads[name], g) < TOL, name
    # The mean of per-micro-batch means (alpaca-lora's old rule) is a different number here.
    with torch.no_grad():
        naive = sum(model(**b).loss for b in micro) / 2
    assert abs(naive.item() - want.item()) / want.item() > 1e-3


def test_trainer_step_matches_plain_trainer(tiny, ja_tokenizer, tmp_path):
    """The real Trainer path, accumulation 2: same logged loss and same gradients at the optimizer step."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    class Grads(TrainerCallback):
        def __init__(self):
            self.grads = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    feats = features(ja_tokenizer, 4)
    ja_tokenizer.padding_side = "right"
    head_rows: list[int] = []
    results = []
    for cls in (Trainer, KaikaTrainer):
        model = lora_model(tiny["bloom"])
        hook = (
            model.get_base_model()
            .get_output_embeddings()
            .register_forward_hook(
                lambda _m, _i, out: head_rows.append(
                    out.shape[0] if out.ndim == 2 else out.shape[0] * out.shape[1]
                )
            )
        )
        args = TrainingArguments(
            output_dir=str(tmp_path / cls.__name__),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=1,
            learning_rate=1e-3,
            max_grad_norm=0.0,
            train_sampling_strategy="sequential",
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        callback = Grads()
        trainer = cls(
            model=model,
            args=args,
            train_dataset=feats,
            data_collator=DataCollatorForSeq2Seq(
                ja_tokenizer, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX
            ),
            callbacks=[callback],
        )
        head_rows.clear()
        loss = trainer.train().training_loss
        hook.remove()
        results.append((loss, callback.grads, list(head_rows)))

    (want_loss, want_grads, plain_rows), (got_loss, got_grads, fast_rows) = results
    assert min(plain_rows) > 0  # the plain path projects every position to the vocabulary
    assert fast_rows == [0, 0]  # kaika's never runs the output layer inside the model
    assert abs(got_loss - want_loss) / want_loss < TOL
    assert want_grads and want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():
        assert rel_err(got_grads[name], g) < TOL, name


def test_linear_cross_entropy_trained_weight_and_bias():
    """The fused op against autograd through full logits, with a trained head, a bias and ignored rows."""
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    targets[[2, 7]] = IGNORE_INDEX

    want = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum") * 0.37
    want_grads = torch.autograd.grad(want, (hidden, weight, bias))
    got = LinearCrossEntropy.apply(hidden, weight, bias, targets, 4) * 0.37
    got_grads = torch.autograd.grad(got, (hidden, weight, bias))

    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert got_grads[0][[2, 7]].abs().max() == 0  # ignored rows get no gradient
