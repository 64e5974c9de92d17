"""kaika's training loss is each architecture's own loss: a matrix over tiny configs of 14 of them.

For every architecture: kaika's chunked loss and its LoRA gradients equal the model's own
``model(**batch).loss`` (full logits, whatever the model does after its output layer), the output
layer probe accepts it, ``--lora-target auto`` picks its attention projections, and the BLOOM-only
attention path leaves it alone. Models that transform their logits get logits large enough for the
transform to matter, and the test shows that leaving the transform out would change the loss.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from helpers import seed_records
from kaika.config import LoraArgs
from kaika.data.examples import encode_records
from kaika.data.prompts import load_template
from kaika.data.tokenize import pad_batch
from kaika.modeling.attention import set_attention
from kaika.modeling.lora import adaptable_names, apply_lora, resolve_targets
from kaika.training.loss import (
    FastLoss,
    LogitTransform,
    causal_lm_loss_sum,
    logit_transform,
    probe_output_layer,
)

COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
# model type → (config fields beyond COMMON, the LoRA targets auto must pick, the logit transform)
ARCHS = {
    "bloom": ({"n_layer": 2, "n_head": 4, "hidden_size": 32}, ["query_key_value"], "none"),
    "llama": ({}, ["q_proj", "v_proj"], "none"),
    "mistral": ({}, ["q_proj", "v_proj"], "none"),
    "qwen2": ({}, ["q_proj", "v_proj"], "none"),
    "qwen3": ({"head_dim": 8}, ["q_proj", "v_proj"], "none"),
    "gemma": ({"head_dim": 8}, ["q_proj", "v_proj"], "none"),
    "gemma2": (
        {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 5.0},
        ["q_proj", "v_proj"],
        "softcap 5",
    ),
    "gemma3_text": (
        {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 5.0},
        ["q_proj", "v_proj"],
        "softcap 5",
    ),
    "cohere": ({"logit_scale": 0.25}, ["q_proj", "v_proj"], "scale 0.25"),
    "granite": ({"logits_scaling": 4.0}, ["q_proj", "v_proj"], "divide 4"),
    "gpt2": (
        {
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 256,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
        ["c_attn"],
        "none",
    ),  # dropout off: two forwards, one computation
    "gpt_neox": ({"num_key_value_heads": None}, ["query_key_value"], "none"),
    "phi3": ({}, ["qkv_proj"], "none"),
    "olmo2": ({}, ["q_proj", "v_proj"], "none"),
}
TOL = 1e-5


def tiny_base(model_type: str, tokenizer, dtype=torch.float32):
    """A 2-layer model of ``model_type``, its logits large where it transforms them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra, _, transform = ARCHS[model_type]
    fields = {**COMMON, **extra} if model_type not in ("bloom", "gpt2") else dict(extra)
    fields = {k: v for k, v in fields.items() if v is not None}
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **ids, **fields
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if transform != "none":  # logits of tens: soft-capping at 5 and the scalings change them a lot
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0 / (1 if model_type != "cohere" else 0.25))
    return model


def tiny(model_type: str, tokenizer, dtype=torch.float32, variant: str = "lora"):
    """A 2-layer model of ``model_type`` with LoRA (random A and B: every LoRA gradient is non-zero;
    DoRA's magnitudes moved off the weight norms they start at)."""
    args = LoraArgs(r=4, alpha=8, dropout=0.0, variant=variant)
    lora = apply_lora(tiny_base(model_type, tokenizer, dtype), args)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return lora.train()


def batch(tokenizer):
    feats, _ = encode_records(seed_records(4, max_chars=160), load_template("alpaca_ja"), tokenizer, 96)
    return pad_batch(feats, tokenizer.pad_token_id, "right", 8)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


CASES = [(m, "lora") for m in ARCHS] + [
    (m, v) for m in ("bloom", "llama", "gemma3_text", "gpt2") for v in ("dora", "rslora")
]


@pytest.mark.parametrize("model_type,variant", CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_chunked_loss_is_the_model_s_own_loss(model_type, variant, ja_tokenizer):
    """For DoRA too: its magnitudes, and the column norms it recomputes at every forward, are upstream
    of the hidden states the chunked loss differentiates, so their gradients must match as well."""
    model = tiny(model_type, ja_tokenizer, variant=variant)
    inputs = batch(ja_tokenizer)
    want = model(**inputs).loss  # transformers: the model's own logits and loss
    want.backward()
    want_grads = grads(model)

    transform = logit_transform(model)
    assert repr(transform) == ARCHS[model_type][2]
    assert probe_output_layer(model, transform) is None
    # 5 rows per chunk: several chunks and a ragged last one (the transformed path makes them smaller).
    loss_sum, count = causal_lm_loss_sum(model, inputs, FastLoss(), chunk_bytes=20 * 4 * len(ja_tokenizer))
    got = loss_sum / count
    got.backward()
    got_grads = grads(model)

    assert abs(got.item() - want.item()) / want.item() < TOL
    assert want_grads.keys() == got_grads.keys() and len(want_grads) >= 4
    assert any("lora_magnitude_vector" in n for n in want_grads) == (variant == "dora")
    for name, g in want_grads.items():
        assert g.abs().sum() > 0, name
        assert rel(got_grads[name], g) < TOL, name
    if transform:  # the transform matters here: without it, another objective
        plain, _ = causal_lm_loss_sum(model, inputs, FastLoss(), transform=LogitTransform([]))
        assert abs(plain.item() / count.item() - want.item()) / want.item() > 0.05


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "cohere"])
def test_bf16_loss_within_bf16_rounding(model_type, ja_tokenizer):
    model = tiny(model_type, ja_tokenizer, torch.bfloat16)
    inputs = batch(ja_tokenizer)
    want = model(**inputs).loss
    want.backward()
    want_grads = grads(model)
    assert probe_output_layer(model) is None
    loss_sum, count = causal_lm_loss_sum(model, inputs, FastLoss())
    got = loss_sum / count
    got.backward()
    got_grads = grads(model)
    assert abs(got.item() - want.item()) / want.item() < 2e-2
    for name, g in want_grads.items():
        assert rel(got_grads[name], g) < 5e-2, name


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_auto_targets_and_the_bloom_attention_path(model_type, ja_tokenizer):
    base = tiny_base(model_type, ja_tokenizer)
    names = adaptable_names(base)
    targets = resolve_targets(LoraArgs(), base.config.model_type, names)
    assert targets == ARCHS[model_type][1] and set(targets) <= names
    model = apply_lora(base, LoraArgs())
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == set(targets)
    if model_type == "bloom":
        assert set_attention(model, "sdpa") == 2
    else:  # not BLOOM: nothing is replaced, the forward is transformers' own
        forwards = [m.forward for m in model.modules()]
        assert set_attention(model, "sdpa") == 0
        assert [m.forward for m in model.modules()] == forwards


def test_an_unknown_logit_transform_falls_back_to_the_model_s_own_loss(ja_tokenizer, caplog):
    """A model whose forward changes its logits in a way kaika does not know: the probe sees it, and
    the Trainer trains with the model's own loss and says so."""
    from transformers import TrainingArguments

    from kaika.training.trainer import KaikaTrainer

    model = tiny("llama", ja_tokenizer)
    inner = model.get_base_model()
    original = inner.forward

    @functools.wraps(original)  # keeps the signature: it takes logits_to_keep like the original
    def forward(*args, **kwargs):  # a new architecture: logits * 3 after the output layer
        out = original(*args, **kwargs)
        out.logits = out.logits * 3
        return out

    inner.forward = forward
    assert "not its output layer's" in probe_output_layer(model)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], per_device_train_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="kaika"):
        trainer = KaikaTrainer(model=model, args=args, train_dataset=[{"input_ids": [1], "labels": [1]}])
    assert trainer.fast_loss is None
    assert "loss: the model's own, with full logits" in caplog.text
    inputs = batch(ja_tokenizer)
    assert trainer.compute_loss(model, inputs).item() == pytest.approx(model(**inputs).loss.item(), rel=1e-6)
