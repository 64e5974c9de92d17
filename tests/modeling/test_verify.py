"""One verification rule: every correct save passes, in every dtype; every wrong one fails.

The adapters here are made the way the Trainer leaves them under mixed precision: a bf16 or fp16
base with fp32 LoRA weights, and the forward wrapped in autocast (accelerate does that to the
model it trains). Comparing that model's logits with a reloaded copy's is unlike with unlike; the
rule compares the saved tensors bit for bit and the reloaded adapter against the in-memory one on
the same fresh base.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import build_model
from kaika.atomic import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from kaika.config import LoraArgs, ModelArgs
from kaika.data.tokenize import pad_batch
from kaika.errors import KaikaError
from kaika.modeling.load import load_model, resolve_source
from kaika.modeling.lora import apply_lora
from kaika.modeling.verify import masked_logits, verify_adapter, verify_full_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, ja_tokenizer):
    return build_model("llama", ja_tokenizer, tmp_path_factory.mktemp("verify") / "base")


def batch(tokenizer):
    ids = [
        tokenizer.encode(t, add_special_tokens=False) for t in ("吾輩は猫である。", "名前はまだ無い。どこで")
    ]
    return pad_batch([{"input_ids": i} for i in ids], tokenizer.pad_token_id)


def trained_adapter(base_dir, dtype: str):
    """A LoRA with large random B on a base in ``dtype``, its forward under autocast when half precision."""
    args = ModelArgs(base_model=str(base_dir), dtype=dtype)
    model = apply_lora(load_model(args), LoraArgs(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    if dtype != "float32":  # what accelerate does to the model the Trainer trains in bf16/fp16
        model.forward = torch.autocast("cpu", dtype=DTYPES[dtype])(model.forward)
    return model, args


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_correct_save_passes_in_every_dtype(base_dir, ja_tokenizer, tmp_path, dtype):
    model, args = trained_adapter(base_dir, dtype)
    model.save_pretrained(tmp_path)
    assert verify_adapter(tmp_path, model, args, resolve_source(args), batch(ja_tokenizer)) == 0.0
    if dtype != "float32":  # the old rule's comparison: the model in its training state vs a reload
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(load_model(args), tmp_path).eval()
        model.eval()
        assert (
            masked_logits(model, batch(ja_tokenizer)) - masked_logits(reloaded, batch(ja_tokenizer))
        ).abs().max() > 0


def wrong(tmp_path, how: str):
    weights, config = tmp_path / ADAPTER_WEIGHTS, tmp_path / ADAPTER_CONFIG
    tensors = load_file(weights)
    if how == "a changed value":
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] += 1e-3
    elif how == "another dtype":
        tensors = {k: v.half() for k, v in tensors.items()}
    elif how == "keys peft cannot load":  # alpaca-lora's state_dict patch: names that load nothing
        tensors = {k.replace("base_model.model.", ""): v for k, v in tensors.items()}
    if how == "another alpha":
        data = json.loads(config.read_text())
        data["lora_alpha"] *= 2
        config.write_text(json.dumps(data))
    else:
        save_file(tensors, weights)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("a changed value", "is not the one in memory"),
        ("another dtype", "float16 .* on disk, torch.float32 .* in memory"),
        ("keys peft cannot load", "holds tensors the model in memory does not"),
        ("another alpha", "does not describe the adapter in memory .*lora_alpha"),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_wrong_save_fails(base_dir, ja_tokenizer, tmp_path, how, message, dtype):
    model, args = trained_adapter(base_dir, dtype)
    model.save_pretrained(tmp_path)
    wrong(tmp_path, how)
    with pytest.raises(KaikaError, match=f"verification failed: .*{message}"):
        verify_adapter(tmp_path, model, args, resolve_source(args), batch(ja_tokenizer))


@pytest.mark.parametrize(
    ("trained", "written"), [("float32", "float32"), ("float32", "float16"), ("bfloat16", "bfloat16")]
)
def test_whole_models_saved_in_any_dtype(base_dir, ja_tokenizer, tmp_path, trained, written):
    model = load_model(ModelArgs(base_model=str(base_dir), dtype=trained))
    model.to(DTYPES[written]).save_pretrained(tmp_path / "ok")  # rounded in place, as pretrain saves
    model.to(DTYPES[trained])
    b = batch(ja_tokenizer)
    assert verify_full_model(tmp_path / "ok", model, b, cast=written != trained) == 0.0
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0  # the model in memory is no longer the saved one
    with pytest.raises(KaikaError, match="verification failed: tensor .* is not the one in memory"):
        verify_full_model(tmp_path / "ok", model, b, cast=written != trained)
