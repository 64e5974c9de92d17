"""The LoRA family: --lora-variant (DoRA, rsLoRA), --lora-init (Gaussian, PiSSA, OLoRA), LoRA+.

What each must keep: rsLoRA's scale is alpha/√r, per q/k/v slice too; LoRA+ trains B (and DoRA's
magnitudes) at lr × ratio and A at lr; a PiSSA/OLoRA run is saved as a plain LoRA that, on the
unmodified base, gives the trained model's logits, merges to the same model, resumes bit for bit
and refuses to resume where its initialisation would differ; what cannot work is refused before
anything loads. DoRA's and rsLoRA's loss equals the model's own (test_architectures), DoRA with LoRA+
trains over DDP and resumes after a kill (test_scaling), DoRA adapters are served, merged, chatted
with and exported (the shared adapters in tests/adapters.py), on 4-bit bases (test_quantized), and on
real models (test_real_models).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import seed_records, write_jsonl
from kaika.config import LoraArgs, TrainConfig
from kaika.errors import KaikaError
from kaika.modeling.lora import apply_lora, check_lora_choices


def tiny_llama(tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "lora,quantization,sharded,command,words",
    [
        (LoraArgs(variant="dora", qkv=["q", "v"]), "none", False, "train", ["dora", "--lora-qkv q,v"]),
        (LoraArgs(init="pissa", variant="dora"), "none", False, "train", ["pissa", "dora"]),
        (LoraArgs(init="olora", qkv=["v"]), "none", False, "train", ["olora", "--lora-qkv v"]),
        (LoraArgs(init="pissa"), "4bit", False, "train", ["pissa", "--quantization 4bit"]),
        (LoraArgs(init="olora"), "8bit", False, "train", ["olora", "--quantization 8bit"]),
        (LoraArgs(init="pissa"), "none", True, "train", ["pissa", "FSDP"]),
        (LoraArgs(init="pissa"), "none", False, "dpo", ["pissa", "kaika dpo"]),
        (LoraArgs(variant="dora"), "8bit", False, "train", ["dora", "--quantization 8bit"]),
        (LoraArgs(init="pissa", bias="all"), "none", False, "train", ["pissa", "--lora-bias all"]),
    ],
)
def test_what_cannot_work_is_refused_naming_both(lora, quantization, sharded, command, words):
    with pytest.raises(KaikaError) as e:
        check_lora_choices(lora, quantization, sharded, command)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize(
    "lora,quantization",
    [
        (LoraArgs(variant="dora"), "4bit"),
        (LoraArgs(variant="rslora", qkv=["q", "v"]), "none"),
        (LoraArgs(init="gaussian", qkv=["q", "v"], loraplus_lr_ratio=16), "8bit"),
        (LoraArgs(init="olora", variant="rslora", loraplus_lr_ratio=4), "none"),
    ],
)
def test_what_works_is_not_refused(lora, quantization):
    check_lora_choices(lora, quantization, sharded=False, command="train")


def test_refused_before_the_model_loads(tmp_path):
    """The combination is named, not the missing base: nothing was loaded."""
    import kaika

    data = write_jsonl(tmp_path / "d.jsonl", seed_records(4))
    with pytest.raises(KaikaError, match="--lora-init pissa with --quantization 4bit"):
        kaika.train(
            base_model=str(tmp_path / "no-such-model"), data=str(data), output_dir=str(tmp_path / "run"),
            lora_init="pissa", quantization="4bit",
        )  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_rslora_scales_by_alpha_over_root_r_per_slice_too(ja_tokenizer):
    from transformers import AutoModelForCausalLM, BloomConfig

    plain = apply_lora(tiny_llama(ja_tokenizer), LoraArgs(r=16, alpha=8, variant="rslora"))
    scales = [m.scaling["default"] for m in plain.modules() if hasattr(m, "lora_A")]
    assert scales and scales == pytest.approx([8 / math.sqrt(16)] * len(scales))
    # BLOOM's fused query_key_value, slices q and v: rank 2·4 on the module, each slice scaled as a rank-4 rsLoRA
    bloom = AutoModelForCausalLM.from_config(
        BloomConfig(vocab_size=len(ja_tokenizer), hidden_size=32, n_layer=2, n_head=4)
    )
    sliced = apply_lora(bloom, LoraArgs(r=4, alpha=8, variant="rslora", qkv=["q", "v"]))
    layers = [m for m in sliced.modules() if hasattr(m, "lora_A")]
    assert {m.r["default"] for m in layers} == {8}
    assert [m.scaling["default"] for m in layers] == pytest.approx([8 / math.sqrt(4)] * len(layers))


def test_loraplus_trains_b_and_magnitudes_at_lr_times_ratio(ja_tokenizer, tmp_path):
    from transformers import TrainingArguments

    from kaika.training.trainer import KaikaTrainer

    model = apply_lora(tiny_llama(ja_tokenizer), LoraArgs(variant="dora"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], learning_rate=1e-4)
    trainer = KaikaTrainer(model=model, args=args, train_dataset=[{"input_ids": [1]}])
    trainer.loraplus_lr_ratio = 16.0
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == {id(p) for p in names.values()}  # every trained tensor, once
    for name, p in names.items():
        want = 1e-4 if "lora_A" in name else 1.6e-3  # lora_B and lora_magnitude_vector
        assert lr_of[id(p)] == pytest.approx(want), name


# --------------------------------------------------------------------------- PiSSA / OLoRA end to end


def train_config(tmp_path, data, out: str, init: str, **train) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.base_model, cfg.model.dtype = "tiny-bloom-ja", "float32"
    cfg.data.data, cfg.data.cutoff_len = [str(data)], 128
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init = 4, 8, 0.0, init
    t = cfg.train
    t.output_dir, t.batch_size, t.micro_batch_size, t.lr, t.max_steps = str(tmp_path / out), 4, 2, 1e-2, 4
    t.save_steps, t.logging_steps = 2, 1
    for key, value in train.items():
        setattr(t, key, value)
    return cfg


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_save_a_plain_lora_that_reproduces_merges_and_resumes(init, tmp_path):
    import kaika
    from kaika.inference.generate import load_for_inference

    data = write_jsonl(tmp_path / "d.jsonl", seed_records(8, max_chars=100))
    result = kaika.train(train_config(tmp_path, data, "run", init))
    run = result.output_dir
    config = json.loads((run / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    assert (run / "lora_init" / "adapter_model.safetensors").is_file()  # the run records its initial adapter

    # A fresh, unmodified base with the saved adapter computes what the trained (residual base) model did.
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    trained = result.model.eval()
    loaded = load_for_inference(run).model
    with torch.no_grad():
        want, got = trained(ids).logits, loaded(ids).logits
        base = loaded.get_base_model()
        with loaded.disable_adapter():
            untouched = loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - untouched).abs().max() > 1e-2  # it did train

    merged = kaika.merge(run, tmp_path / "merged")
    assert merged.max_abs_diff <= merged.tolerance
    del base

    # Resumed from step 2: the same adapter bit for bit (the initialisation is recomputed identically).
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    shutil.copytree(run / "lora_init", resumed / "lora_init")
    kaika.train(train_config(tmp_path, data, "resumed", init, resume=True))
    whole, again = (
        load_file(run / "adapter_model.safetensors"),
        load_file(resumed / "adapter_model.safetensors"),
    )
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)

    # Where this machine would initialise differently, the checkpoint does not fit: refused.
    init_file = resumed / "lora_init" / "adapter_model.safetensors"
    tensors = load_file(init_file)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] * 1.001
    save_file(tensors, init_file)
    with pytest.raises(KaikaError, match="not the one in"):
        kaika.train(train_config(tmp_path, data, "resumed", init, resume=True))


def test_a_wrong_conversion_is_caught(tmp_path, monkeypatch):
    """The layer check is what stands between a wrong conversion and a saved adapter: with peft's
    rsLoRA alpha rule broken (alpha × 2 instead of × √2), the save is refused."""
    import kaika
    from kaika.modeling import initial

    real = initial.converted_config
    data = write_jsonl(tmp_path / "d.jsonl", seed_records(8, max_chars=100))
    cfg = train_config(tmp_path, data, "run", "pissa", max_steps=2, save_steps=100)
    cfg.lora.variant = "rslora"

    def tampered(peft_model, stage, init_dir, **kwargs):
        real_save(peft_model, stage, init_dir, **kwargs)
        path = stage / "adapter_config.json"
        config = json.loads(path.read_text())
        config["lora_alpha"] *= 2**0.5  # the scale of the whole converted adapter off by √2
        path.write_text(json.dumps(config))

    real_save = initial.save_converted
    monkeypatch.setattr("kaika.training.saving.save_converted", tampered)
    monkeypatch.setattr(
        initial, "converted_config", lambda c: {**real(c), "lora_alpha": real(c)["lora_alpha"] * 2**0.5}
    )
    with pytest.raises(KaikaError, match="the conversion of the pissa adapter is wrong"):
        kaika.train(cfg)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_a_resume_must_repeat_the_lora_settings(tmp_path):
    """Another LoRA+ ratio (the optimizer's groups), variant or init than the checkpoints were trained
    with is refused before they load, naming what changed."""
    import kaika

    data = write_jsonl(tmp_path / "d.jsonl", seed_records(8, max_chars=100))
    cfg = train_config(tmp_path, data, "run", "default", max_steps=2, save_steps=1)
    cfg.lora.loraplus_lr_ratio = 4.0
    kaika.train(cfg)
    for field, value, said in (
        ("loraplus_lr_ratio", 8.0, "loraplus_lr_ratio: 4.0, now 8.0"),
        ("variant", "dora", "variant: 'lora', now 'dora'"),
        ("init", "pissa", "init: 'default', now 'pissa'"),
    ):
        again = train_config(tmp_path, data, "run", "default", max_steps=3, save_steps=1, resume=True)
        again.lora.loraplus_lr_ratio = 4.0
        setattr(again.lora, field, value)
        with pytest.raises(KaikaError, match="other LoRA settings") as e:
            kaika.train(again)
        assert said in str(e.value)
