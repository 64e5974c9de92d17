"""Adapter directories shaped exactly like ``kaika train`` output, made in a second instead of
trained: peft LoRA with random (non-zero) B on a base model, saved with config, template and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import SEED_TASKS


def make_adapter(
    out: Path,
    base_model: str = "tiny-bloom-ja",
    seed: int = 0,
    template: str = "alpaca_ja",
    r: int = 4,
    dora: bool = False,
) -> Path:
    from peft import LoraConfig, get_peft_model

    from kaika.config import TrainConfig, save_yaml
    from kaika.data.prompts import load_template
    from kaika.modeling.load import load_model, load_tokenizer
    from kaika.rundir import CONFIG_FILE, TEMPLATE_FILE

    cfg = TrainConfig()
    cfg.model.base_model, cfg.data.template, cfg.data.data = base_model, template, [str(SEED_TASKS)]
    cfg.lora.r, cfg.lora.alpha = r, 8 * r
    cfg.lora.variant = "dora" if dora else "lora"
    model = load_model(cfg.model)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=r,
        lora_alpha=8 * r,  # a strong random update, so that each adapter visibly changes answers
        target_modules=["query_key_value"],
        init_lora_weights=False,  # random B: the adapter changes the model, as a trained one does
        task_type="CAUSAL_LM",
        use_dora=dora,
    )
    peft_model = get_peft_model(model, lora)
    if dora:  # magnitudes start at the weight's row norms (no change); a trained DoRA moves them
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    load_tokenizer(cfg.model).save_pretrained(out)
    save_yaml(cfg, out / CONFIG_FILE)
    (out / TEMPLATE_FILE).write_text(load_template(template).to_json(), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory) -> tuple[Path, Path]:
    """Two different adapters on the builtin tiny-bloom-ja: one alpaca_ja LoRA, one English alpaca DoRA
    (so that serving both at once, merging, exporting and chatting go through DoRA too)."""
    root = tmp_path_factory.mktemp("adapters")
    return (
        make_adapter(root / "ja", seed=1, template="alpaca_ja"),
        make_adapter(root / "en", seed=2, template="alpaca", dora=True),
    )
