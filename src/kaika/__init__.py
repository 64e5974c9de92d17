"""kaika: LoRA instruction tuning for Hugging Face causal LMs, BLOOM first, Japanese first.

The command line's verbs, from Python (docs/python.md)::

    import kaika

    run = kaika.train(data="seed-tasks-ja", output_dir="runs/demo", max_steps=20)
    model = kaika.load(run.output_dir)
    print(model.generate("日本の首都はどこですか？").text)
    kaika.export(run.output_dir, "exports/demo", quant="q8_0")

Names are imported on first use, so ``import kaika`` loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # verbs (kaika.api)
    "train", "pretrain", "dpo", "load", "Model", "generate", "evaluate", "eval_loss", "eval_choice", "eval_suite",
    "merge", "export",
    # configs (kaika.config)
    "TrainConfig", "PretrainConfig", "DpoConfig", "ModelArgs", "DataArgs", "LoraArgs", "TrainArgs", "GenerateArgs",
    "KaikaError",
]  # fmt: skip

# name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(__all__[1:13], "kaika.api"),
    **dict.fromkeys(__all__[13:21], "kaika.config"),
    "KaikaError": "kaika.errors",
}

if TYPE_CHECKING:
    from kaika.api import (
        Model,
        dpo,
        eval_choice,
        eval_loss,
        eval_suite,
        evaluate,
        export,
        generate,
        load,
        merge,
        pretrain,
        train,
    )
    from kaika.config import (
        DataArgs,
        DpoConfig,
        GenerateArgs,
        LoraArgs,
        ModelArgs,
        PretrainConfig,
        TrainArgs,
        TrainConfig,
    )
    from kaika.errors import KaikaError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kaika' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
