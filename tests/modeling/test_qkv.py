"""Fused-QKV LoRA slices (--lora-qkv) against a reference model whose q, k and v are separate Linears."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import build_model, seed_records, write_jsonl
from kaika.cli import build_parser
from kaika.cli.options import namespace_overrides
from kaika.config import LoraArgs, TrainConfig, resolve_train_config
from kaika.errors import KaikaError
from kaika.modeling.lora import apply_lora
from kaika.modeling.qkv import fused_alpha, parse_slices
from kaika.training.sft import train

HIDDEN, HEADS, VOCAB = 32, 4, 97
FUSED_NAME = {"bloom": "query_key_value", "gpt_neox": "query_key_value", "gpt2": "c_attn"}


def tiny(kind: str):
    from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config, GPTNeoXConfig

    config = {
        "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=HEADS),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=64),
        "gpt_neox": lambda: GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval()


def slice_rows(kind: str, s: int) -> torch.Tensor:
    """Output rows of slice s (0 q, 1 k, 2 v) in the fused projection, in the order the separate
    projection produces them — written from the attention code, independently of kaika.modeling.qkv."""
    if kind == "gpt2":  # c_attn(x).split(embed_dim): [Q | K | V]
        return torch.arange(s * HIDDEN, (s + 1) * HIDDEN)
    hd = HIDDEN // HEADS  # view(..., heads, 3, head_dim): [q0 k0 v0 q1 k1 v1 …]
    return torch.cat([torch.arange(h * 3 * hd + s * hd, h * 3 * hd + (s + 1) * hd) for h in range(HEADS)])


class SplitQKV(nn.Module):
    """q, k and v as three Linears whose outputs are put back in the fused layout."""

    def __init__(self, fused: nn.Module, kind: str):
        super().__init__()
        weight = fused.weight.detach()
        weight = weight.T if kind == "gpt2" else weight  # Conv1D stores (in, out)
        self.perm = torch.argsort(torch.cat([slice_rows(kind, s) for s in range(3)]))
        for s, name in enumerate("qkv"):
            rows = slice_rows(kind, s)
            lin = nn.Linear(HIDDEN, HIDDEN, dtype=weight.dtype)
            lin.weight.data.copy_(weight[rows])
            lin.bias.data.copy_(fused.bias.detach()[rows])
            self.add_module(name, lin)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)[..., self.perm]


def reference_of(model, kind: str):
    import copy

    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if name.endswith("." + FUSED_NAME[kind]):
            parent, child = name.rsplit(".", 1)
            setattr(ref.get_submodule(parent), child, SplitQKV(module, kind))
    return ref


def lora_pairs(fused_peft, ref_peft, kind: str):
    """(fused LoRA layer, {slice: reference LoRA layer}) per attention block, in order."""
    from peft.tuners.lora import LoraLayer

    fused = [
        m for n, m in fused_peft.named_modules() if isinstance(m, LoraLayer) and n.endswith(FUSED_NAME[kind])
    ]
    refs = {}
    for n, m in ref_peft.named_modules():
        if isinstance(m, LoraLayer):
            block, s = n.rsplit(".", 1)
            refs.setdefault(block, {})[s] = m
    assert len(fused) == len(refs) == 2
    return list(zip(fused, refs.values(), strict=True))


def fused_from_separate(kind: str, slices, ref: dict, r: int):
    """The fused LoRA's A (n·r, in) and B (out, n·r) holding the separate LoRAs' values."""
    a = torch.cat([ref[s].lora_A["default"].weight.detach() for s in slices])
    b = torch.zeros(3 * HIDDEN, len(slices) * r, dtype=a.dtype)
    for j, s in enumerate(slices):
        b[slice_rows(kind, "qkv".index(s)), j * r : (j + 1) * r] = ref[s].lora_B["default"].weight.detach()
    return a, b


CASES = [("bloom", "q,v"), ("bloom", "q,k,v"), ("gpt2", "q,v"), ("gpt_neox", "k,v")]


@pytest.mark.parametrize("kind,qkv", CASES)
def test_slices_match_separate_loras_exactly(kind, qkv):
    from peft import LoraConfig, get_peft_model

    r, alpha = 4, 8
    slices = tuple(qkv.split(","))
    model = tiny(kind)
    ref = get_peft_model(
        reference_of(model, kind),
        LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(slices)),
    ).double()
    fused = apply_lora(model, LoraArgs(r=r, alpha=alpha, dropout=0.0, qkv=[qkv])).double()

    # Same values in both: nonzero B so that A gets gradients too.
    torch.manual_seed(1)
    pairs = lora_pairs(fused, ref, kind)
    for layer, refs in pairs:
        assert layer.scaling["default"] == pytest.approx(alpha / r)
        for s in slices:
            refs[s].lora_A["default"].weight.data.normal_(0, 0.2)
            refs[s].lora_B["default"].weight.data.normal_(0, 0.2)
        a, b = fused_from_separate(kind, slices, refs, r)
        layer.lora_A["default"].weight.data.copy_(a)
        layer.lora_B["default"].weight.data.copy_(b)

    opts = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        for m in (fused, ref)
    ]
    for step in range(4):
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(step))
        outs = [m(input_ids=ids, labels=ids) for m in (fused, ref)]
        torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=0, atol=1e-10)
        for out, opt in zip(outs, opts, strict=True):
            opt.zero_grad()
            out.loss.backward()
        for layer, refs in pairs:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            ref_a_grad = torch.cat([refs[s].lora_A["default"].weight.grad for s in slices])
            torch.testing.assert_close(a.grad, ref_a_grad, rtol=0, atol=1e-10)
            # B's gradient is the separate Bs' gradients in their blocks, and exactly zero elsewhere.
            expect = torch.zeros_like(b.grad)
            for j, s in enumerate(slices):
                expect[slice_rows(kind, "qkv".index(s)), j * r : (j + 1) * r] = (
                    refs[s].lora_B["default"].weight.grad
                )
            torch.testing.assert_close(b.grad, expect, rtol=0, atol=1e-10)
            assert (b.grad[expect == 0] == 0).all()
        for opt in opts:
            opt.step()
    # After the steps the values still agree and every entry outside the blocks is exactly zero.
    for layer, refs in pairs:
        a, b = fused_from_separate(kind, slices, refs, r)
        torch.testing.assert_close(layer.lora_A["default"].weight.detach(), a, rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.lora_B["default"].weight.detach(), b, rtol=0, atol=1e-10)
        assert (layer.lora_B["default"].weight[b == 0] == 0).all()


def test_fused_default_is_one_shared_lora():
    model = apply_lora(tiny("bloom"), LoraArgs(r=4, alpha=8, dropout=0.0))
    layer = next(
        m for n, m in model.named_modules() if n.endswith("query_key_value") and hasattr(m, "lora_B")
    )
    assert layer.lora_B["default"].weight.shape == (3 * HIDDEN, 4)
    assert model.peft_config["default"].rank_pattern == {}


def test_slices_with_other_targets_keep_their_rank():
    model = apply_lora(tiny("bloom"), LoraArgs(r=4, alpha=8, target=["all-linear"], qkv=["q,k,v"]))
    assert model.peft_config["default"].rank_pattern == {"query_key_value": 12}
    layers = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if hasattr(m, "lora_B")}
    assert set(layers) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    for name, layer in layers.items():
        assert layer.r["default"] == (12 if name == "query_key_value" else 4)
        assert layer.scaling["default"] == pytest.approx(8 / 4)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_alpha_gives_each_slice_the_scaling_of_a_rank_r_lora(use_rslora):
    from peft import LoraConfig, get_peft_model

    r, alpha, n = 4, 8, 2
    expected = alpha / (r**0.5 if use_rslora else r)
    config = LoraConfig(
        r=r * n,
        lora_alpha=fused_alpha(alpha, n, use_rslora),
        use_rslora=use_rslora,
        target_modules=["query_key_value"],
    )
    model = get_peft_model(tiny("bloom"), config)
    scalings = [m.scaling["default"] for n_, m in model.named_modules() if n_.endswith("query_key_value")]
    assert scalings and all(s == pytest.approx(expected) for s in scalings)


def test_slice_lists_and_errors():
    assert parse_slices(["fused"]) is None and parse_slices([]) is None
    assert parse_slices(["v,q"]) == ("q", "v") and parse_slices(["K", "q"]) == ("q", "k")
    for bad, message in (
        (["q,x"], "unknown slice"),
        (["fused,q"], "stands alone"),
        (["q,q"], "listed twice"),
    ):
        with pytest.raises(KaikaError, match=message):
            parse_slices(bad)
    with pytest.raises(KaikaError, match="not among the LoRA targets"):
        apply_lora(tiny("bloom"), LoraArgs(target=["dense"], qkv=["q,v"]))
    ns = build_parser().parse_args(["train", "--lora-qkv", "q,v"])
    assert resolve_train_config(None, namespace_overrides(ns)).lora.qkv == ["q,v"]


def test_model_without_fused_qkv_is_a_clear_error(tmp_path, ja_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_model("llama", ja_tokenizer, tmp_path / "llama"))
    with pytest.raises(KaikaError, match=r"'llama' has no fused QKV projection.*--lora-target"):
        apply_lora(model, LoraArgs(qkv=["q,v"]))


def train_config(tmp_path, base: str, records, **train_kw) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.base_model, cfg.model.dtype = base, "float32"  # compared at 1e-5 (auto may be bf16)
    cfg.data.data = [str(write_jsonl(tmp_path / "train.jsonl", records))]
    cfg.data.cutoff_len = 64
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.qkv = 8, 16, 0.05, ["q,v"]
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.batch_size = cfg.train.micro_batch_size = len(records)
    cfg.train.lr, cfg.train.weight_decay, cfg.train.logging_steps = 3e-2, 0.1, 1
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def check_blocks(adapter_dir, r: int) -> None:
    """In the saved adapter: k rows and off-block entries exactly zero, q and v blocks trained."""
    from safetensors.torch import load_file

    hd = 64 // 4  # helpers.build_model("bloom"): hidden 64, 4 heads
    rows = {
        s: torch.cat([torch.arange(h * 3 * hd + i * hd, h * 3 * hd + (i + 1) * hd) for h in range(4)])
        for i, s in enumerate("qkv")
    }
    bs = {
        k: v
        for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()
        if "query_key_value.lora_B" in k
    }
    assert len(bs) == 2
    for b in bs.values():
        assert b.shape == (3 * 64, 2 * r)
        assert (b[rows["k"]] == 0).all()
        assert (b[rows["q"], r:] == 0).all() and (b[rows["v"], :r] == 0).all()
        assert (b[rows["q"], :r] != 0).any() and (b[rows["v"], r:] != 0).any()


def test_train_save_reload_merge_and_resume(tmp_path, ja_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = build_model("bloom", ja_tokenizer, tmp_path / "base")
    cfg = train_config(tmp_path, str(base), seed_records(max_chars=60)[:4], max_steps=4, save_steps=2)
    result = train(cfg)  # save_and_verify runs inside
    out = result.output_dir
    check_blocks(out, r=8)
    # Only query_key_value is adapted, so r and lora_alpha themselves carry rank 2r and alpha 2·alpha.
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 32)
    assert adapter_config["rank_pattern"] == adapter_config["alpha_pattern"] == {}
    assert "- q,v" in (out / "kaika_config.yaml").read_text()

    # Plain peft, no kaika code: reload, then merge.
    ids = torch.tensor([ja_tokenizer.encode("### 指示:\n吾輩は猫である")])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    expected = result.model.eval()(ids).logits
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    merged = reloaded.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)

    # --resume rebuilds the model, so the mask is registered again before the checkpoint loads.
    cfg.train.max_steps, cfg.train.resume = 8, True
    resumed = train(cfg)
    assert resumed.global_step == 8
    check_blocks(out, r=8)
