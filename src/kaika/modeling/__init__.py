"""Models: loading (hub, local, GGUF, builtins), BLOOM's fused attention, LoRA, and the check that a
saved model or adapter is the one in memory.

* :mod:`~kaika.modeling.load`: base model and tokenizer from a hub id, a directory, a .gguf file or a
  builtin name; dtype and quantization;
* :mod:`~kaika.modeling.builtin`: the builtin models (shipped ``bloom-ja-tiny``, built ``tiny-bloom-ja``);
* :mod:`~kaika.modeling.attention`: SDPA attention with ALiBi for BLOOM;
* :mod:`~kaika.modeling.lora`, :mod:`~kaika.modeling.qkv`: the peft LoRA, per-architecture targets,
  q/k/v slices of fused projections;
* :mod:`~kaika.modeling.verify`: one verification rule for every save.
"""
