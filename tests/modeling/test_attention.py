"""kaika's fused BLOOM attention (SDPA with ALiBi as an additive bias) against transformers' eager one.

Tolerance: the eager path forms the softmax in float32 and SDPA keeps running maxima per block,
so the two round differently: ~1e-7 relative in float32, the fp32 softmax's own error in float64.
A wrong bias (ALiBi per query instead of per key, a missing mask, a head order mixed up) moves
logits by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BloomConfig, BloomForCausalLM

from kaika.config import ModelArgs
from kaika.data.packing import PackedCollator, enable_packed_attention, pack_documents
from kaika.errors import KaikaError
from kaika.modeling.attention import set_attention
from kaika.modeling.load import load_model

VOCAB = 97


def tiny_bloom(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=3, n_head=4, initializer_range=0.3)
    model = BloomForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], init_lora_weights=False)
    return get_peft_model(model, lora)


def batch(padding_side: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    for row, n in ((0, 4), (2, 7)):  # pad lengths; row 1 has none
        if padding_side == "right":
            mask[row, -n:] = 0
        else:
            mask[row, :n] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_logits_grads(model, inputs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]
    return out.loss.detach(), out.logits.detach(), grads


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = b.abs().max().clamp(min=1e-12)
    assert ((a - b).abs().max() / scale).item() < rel


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sdpa_equals_eager_loss_logits_and_lora_gradients(padding_side):
    model = tiny_bloom()
    model.train()
    inputs = batch(padding_side)
    keep = inputs["attention_mask"].bool()  # logits at pad positions are never used
    assert set_attention(model, "eager") == 3
    loss_e, logits_e, grads_e = loss_logits_grads(model, inputs)
    assert set_attention(model, "sdpa") == 3
    loss_s, logits_s, grads_s = loss_logits_grads(model, inputs)
    assert_close(loss_s, loss_e, 1e-5)
    assert_close(logits_s[keep], logits_e[keep], 1e-5)
    assert len(grads_s) == 6
    for gs, ge in zip(grads_s, grads_e, strict=True):
        assert_close(gs, ge, 1e-5)


def test_sdpa_keeps_packed_rows_apart_like_eager():
    docs = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21]]
    rows = pack_documents(docs, cutoff_len=8, eos_id=2, pad_id=3)
    inputs = PackedCollator("document")(rows)
    model = tiny_bloom(seed=3)
    enable_packed_attention(model)
    set_attention(model, "eager")
    loss_e, logits_e, grads_e = loss_logits_grads(model, dict(inputs))
    set_attention(model, "sdpa")
    loss_s, logits_s, grads_s = loss_logits_grads(model, dict(inputs))
    assert_close(loss_s, loss_e, 1e-5)
    assert_close(logits_s, logits_e, 1e-5)
    for gs, ge in zip(grads_s, grads_e, strict=True):
        assert_close(gs, ge, 1e-5)
    # And a packed segment sees nothing of its neighbours: the second document of row 0 alone
    # gives the same logits as inside the packed row.
    alone = model(input_ids=torch.tensor([[10, 11, 12, 2]])).logits[0]
    assert_close(logits_s[0, 6:8], alone[:2], 1e-5)


def test_sdpa_generation_with_a_kv_cache_equals_eager():
    model = tiny_bloom(seed=5).eval()
    prompt = torch.tensor([[4, 9, 16, 25, 36, 49]])
    out = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            set_attention(model, impl)
            gen = model.generate(
                input_ids=prompt,
                max_new_tokens=12,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            out[impl] = (gen.sequences, torch.stack(gen.logits))
    assert torch.equal(out["sdpa"][0], out["eager"][0])
    assert_close(out["sdpa"][1], out["eager"][1], 1e-5)


def test_every_layer_shares_one_bias_per_forward(monkeypatch):
    import torch.nn.functional as F

    masks = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs["attn_mask"])
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_bloom()
    set_attention(model, "sdpa")
    inputs = batch("right")
    model(**inputs).loss.backward()
    model(**inputs)
    assert len(masks) == 6
    assert all(m is masks[0] for m in masks[:3]) and all(m is masks[3] for m in masks[3:])
    assert masks[0].shape == (3, 4, 11, 11)


def test_output_attentions_falls_back_to_the_eager_probabilities():
    model = tiny_bloom().eval()
    set_attention(model, "sdpa")
    out = model(**batch("right"), output_attentions=True)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (3, 4, 11, 11)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(3, 4, 11))


def test_load_model_sets_the_attention_and_rejects_unknown_names(tmp_path):
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).save_pretrained(
        tmp_path
    )
    sdpa = load_model(ModelArgs(base_model=str(tmp_path)))
    eager = load_model(ModelArgs(base_model=str(tmp_path), attention="eager"))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert sdpa.transformer.h[0].self_attention.forward.__func__.__name__ == "_sdpa_forward"
    assert eager.transformer.h[0].self_attention.forward.__func__.__name__ == "forward"
    with torch.no_grad():
        assert_close(sdpa(ids).logits, eager(ids).logits, 1e-5)
    with pytest.raises(KaikaError, match="attention: 'flash' is not one of sdpa, eager"):
        load_model(ModelArgs(base_model=str(tmp_path), attention="flash"))


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-7), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_fused_gelu_is_bloom_s_gelu_forward_and_backward(dtype, rel):
    """BLOOM's own GELU (transformers' GeLUFunction: its formula forward, its derivative backward)
    against the fused kernel kaika puts in its place, on the same inputs and upstream gradients."""
    from transformers.models.bloom.modeling_bloom import BloomGelu

    from kaika.modeling.attention import FusedGelu

    torch.manual_seed(0)
    x = (torch.randn(64, 256, dtype=torch.float64) * 3).to(dtype)
    g = torch.randn_like(x)
    outs = []
    for gelu in (BloomGelu(), FusedGelu()):
        xi = x.clone().requires_grad_()
        y = gelu(xi)
        y.backward(g)
        outs.append((y.detach().double(), xi.grad.double()))
    (y_ref, dx_ref), (y, dx) = outs
    assert_close(y, y_ref, rel)
    assert_close(dx, dx_ref, rel)


def test_load_model_fuses_bloom_s_gelu_and_the_logits_stay(tmp_path):
    from kaika.modeling.attention import FusedGelu

    torch.manual_seed(0)
    plain = BloomForCausalLM(
        BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3)
    )
    plain.save_pretrained(tmp_path)
    model = load_model(ModelArgs(base_model=str(tmp_path), attention="eager", dtype="float32"))
    assert all(isinstance(block.mlp.gelu_impl, FusedGelu) for block in model.transformer.h)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert_close(model(ids).logits, plain.eval()(ids).logits, 1e-6)
