"""Exported GGUF files in llama.cpp itself (llama-cpp-python, built from source by
scripts/test-llamacpp.sh): llama.cpp tokenizes kaika's prompt into kaika's ids, and its greedy
continuation is the merged model's (each token its argmax, or a near-tie within what the
file's rounding moves a logit).

Opt-in (``--run-llamacpp``): building llama.cpp takes about 18 minutes on this project's 2-core
machine, more than the default run affords. The models are real: the shipped bloom-ja-tiny (BLOOM,
pretrained by kaika on Sōseki) here, and a gemma-3-270m adapter (trained in bf16 where the CPU computes it) in
tests/modeling/test_real_models.py (which uses these helpers)."""

from __future__ import annotations

import pytest

from kaika.data.prompts import load_template
from kaika.inference.export import export
from llamacpp_check import check_in_llamacpp

pytestmark = pytest.mark.llamacpp

SOSEKI = "吾輩は猫である。名前はまだ無い。続きを書いてください。"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_bloom_ja_tiny_runs_in_llamacpp(tmp_path, quant):
    from kaika.config import ModelArgs
    from kaika.modeling.load import load_model, load_tokenizer

    r = export("bloom-ja-tiny", tmp_path / "out", quant=quant)
    args = ModelArgs(base_model="bloom-ja-tiny", dtype="float32")
    tokenizer, model = load_tokenizer(args), load_model(args)
    # Twice the rounding's measured effect on a logit: a near-tie may flip (two logits, each moved).
    tolerance = 2 * r.quant_diff
    tokens = check_in_llamacpp(
        r.gguf_file, load_template("alpaca_ja"), tokenizer, model, SOSEKI, 16, tolerance
    )
    assert len(tokens) >= 4
