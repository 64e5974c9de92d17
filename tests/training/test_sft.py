"""Train → save → reload with plain peft → generate, on tiny models built here (nothing downloaded)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import build_model, seed_records, write_jsonl
from kaika.config import GenerateArgs, TrainConfig
from kaika.errors import KaikaError
from kaika.inference.generate import generate, load_for_inference
from kaika.training.sft import train

RUN_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "kaika_config.yaml",
    "template.json",
    "trainer_log.jsonl",
    "loss_curve.png",
    "data_report.json",
]


def make_config(tmp_path, base_model: str, records, **train_kw) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.base_model = base_model
    cfg.model.dtype = "float32"  # these tests compare logits at float32 precision (auto may be bf16)
    cfg.data.data = [str(write_jsonl(tmp_path / "train.jsonl", records))]
    cfg.data.cutoff_len = 64
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 16, 32, 0.0
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.batch_size = cfg.train.micro_batch_size = len(records)
    cfg.train.lr, cfg.train.max_steps, cfg.train.logging_steps, cfg.train.save_steps = 3e-2, 60, 10, 1000
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


@torch.no_grad()
def supervised_loss(model, tokenizer, template, records) -> float:
    from kaika.data.examples import encode_records

    feats, _ = encode_records(records, template, tokenizer, cutoff_len=64)
    losses = [
        model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss
        for f in feats
    ]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_train_reload_generate(tmp_path, ja_tokenizer, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = build_model(arch, ja_tokenizer, tmp_path / "base")
    records = seed_records(max_chars=60)[2:4]  # two short records the model can learn by heart
    result = train(make_config(tmp_path, str(base_dir), records))
    out = result.output_dir
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert result.global_step == 60

    # Plain peft, no kaika code: the adapter on disk reproduces the trained model.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    ids = torch.tensor([ja_tokenizer.encode("### 指示:\n吾輩は猫である")])
    torch.testing.assert_close(reloaded(ids).logits, result.model.eval()(ids).logits, rtol=1e-5, atol=1e-5)

    # Training did something measurable: loss on the training set fell by more than a third.
    loaded = load_for_inference(out)
    base_loss = supervised_loss(
        AutoModelForCausalLM.from_pretrained(base_dir), ja_tokenizer, loaded.template, records
    )
    tuned_loss = supervised_loss(loaded.model, loaded.tokenizer, loaded.template, records)
    assert tuned_loss < 0.66 * base_loss, (base_loss, tuned_loss)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    assert losses[-1] < losses[0] and all(row.get("tokens_per_s", 1) > 0 for row in log)

    # Greedy generation reproduces a learned answer and stops at EOS well before max_new_tokens.
    args = GenerateArgs(max_new_tokens=48)
    gens = [generate(loaded, r["instruction"], r["input"], args) for r in records]
    assert any(
        g.text == r["output"] and g.stopped and g.new_tokens < 48 for g, r in zip(gens, records, strict=True)
    )
    base = load_for_inference(out, base_only=True)
    assert generate(base, records[0]["instruction"], "", args).text != gens[0].text


def test_builtin_base_and_eval_split(tmp_path):
    cfg = make_config(tmp_path, "tiny-bloom-ja", seed_records(12, max_chars=120), max_steps=4, eval_steps=2)
    cfg.data.val_set_size = 4
    cfg.train.batch_size = cfg.train.micro_batch_size = 4
    result = train(cfg)
    assert result.eval_loss is not None and result.data_report.records == 8
    log = [json.loads(line) for line in (result.output_dir / "trainer_log.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in row for row in log) >= 2


def test_output_dir_is_protected(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    cfg = make_config(tmp_path, "tiny-bloom-ja", seed_records(2))
    with pytest.raises(KaikaError, match="not empty"):
        train(cfg)
    cfg.train.overwrite = True
    with pytest.raises(KaikaError, match="only replaces a directory kaika wrote.*notes.txt"):
        train(cfg)
    cfg.train.overwrite, cfg.train.resume = False, True
    with pytest.raises(KaikaError, match="no checkpoint"):
        train(cfg)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_empty_adapter_is_refused(tmp_path):
    # A learning rate so small that float32 rounds every update to exactly zero: training "ran" but
    # the adapter is still its initialisation (B = 0). (lr 0 itself is refused with the config.)
    cfg = make_config(tmp_path, "tiny-bloom-ja", seed_records(2, max_chars=80), max_steps=1, lr=1e-47)
    with pytest.raises(KaikaError, match="every LoRA B matrix is zero"):
        train(cfg)


def test_quantization_without_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    cfg = make_config(tmp_path, "tiny-bloom-ja", seed_records(2, max_chars=80))
    cfg.model.quantization = "8bit"
    with pytest.raises(
        KaikaError, match=r"--quantization 8bit needs the quantization extra.*kaika\[quantization\]"
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_gguf_base_model(tmp_path, ja_tokenizer):
    from kaika.inference.export import export

    # A GGUF file as llama.cpp users have them: kaika export's, of a tiny BLOOM
    gguf_path = export(build_model("bloom", ja_tokenizer, tmp_path / "base"), tmp_path / "gguf").gguf_file
    records = seed_records(max_chars=60)[:2]
    result = train(make_config(tmp_path, str(gguf_path), records, max_steps=2))
    assert (result.output_dir / "adapter_model.safetensors").is_file() and result.global_step == 2
    loaded = load_for_inference(result.output_dir)
    assert loaded.model_args.base_model == str(gguf_path)
    ids = torch.tensor([ja_tokenizer.encode("吾輩は猫")])
    torch.testing.assert_close(loaded.model(ids).logits, result.model.eval()(ids).logits)


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    cfg = make_config(
        tmp_path, "tiny-bloom-ja", seed_records(4, max_chars=100), max_steps=4, save_steps=2, logging_steps=1
    )
    first = train(cfg)
    assert sorted(p.name for p in (first.output_dir / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "lora.json",  # the LoRA settings a resume must repeat
    ]
    cfg.train.max_steps, cfg.train.resume = 6, True
    resumed = train(cfg)
    assert resumed.global_step == 6 and (resumed.output_dir / "checkpoints" / "checkpoint-6").is_dir()
    steps = [
        json.loads(line)["step"]
        for line in (resumed.output_dir / "trainer_log.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps[-1] == 6


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    records = seed_records(4, max_chars=100)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    plain = train(make_config(tmp_path / "a", "tiny-bloom-ja", records, max_steps=2))
    ckpt_cfg = make_config(tmp_path / "b", "tiny-bloom-ja", records, max_steps=2, gradient_checkpointing=True)
    checkpointed = train(ckpt_cfg)
    from safetensors.torch import load_file

    a = load_file(plain.output_dir / "adapter_model.safetensors")
    b = load_file(checkpointed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_bad_batch_size_fails_before_anything_is_read(tmp_path):
    cfg = make_config(tmp_path, str(tmp_path / "no-such-model"), seed_records(2))
    cfg.train.batch_size, cfg.train.micro_batch_size = 10, 4
    with pytest.raises(KaikaError, match=r"batch_size 10 must be a multiple of micro_batch_size 4"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_generate_works_from_anywhere_and_without_bitsandbytes(tmp_path, monkeypatch, ja_tokenizer):
    build_model("bloom", ja_tokenizer, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    cfg = make_config(tmp_path, "base", seed_records(2, max_chars=80), max_steps=1)
    cfg.train.output_dir = "run"
    train(cfg)
    saved = (tmp_path / "run" / "kaika_config.yaml").read_text()
    assert f"base_model: {tmp_path / 'base'}" in saved
    # As if trained in 8-bit: the base loads quantized as trained (bitsandbytes runs on the CPU too)…
    (tmp_path / "run" / "kaika_config.yaml").write_text(
        saved.replace("quantization: none", "quantization: 8bit")
    )
    monkeypatch.chdir("/")
    loaded = load_for_inference(tmp_path / "run")
    assert loaded.model_args.quantization == "8bit"
    assert any(type(m).__name__ == "Linear8bitLt" for m in loaded.model.modules())
    assert generate(loaded, "挨拶して", "", GenerateArgs(max_new_tokens=4)).new_tokens <= 4
    # …and in full precision, said so, where bitsandbytes is not installed.
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    loaded = load_for_inference(tmp_path / "run")
    assert loaded.model_args.quantization == "none"
    assert generate(loaded, "挨拶して", "", GenerateArgs(max_new_tokens=4)).new_tokens <= 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_end_to_end(tmp_path, dtype):
    """Train (verified save), resume, generate and merge with a half-precision base on this device."""
    from kaika.inference.merge import merge

    cfg = make_config(tmp_path, "bloom-ja-tiny", seed_records(4, max_chars=120), max_steps=4, save_steps=2)
    cfg.model.dtype, cfg.train.batch_size, cfg.train.micro_batch_size = dtype, 4, 2
    cfg.data.cutoff_len = 192
    result = train(cfg)  # save-and-verify in this dtype
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.train_loss))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-4")
    cfg.train.resume = True  # from step 2: the same adapter as the run that was not interrupted
    again = train(cfg)
    for (name, p), (_, q) in zip(
        result.model.named_parameters(), again.model.named_parameters(), strict=True
    ):
        if p.requires_grad:
            assert torch.equal(p, q), name
    loaded = load_for_inference(tmp_path / "run")
    assert next(loaded.model.get_base_model().parameters()).dtype == getattr(torch, dtype)
    assert generate(loaded, "挨拶して", "", GenerateArgs(max_new_tokens=6)).new_tokens <= 6
    merged = merge(tmp_path / "run", tmp_path / "merged", dtype=dtype)  # raises if it is not base + adapter
    assert merged.max_abs_diff <= merged.tolerance and merged.dtype == dtype
