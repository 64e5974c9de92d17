"""What reading a GGUF checkpoint needs on both sides of loading: the model loader
(:mod:`kaika.modeling.load`) and the builtin models read from a package's GGUF file
(:mod:`kaika.modeling.builtin`)."""

from __future__ import annotations

from kaika.errors import KaikaError


def missing_gguf(err: ImportError) -> KaikaError:
    return KaikaError(f"reading a GGUF file needs the gguf package: pip install 'gguf>=0.10' ({err})")


def drop_gguf_quantizer(model) -> None:
    """A GGUF checkpoint loads as dense weights, yet transformers marks the model "quantized (gguf)",
    which makes Trainer refuse to train it and save_pretrained refuse to write it. When nothing was
    kept packed, the mark is false: remove it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if (
        quantizer is not None
        and quantizer.quantization_config.quant_method == "gguf"
        and not getattr(quantizer, "packed_modules", None)
    ):
        quantizer.remove_quantization_config(model)
