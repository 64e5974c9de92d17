"""Launches, engines and the GPU-path decisions, checked without launching: what kaika reads from the
launcher's environment, what it refuses before anything loads, and the choices it makes for a GPU it
does not have here (the ``torch.cuda`` queries are faked; the decision is kaika's own code)."""

from __future__ import annotations

import errno
import json
import logging

import pytest
import torch

from kaika.cli import main
from kaika.config import TrainArgs
from kaika.errors import KaikaError
from kaika.training.launch import Launch, check_launch, detect_launch
from kaika.training.trainer import mixed_precision, precision_arguments, training_arguments

TORCHRUN = {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_the_launch_is_read_from_the_launchers_environment(tmp_path):
    assert detect_launch({}) == Launch()
    ddp = detect_launch(TORCHRUN)
    assert (ddp.engine, ddp.world_size, ddp.rank, ddp.nodes, ddp.sharded) == ("ddp", 4, 1, 2, False)
    assert ddp.describe() == "DDP over 4 processes on 2 nodes"
    fsdp = detect_launch({**TORCHRUN, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert (fsdp.engine, fsdp.fsdp_version, fsdp.sharded) == ("fsdp", 2, True)
    zero2 = detect_launch(
        {**TORCHRUN, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    )
    assert (zero2.engine, zero2.zero_stage, zero2.sharded) == ("deepspeed", 2, False)
    # A DeepSpeed JSON file named by the accelerate config: the stage is read from it.
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    zero3 = detect_launch({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)})
    assert (zero3.zero_stage, zero3.sharded, zero3.describe()) == (3, True, "DeepSpeed ZeRO-3")


@pytest.mark.parametrize(
    "launch, quantization, checkpointing, says",
    [
        (Launch(2, engine="deepspeed", zero_stage=3), "4bit", False, "DeepSpeed cannot partition or cast"),
        (Launch(2, engine="deepspeed", zero_stage=2), "8bit", False, "Train a quantized base with DDP"),
        (Launch(2, engine="fsdp", fsdp_version=1), "none", False, "set fsdp_version: 2"),
        (Launch(2, engine="fsdp", fsdp_version=2), "8bit", False, "8-bit layers cannot be sharded"),
        (
            Launch(2, engine="fsdp", fsdp_version=2, fsdp_activation_checkpointing=True),
            "none",
            True,
            "keep one",
        ),
    ],
)
def test_what_an_engine_cannot_honour_is_refused_naming_both(launch, quantization, checkpointing, says):
    with pytest.raises(KaikaError, match=says):
        check_launch(launch, quantization, checkpointing)


def test_a_sharded_launch_with_a_quantized_base_is_refused_before_any_data_or_model(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    missing = tmp_path / "no-such-data.jsonl"  # never read: the refusal comes first
    code = main(
        ["train", "--data", str(missing), "--quantization", "4bit", "--output-dir", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--quantization 4bit under DeepSpeed ZeRO-3" in err, err
    assert not (tmp_path / "r").exists()


def fake_gpus(monkeypatch, count: int, native_bf16: bool = True, name: str = "Fake GPU") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: native_bf16 or including_emulation,  # emulation on every GPU
    )


def test_several_gpus_without_a_launcher_are_refused_with_the_torchrun_command(monkeypatch):
    fake_gpus(monkeypatch, 4)
    with pytest.raises(KaikaError, match=r"torchrun --nproc_per_node 4 -m kaika train") as err:
        check_launch(detect_launch({}), "none", False)
    assert "CUDA_VISIBLE_DEVICES=0" in str(err.value)
    check_launch(detect_launch({**TORCHRUN, "WORLD_SIZE": "4"}), "none", False)  # launched: fine
    fake_gpus(monkeypatch, 1)
    check_launch(detect_launch({}), "none", False)  # one GPU: fine


def test_dtype_auto_never_picks_emulated_bf16(monkeypatch):
    from kaika.modeling.load import dtype_choice

    fake_gpus(monkeypatch, 1, native_bf16=False, name="Tesla T4")
    assert dtype_choice("auto")[0] == torch.float16  # a T4 / V100 "supports" bf16 only by emulating it
    with pytest.raises(KaikaError, match="Tesla T4.*does not compute bfloat16 natively"):
        dtype_choice("bfloat16")
    fake_gpus(monkeypatch, 1, native_bf16=True, name="A100")
    assert dtype_choice("auto")[0] == torch.bfloat16


def test_mixed_precision_comes_from_the_compute_dtype(monkeypatch):
    import transformers.utils

    assert precision_arguments(torch.bfloat16) == {"bf16": True, "fp16": False, "tf32": None}
    assert precision_arguments(torch.float16)["fp16"] is False  # no autocast fp16 on a CPU
    assert mixed_precision(torch.bfloat16) and not mixed_precision(torch.float32)
    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(transformers.utils, "is_torch_tf32_available", lambda: True)
    assert precision_arguments(torch.float16) == {"bf16": False, "fp16": True, "tf32": None}
    assert mixed_precision(torch.float16)
    # float32 compute on an Ampere GPU (pretrain --full, --dtype float32) multiplies in TF32.
    assert precision_arguments(torch.float32) == {"bf16": False, "fp16": False, "tf32": True}


def test_training_arguments_follow_the_compute_dtype_not_the_first_parameter(tmp_path):
    # What a QLoRA model looks like after peft's k-bit preparation: float32 parameters first.
    args = training_arguments(TrainArgs(batch_size=4, micro_batch_size=4), tmp_path, torch.bfloat16, False, 1)
    assert args.bf16 and not args.fp16 and args.ddp_timeout == 900


def test_pretrain_checks_the_batch_against_every_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    text = tmp_path / "t.txt"
    text.write_text("吾輩は猫である。", encoding="utf-8")
    code = main(["pretrain", "--data", str(text), "--batch-size", "4", "--micro-batch-size", "4",
                 "--output-dir", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    assert "micro_batch_size 4 × 2 process(es) = 8" in capsys.readouterr().err


def test_a_file_system_without_locks_trains_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import fcntl

    from kaika.guard import DirLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="kaika"), DirLock(tmp_path / "run") as lock:
        assert lock.fd is None
    assert "cannot lock files (No locks available)" in caplog.text


def test_trainable_biases_are_float32_under_mixed_precision_and_the_grad_scaler_takes_them(
    ja_tokenizer, tmp_path
):
    """--lora-bias all on an fp16 base: the GradScaler refuses fp16 gradients ("Attempting to unscale
    FP16 gradients"); kaika keeps every trained tensor in float32 when training runs under autocast."""
    from helpers import build_model
    from kaika.config import LoraArgs, ModelArgs
    from kaika.modeling.load import load_model
    from kaika.modeling.lora import apply_lora

    base = build_model("bloom", ja_tokenizer, tmp_path / "base")
    for dtype, half in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        model = apply_lora(
            load_model(ModelArgs(base_model=str(base), dtype=dtype)),
            LoraArgs(r=4, alpha=8, dropout=0.0, bias="all"),
            mixed_precision=True,
        )
        trained = [p for p in model.parameters() if p.requires_grad]
        assert any("lora_" not in n and p.requires_grad for n, p in model.named_parameters())  # biases train
        assert {p.dtype for p in trained} == {torch.float32}
        qkv = model.base_model.model.transformer.h[0].self_attention.query_key_value.base_layer
        assert qkv.weight.dtype == half  # the frozen matrices stay as loaded
        scaler = torch.amp.GradScaler("cpu", enabled=half == torch.float16)
        optimizer = torch.optim.AdamW(trained, lr=1e-3)
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.autocast("cpu", dtype=half):  # as the Trainer runs it (fp16: on CUDA, with the scaler)
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # raises on fp16 gradients
        scaler.step(optimizer)
        scaler.update()
        assert torch.isfinite(loss)


def test_verification_that_runs_out_of_gpu_memory_checks_on_the_cpu(
    ja_tokenizer, tmp_path, monkeypatch, caplog
):
    from peft import get_peft_model_state_dict

    import kaika.modeling.verify as verify
    from helpers import build_model
    from kaika.config import LoraArgs, ModelArgs
    from kaika.data.tokenize import pad_batch
    from kaika.modeling.load import load_model, resolve_source
    from kaika.modeling.lora import apply_lora

    args = ModelArgs(base_model=str(build_model("llama", ja_tokenizer, tmp_path / "base")))
    model = apply_lora(load_model(args), LoraArgs(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path / "adapter")
    devices = []
    real = verify._reloaded_reproduces

    def on(adapter_dir, memory, model_args, source, batch, device):
        devices.append(device.type)
        if device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        return real(adapter_dir, memory, model_args, source, batch, device)

    monkeypatch.setattr(verify, "_reloaded_reproduces", on)
    batch = pad_batch([{"input_ids": [5, 6, 7, 8]}], ja_tokenizer.pad_token_id)
    with caplog.at_level(logging.WARNING, logger="kaika"):
        verify.verify_adapter(
            tmp_path / "adapter", model, args, resolve_source(args), batch,
            memory=get_peft_model_state_dict(model), device="cuda",
        )  # fmt: skip
    assert devices == ["cuda", "cpu"] and "checking on the CPU instead" in caplog.text
