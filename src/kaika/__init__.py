"""kaika: LoRA instruction tuning for Hugging Face causal LMs, BLOOM first, Japanese first."""

__version__ = "0.1.0"
