"""RunDir: one rule for what a run, an adapter from elsewhere, a merged model or a hub id means."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from adapters import make_adapter
from kaika.errors import KaikaError
from kaika.rundir import CONFIG_FILE, TEMPLATE_FILE, RunDir, base_of


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A kaika run trained with the English template, on the builtin base."""
    return make_adapter(tmp_path_factory.mktemp("rundir") / "run", template="alpaca")


def foreign_copy(run_dir, tmp_path):
    """The same adapter as another tool leaves it: PEFT files only (no kaika config, template, tokenizer)."""
    out = tmp_path / "foreign"
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run_dir / name, out / name)
    return out


def test_a_kaika_run_answers_from_its_saved_files(run_dir):
    run = RunDir.open(run_dir)
    assert run.kind == "run" and run.is_adapter
    assert run.model_args.base_model == "tiny-bloom-ja"
    assert run.template.name == "alpaca"  # its template.json, not kaika's default
    assert run.tokenizer_source.path == str(run_dir)  # the tokenizer saved with the run
    assert run.data_args.template == "alpaca"


def test_overrides_win_over_the_saved_choices(run_dir, tmp_path):
    run = RunDir.open(run_dir, base_model=str(tmp_path / "elsewhere"), dtype="bfloat16", template="alpaca_ja")
    assert run.model_args.base_model == str(tmp_path / "elsewhere") and run.model_args.gguf_file is None
    assert run.model_args.dtype == "bfloat16"
    assert run.template.name == "alpaca_ja"


def test_an_adapter_from_elsewhere_takes_peft_s_base_and_the_default_template(run_dir, tmp_path, caplog):
    foreign = foreign_copy(run_dir, tmp_path)
    config = json.loads((foreign / "adapter_config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="kaika"):
        run = RunDir.open(foreign)
    assert run.kind == "adapter" and run.config is None
    assert run.model_args.base_model == config["base_model_name_or_path"] == base_of(foreign)
    assert run.template.name == "alpaca_ja"  # the one fallback, said out loud
    assert "holds no prompt template" in caplog.text and "--template" in caplog.text
    assert run.tokenizer_source.path != str(foreign)  # no tokenizer there: the base's


def test_the_saved_config_s_template_comes_before_the_default(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    (tmp_path / "run" / TEMPLATE_FILE).unlink()
    assert RunDir.open(tmp_path / "run").template.name == "alpaca"


def test_whole_models_and_what_is_refused(run_dir, tmp_path):
    model = RunDir.open("tiny-bloom-ja", adapter=False)
    assert model.kind == "model" and not model.is_adapter
    assert model.model_args.base_model == "tiny-bloom-ja"
    with pytest.raises(KaikaError, match="only applies to adapters"):
        RunDir.open("tiny-bloom-ja", base_model="bloom-ja-tiny", adapter=False)
    with pytest.raises(KaikaError, match="does not exist"):
        RunDir.open(tmp_path / "missing")  # generate, chat, serve, merge want an adapter
    # A run killed before its first save: said so, even where a whole model is accepted (eval).
    killed = tmp_path / "killed"
    (killed / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (killed / CONFIG_FILE).write_text((run_dir / CONFIG_FILE).read_text())
    with pytest.raises(KaikaError, match="not a complete adapter: adapter_config.json is missing"):
        RunDir.open(killed, adapter=False)


def test_a_whole_model_where_an_adapter_is_wanted_says_so(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    with pytest.raises(
        KaikaError, match="is a whole model, not an adapter: serve it with kaika serve --base-model"
    ):
        RunDir.open(tmp_path / "merged")


def test_an_adapter_is_loaded_only_on_the_base_it_was_trained_on(tmp_path, ja_tokenizer):
    """The run records its base (files' sizes and hashes); a base that changed since is refused naming
    what changed, before any model loads, unless --base-model asks for it on purpose. A base of other
    dimensions is refused naming both, not peft's "size mismatch" traceback."""
    from helpers import build_model, seed_records, write_jsonl
    from kaika.config import TrainConfig
    from kaika.inference.export import export
    from kaika.inference.generate import load_for_inference
    from kaika.rundir import BASE_FINGERPRINT
    from kaika.training.sft import train

    base = build_model("llama", ja_tokenizer, tmp_path / "base")
    cfg = TrainConfig()
    cfg.model.base_model = str(base)
    cfg.data.data, cfg.data.cutoff_len = (
        [str(write_jsonl(tmp_path / "d.jsonl", seed_records(4, max_chars=100)))],
        96,
    )
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.batch_size, cfg.train.micro_batch_size = (
        str(tmp_path / "run"), 1, 4, 4)  # fmt: skip
    run = train(cfg).output_dir
    recorded = json.loads((run / BASE_FINGERPRINT).read_text())
    assert set(recorded["files"]) == {"config.json", "model.safetensors"}
    load_for_inference(run)  # unchanged: loads

    build_model("llama", ja_tokenizer, tmp_path / "base", seed=1)  # the same path, retrained weights
    for attempt in (lambda: load_for_inference(run), lambda: export(run, tmp_path / "gguf")):
        with pytest.raises(
            KaikaError, match="has changed since: model.safetensors has other contents"
        ) as err:
            attempt()
        assert f"--base-model {base}" in str(err.value)
    assert not (tmp_path / "gguf").exists()
    load_for_inference(run, base_model=str(base))  # on purpose: allowed, it fits

    other = tmp_path / "bloom"
    build_model("bloom", ja_tokenizer, other)
    with pytest.raises(KaikaError, match=f"does not fit the base model {other}.*not found in the base model"):
        load_for_inference(run, base_model=str(other))
    from transformers import AutoConfig, AutoModelForCausalLM

    wider = AutoConfig.from_pretrained(base)
    wider.hidden_size, wider.head_dim = 128, 32
    AutoModelForCausalLM.from_config(wider).save_pretrained(tmp_path / "wider")
    ja_tokenizer.save_pretrained(tmp_path / "wider")
    with pytest.raises(KaikaError, match="does not fit the base model .*wider.*size mismatch"):
        load_for_inference(run, base_model=str(tmp_path / "wider"))
