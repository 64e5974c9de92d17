"""kaika export: GGUF files that transformers' reader (and llama.cpp: test_llamacpp.py) read back as
the model, with the tokenizer and chat template inside, a hub model card and an Ollama Modelfile
whose TEMPLATE renders kaika's own prompt (rendered by Go's text/template, Ollama's engine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from adapters import make_adapter, tiny_adapters  # noqa: F401  (fixture)
from helpers import build_model, run_kaika
from kaika.data.prompts import ChatTemplate, load_template
from kaika.data.segments import prompt_ids
from kaika.errors import KaikaError
from kaika.inference.export import export, prompts_start_with_bos
from kaika.inference.ollama import go_template
from kaika.modeling import to_gguf

ARCHS = ["bloom", "llama", "mistral", "qwen2", "gemma3_text", "gpt2"]
GGUF_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}


def run_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key):
        f = reader.fields[key]
        if len(f.types) > 1 or f.types[0] == gguf.GGUFValueType.ARRAY:  # an array
            return [f.contents(i) for i in range(len(f.data))]
        return f.contents()

    return reader, field


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_reads_back_as_the_model(tmp_path, ja_tokenizer, arch):
    """transformers' reader, which undoes llama.cpp's names and layouts itself, gives back the weights
    as written, for every architecture and quant type; the tokenizer and template travel in the file."""
    base = build_model(arch, ja_tokenizer, tmp_path / arch)
    for quant in ("f16", "bf16", "q8_0"):
        r = export(base, tmp_path / f"out-{quant}", quant=quant)
        assert r.file_diff <= r.file_tol, (arch, quant)
        assert r.quant_diff > 0 and 0 < r.weight_error <= r.weight_bound, (arch, quant)  # real, bounded
        reader, field = read_gguf(r.gguf_file)
        assert field("general.architecture") == GGUF_ARCH.get(arch, arch)
        assert field("general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[quant]
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        matrices = [n for n in types if n.endswith("weight") and "norm" not in n and "position" not in n]
        assert {types[n] for n in matrices} == {quant.upper()}, types
        assert all(types[n] == "F32" for n in types if "norm" in n or n.endswith("bias"))
    assert field("tokenizer.ggml.tokens") == ja_tokenizer.convert_ids_to_tokens(
        list(range(len(ja_tokenizer)))
    )
    # transformers loads a Qwen2 model's tokenizer with Qwen2's own split: its llama.cpp name is qwen2
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == ("qwen2" if arch == "qwen2" else "gpt-2")
    assert field("tokenizer.ggml.eos_token_id") == ja_tokenizer.eos_token_id
    assert "### 応答:" in field("tokenizer.chat_template")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_a_wrong_layout_is_caught_and_nothing_is_written(tmp_path, ja_tokenizer, monkeypatch):
    """If kaika wrote BLOOM's fused q/k/v in transformers' order, llama.cpp would split it wrongly:
    the read-back check sees it, and nothing is published."""
    base = build_model("bloom", ja_tokenizer, tmp_path / "bloom")
    monkeypatch.setattr(to_gguf, "bloom_qkv_rows", lambda heads, head_dim: np.arange(3 * heads * head_dim))
    with pytest.raises(KaikaError, match="does not reproduce the weights"):
        export(base, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bloom"]


def test_what_llamacpp_would_run_otherwise_is_refused(tmp_path, ja_tokenizer):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    neox = tmp_path / "neox"
    AutoModelForCausalLM.from_config(
        GPTNeoXConfig(
            vocab_size=len(ja_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4
        )
    ).save_pretrained(neox)
    ja_tokenizer.save_pretrained(neox)
    with pytest.raises(
        KaikaError, match=r"'gpt_neox'.*supported: bloom, gemma3_text, gpt2, llama, mistral, qwen2"
    ):
        export(neox, tmp_path / "out")
    gemma = build_model("gemma3_text", ja_tokenizer, tmp_path / "gemma")
    config = json.loads((gemma / "config.json").read_text())
    (gemma / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 256}))
    with pytest.raises(KaikaError, match="query_pre_attn_scalar 256.*llama.cpp"):
        export(gemma, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_is_merged_then_exported_with_a_hub_model_card(tmp_path, tiny_adapters):  # noqa: F811
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_adapters[0], run)
    (run / "data_report.json").write_text(
        json.dumps({"records": 9, "kept": 8, "tokens": 700, "supervised_tokens": 300})
    )
    (run / "eval" / "elyza_tasks_100").mkdir(parents=True)
    summary = {
        "tasks_file": "elyza_tasks_100.csv",
        "models": {"base": {"chrf": 5.6}, "adapter": {"chrf": 6.05}},
    }
    (run / "eval" / "elyza_tasks_100" / "summary.json").write_text(json.dumps(summary))
    r = export(run, tmp_path / "gguf", quant="q8_0")
    assert r.file_diff <= r.file_tol

    # The file is base + adapter: against plain peft, on a prompt the export never checked.
    from peft import PeftModel

    from kaika.modeling.builtin import builtin_model_path

    ids = torch.tensor([run_tokenizer(run).encode("吾輩は猫である。名前はまだ無い。")])
    base = AutoModelForCausalLM.from_pretrained(builtin_model_path("tiny-bloom-ja")).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, run).eval()(ids).logits
        reloaded = (
            AutoModelForCausalLM.from_pretrained(r.out_dir, gguf_file=r.gguf_file.name).eval()(ids).logits
        )
    assert (reloaded - tuned).abs().max() < 0.1 * (tuned - base_logits).abs().max()
    assert load_gguf_checkpoint(str(r.gguf_file))["config"]["n_layer"] == 4

    card = (r.out_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["language"] == ["ja"]
    assert {"kaika", "lora", "gguf"} <= set(front["tags"]) and front["pipeline_tag"] == "text-generation"
    result = front["model-index"][0]["results"][0]
    assert result["dataset"]["type"] == "elyza/ELYZA-tasks-100"
    assert result["metrics"] == [{"type": "chrf", "value": 6.05}]
    for expected in (
        "seed_tasks_ja.jsonl",
        "Apache-2.0",
        "### 指示:",
        "LoRA r=4",
        "8 of 9 examples",
        "llama-cli -m",
    ):
        assert expected in card, expected
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.to_dict()["license"] == "apache-2.0"  # the hub's own parser reads it
    assert sorted(r.files) == sorted(
        ["README.md", r.gguf_file.name, "data_report.json", "kaika_training_config.yaml", "template.json"]
    )


# --------------------------------------------------------------------------- Ollama


@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory):
    """Ollama's template engine (Go's text/template) over Ollama's chat data, as a program."""
    from pathlib import Path

    go = shutil.which("go")
    assert go, "Go is needed to render Ollama templates: scripts/test.sh installs Debian's golang-go"
    out = tmp_path_factory.mktemp("go") / "render"
    src = Path(__file__).with_name("ollama_render.go")
    env = {"GOCACHE": str(out.parent / "cache"), "HOME": str(out.parent), "PATH": "/usr/bin:/bin"}
    subprocess.run([go, "build", "-o", str(out), str(src)], check=True, env=env, cwd=out.parent)

    def render(template: str, messages: list[dict]) -> str:
        run = subprocess.run(
            [str(out)],
            input=json.dumps({"template": template, "messages": messages}),
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    return render


CONVERSATION = [
    {"role": "system", "content": "丁寧に答えてください。"},
    {"role": "user", "content": "猫の名前は？"},
    {"role": "assistant", "content": "まだ無いです。"},
    {"role": "user", "content": "どこで生まれましたか？"},
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def ollama_ids(tokenizer, text: str, add_bos: bool) -> list[int]:
    """What llama.cpp makes of Ollama's prompt text: special tokens parsed, BOS added when the GGUF
    file says so."""
    return ([tokenizer.bos_token_id] if add_bos else []) + tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("template", ["alpaca_ja", "alpaca"])
def test_the_modelfile_template_renders_kaikas_prompt(tmp_path, ollama_render, template):
    adapter = make_adapter(tmp_path / "run", template=template)
    r = export(adapter, tmp_path / "out", ollama=True)
    modelfile = (r.out_dir / "Modelfile").read_text()
    assert f"FROM ./{r.gguf_file.name}" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    tmpl = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    kaika_template, tokenizer = load_template(template), run_tokenizer(adapter)
    add_bos = read_gguf(r.gguf_file)[1]("tokenizer.ggml.add_bos_token")
    odd = [  # what kaika's turns make of system messages anywhere, runs of one role, an answer first
        [{"role": "user", "content": "猫の名前は？"}, {"role": "system", "content": "短く。"}]
        + [{"role": "user", "content": "それと年齢は？"}, {"role": "developer", "content": "敬語で。"}],
        [{"role": "assistant", "content": "こんにちは。"}, {"role": "user", "content": "猫の名前は？"}],
        CONVERSATION[:3] + [{"role": "assistant", "content": "続きです。"}, *CONVERSATION[3:]],
        [{"role": "system", "content": ""}, *CONVERSATION[1:]],
    ]
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:2], *odd):
        text = ollama_render(tmpl, messages)
        assert ollama_ids(tokenizer, text, add_bos) == prompt_ids(kaika_template, tokenizer, messages), (
            messages
        )


@pytest.mark.parametrize("fmt", ["gemma3", "chatml"])
def test_chat_templates_kaika_knows_become_ollama_templates(ollama_render, fmt):
    from importlib import resources

    from kaika.modeling.builtin import train_tokenizer

    tokenizer = train_tokenizer(vocab_size=600)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]}
    )
    gemma3 = (
        resources.files("kaika.assets").joinpath("chat_templates/gemma3.jinja").read_text(encoding="utf-8")
    )
    source = gemma3 if fmt == "gemma3" else CHATML
    template = ChatTemplate(source)
    tmpl = go_template(template, tokenizer)
    assert tmpl is not None
    for messages in (CONVERSATION, CONVERSATION[1:]):
        text = ollama_render(tmpl, messages)
        add_bos = prompts_start_with_bos(template, tokenizer)  # what the exported file would say
        assert ollama_ids(tokenizer, text, add_bos) == prompt_ids(template, tokenizer, messages)
    odd = ChatTemplate(CHATML.replace("<|im_start|>", "<|start|>"))
    assert go_template(odd, tokenizer) is None  # not one kaika knows: no TEMPLATE, and a warning


def test_export_command(tmp_path, tiny_adapters):  # noqa: F811
    out = run_kaika(
        "export", str(tiny_adapters[1]), str(tmp_path / "q8"), "--quant", "q8_0", "--ollama", cwd=tmp_path
    )
    assert "GGUF written to" in out and "ollama create" in out
    assert sorted(p.name for p in (tmp_path / "q8").iterdir()) == [
        ".kaika-owner",  # kaika's own: --force may replace it
        "Modelfile",
        "README.md",
        "kaika_training_config.yaml",
        "q8-q8_0.gguf",
        "template.json",
    ]
    again = subprocess.run(
        [sys.executable, "-m", "kaika", "export", str(tiny_adapters[1]), str(tmp_path / "q8")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert again.returncode == 2 and "not empty" in again.stderr
    forced = subprocess.run(  # kaika's own earlier export: --force replaces it
        [sys.executable, "-m", "kaika", "export", str(tiny_adapters[1]), str(tmp_path / "q8"), "--force"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (tmp_path / "q8" / "q8-f16.gguf").is_file() and not (tmp_path / "q8" / "q8-q8_0.gguf").exists()
