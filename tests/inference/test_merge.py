"""kaika merge: the merged checkpoint is standard, complete, and equals base + adapter."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from adapters import tiny_adapters  # noqa: F401  (fixture)
from kaika.cli import main
from kaika.data.messages import kaika_pieces
from kaika.data.prompts import load_template
from kaika.errors import KaikaError
from kaika.inference.merge import TRAINING_CONFIG_FILE, merge
from kaika.rundir import CONFIG_FILE


@torch.no_grad()
def test_merged_checkpoint_equals_base_plus_adapter(tmp_path, tiny_adapters):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kaika.modeling.builtin import builtin_model_path

    adapter = tiny_adapters[0]
    out = tmp_path / "merged"
    result = merge(adapter, out, max_shard_size="2MB")  # ~8 MB of fp32 weights: several shards
    assert result.out_dir == out and result.max_abs_diff <= result.tolerance
    assert result.rounding == result.max_abs_diff  # float32: nothing rounded after the merge
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert not list(out.glob("adapter_*")), "a merged model carries no adapter files"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"

    # Independent of merge()'s own check: plain transformers vs plain peft, on a prompt it never saw.
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("吾輩は猫である。名前はまだ無い。", add_special_tokens=False)])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(builtin_model_path("tiny-bloom-ja")).eval()
    base_logits = base(ids).logits
    reference = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
    torch.testing.assert_close(merged(ids).logits, reference, rtol=1e-4, atol=1e-4)
    assert (reference - base_logits).abs().max() > 1e-2, (
        "the adapter must change the model for this to mean anything"
    )

    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id) == (2, 3)

    # The tokenizer's chat template renders what kaika's multi-turn form renders (EOS after each answer).
    template = load_template(out / "template.json")
    assert template == load_template(adapter / "template.json")
    conversation = [
        {"role": "system", "content": "丁寧に答えてください。"},
        {"role": "user", "content": "猫の名前は？"},
        {"role": "assistant", "content": "まだ無いです。"},
        {"role": "user", "content": "どこで生まれましたか？"},
    ]
    pieces = kaika_pieces(template, conversation)
    text = "".join(t + (tok.eos_token if kind == "answer" else "") for kind, t in pieces)
    assert tok.apply_chat_template(conversation, tokenize=False) == text

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    # tiny-bloom-ja has no hub id to name as base_model; its licence is the card's
    assert "base_model" not in front and front["license"] == "apache-2.0" and front["language"] == ["ja"]
    assert "lora" in front["tags"] and front["library_name"] == "transformers"
    for expected in ("seed_tasks_ja.jsonl", "Apache-2.0", "alpaca_ja", "### 指示:", "LoRA r=4"):
        assert expected in card, expected
    saved = yaml.safe_load((out / TRAINING_CONFIG_FILE).read_text())
    assert saved == yaml.safe_load((adapter / CONFIG_FILE).read_text())


def test_refuses_to_overwrite_and_force_replaces(tmp_path, tiny_adapters):  # noqa: F811
    adapter = tiny_adapters[1]
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KaikaError, match="not empty.*--force"):
        merge(adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(KaikaError, match="holds the adapter"):
        merge(adapter, adapter.parent, force=True)
    # --force replaces only a directory kaika wrote: a user's folder is refused, files untouched.
    with pytest.raises(KaikaError, match="only replaces a directory kaika wrote.*keep.txt"):
        merge(adapter, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    out = tmp_path / "merged"
    merge(adapter, out)
    r = merge(adapter, out, force=True, dtype="bfloat16")  # a merged model: kaika's, replaced
    assert (out / "model.safetensors").is_file()
    # The merge is checked in float32; bf16's rounding is measured and reported, not hidden in a tolerance.
    assert r.max_abs_diff <= r.tolerance and r.rounding > r.tolerance
    assert (
        f"Rounding the weights to bfloat16 moves the logits by up to {r.rounding:.2e}"
        in (out / "README.md").read_text()
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_wrong_merge_is_caught_and_nothing_is_written(tmp_path, tiny_adapters, monkeypatch):  # noqa: F811
    from peft.tuners.lora import LoraModel

    # Simulate a merge that loses the adapter (like alpaca-lora's empty adapters): unload, not merge.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kw: self.unload())
    with pytest.raises(KaikaError, match="verification failed"):
        merge(tiny_adapters[0], tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_quantized_training_is_merged_in_full_precision(tmp_path, tiny_adapters, caplog):  # noqa: F811
    import shutil

    adapter = tmp_path / "q"
    shutil.copytree(tiny_adapters[0], adapter)
    cfg = yaml.safe_load((adapter / CONFIG_FILE).read_text())
    cfg["model"]["quantization"] = "8bit"  # as if trained with --quantization 8bit on a GPU
    (adapter / CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.WARNING, logger="kaika"):
        result = merge(adapter, tmp_path / "out")
    assert "8bit-quantized base" in caplog.text and "full precision" in caplog.text
    assert result.max_abs_diff <= result.tolerance
    assert "trained on a 8bit-quantized base" in (tmp_path / "out" / "README.md").read_text()


def test_merge_command(tmp_path, tiny_adapters, capsys):  # noqa: F811
    out = tmp_path / "cli"
    assert main(["merge", str(tiny_adapters[1]), str(out)]) == 0
    assert f"merged model written to {out}" in capsys.readouterr().out
    assert main(["merge", str(tiny_adapters[1]), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
