"""The Python front door: ``import kaika`` is light, its verbs take the command line's options by
name and check them as the command line does, and the README's snippet runs."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kaika
from kaika.cli.options import add_config_args, namespace_overrides
from kaika.config import DpoConfig, PretrainConfig, TrainConfig, config_from, python_names, resolve_config
from kaika.errors import KaikaError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_kaika_loads_no_framework_and_every_name_resolves():
    code = "import sys, kaika; assert not {'torch', 'transformers', 'peft'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert kaika.__all__ == sorted(set(kaika.__all__), key=kaika.__all__.index)  # no name twice
    for name in kaika.__all__:
        assert getattr(kaika, name) is not None, name
    assert dir(kaika) == sorted(kaika.__all__)
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        kaika.trian  # noqa: B018


@pytest.mark.parametrize("cls", [TrainConfig, PretrainConfig, DpoConfig])
def test_every_option_has_its_flags_name_in_python(cls):
    """Each Python name is a flag of the command (dashes as underscores) and sets the same field."""
    parser = argparse.ArgumentParser()
    add_config_args(parser, cls)
    flags = {s for a in parser._actions for s in a.option_strings}
    for name, (section, fld) in python_names(cls).items():
        flag = "--" + name.replace("_", "-")
        if flag not in flags:  # a field named apart from its flag (from_run for --from)
            assert f"--{section}.{fld}" in flags, name
            continue
        action = next(a for a in parser._actions if flag in a.option_strings)
        assert action.dest == f"{section}.{fld}", name


def test_options_by_name_equal_the_command_lines():
    argv = ["--data", "a.jsonl", "b.jsonl", "--lora-r", "4", "--epochs", "2", "--no-fast-loss", "--lr", "1e-4",
            "--columns", "instruction=q", "--output-dir", "runs/y"]  # fmt: skip
    parser = argparse.ArgumentParser()
    add_config_args(parser, TrainConfig)
    from_cli = resolve_config(TrainConfig, None, namespace_overrides(parser.parse_args(argv)))
    from_python = config_from(
        TrainConfig,
        None,
        {"data": ["a.jsonl", "b.jsonl"], "lora_r": 4, "epochs": 2, "fast_loss": False, "lr": 1e-4,
         "columns": {"instruction": "q"}, "output_dir": Path("runs/y")},
    )  # fmt: skip
    assert from_python == from_cli
    # a config object, a YAML file and whole sections compose the same way
    assert config_from(TrainConfig, from_cli, {"lora": {"r": 8}}).lora.r == 8
    assert config_from(DpoConfig, None, {"from_run": "runs/sft"}).dpo.from_run == "runs/sft"


def test_bad_options_are_refused_as_the_command_line_refuses_them(tmp_path):
    with pytest.raises(KaikaError, match="unknown option 'lora_rank' for TrainConfig; did you mean lora_r"):
        kaika.train(lora_rank=8, output_dir=str(tmp_path / "run"))
    with pytest.raises(KaikaError, match="lr"):
        kaika.train(lr=-1.0, output_dir=str(tmp_path / "run"))
    with pytest.raises(KaikaError, match="max_new_tokens"):
        kaika.GenerateArgs(max_new_tokens=0)
    assert not (tmp_path / "run").exists()


def test_the_readme_snippet_trains_loads_and_generates(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## From Python") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 (the README's own code)
    loss, answer = capsys.readouterr().out.strip().splitlines()[-1].split(" ", 1)  # the print, after the logs
    assert float(loss) > 0 and answer.strip()
    # the run is kaika's: the command line opens it, and the API's Model is the CLI's loaded model
    from kaika.cli import main

    assert main(["generate", "runs/x", "こんにちは", "--max-new-tokens", "4"]) == 0
    model = kaika.load("runs/x")
    assert [
        g.new_tokens
        for g in model.generate_batch([{"instruction": "a"}, {"instruction": "b"}], max_new_tokens=3)
    ]
    assert kaika.generate(model, "a", max_new_tokens=3).text == model.generate("a", max_new_tokens=3).text


def test_every_verb_returns_its_result(tmp_path, monkeypatch):
    """The verbs past train/load/generate, on one tiny run: evaluation, held-out loss, merge (checked
    against the unmerged model), and the run the Python API made is the CLI's."""
    monkeypatch.chdir(tmp_path)
    run = kaika.train(base_model="tiny-bloom-ja", data="seed-tasks-ja", output_dir="runs/v", max_steps=2)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        '{"instruction": "挨拶して", "output": "こんにちは。"}\n{"instruction": "数えて", "output": "一、二、三。"}\n',
        encoding="utf-8",
    )
    losses = kaika.eval_loss(run.output_dir, heldout, batch_size=2)
    assert set(losses) == {"base", "adapter"} and all(r.tokens > 0 and r.loss > 0 for r in losses.values())
    summary = kaika.evaluate(run.output_dir, "seed-tasks-ja", limit=2, max_new_tokens=4)
    assert set(summary["models"]) == {"base", "adapter"} and summary["tasks"] == 2
    assert (tmp_path / "runs" / "v" / "eval" / "seed-tasks-ja" / "summary.json").is_file()
    choice = kaika.eval_choice(run.output_dir, "jnli", limit=3)
    assert (
        choice["items"] == 3
        and choice["models"]["adapter"]["acc_ci"][0] <= choice["models"]["adapter"]["acc"]
    )
    assert (tmp_path / "runs" / "v" / "eval" / "jnli" / "scores_adapter.jsonl").is_file()
    merged = kaika.merge(run.output_dir, "merged", dtype="float32")
    assert merged.max_abs_diff <= merged.tolerance and "config.json" in merged.files
    with pytest.raises(KaikaError, match="unknown key"):
        kaika.merge(run.output_dir, "merged2", dtype_of_weights="float16")


@pytest.mark.slow  # two more training runs: about 30 s
def test_pretrain_and_dpo_from_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(
        "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。\n" * 40, encoding="utf-8"
    )
    pre = kaika.pretrain(
        base_model="tiny-bloom-ja", data=str(text), output_dir="runs/pt", max_steps=2, cutoff_len=64
    )
    assert pre.global_step == 2 and pre.tokens_seen > 0
    sft = kaika.train(base_model="tiny-bloom-ja", data="seed-tasks-ja", output_dir="runs/sft", max_steps=2)
    pref = kaika.dpo(from_run=sft.output_dir, data="seed-prefs-ja", output_dir="runs/dpo", max_steps=2)
    assert pref.global_step == 2 and (tmp_path / "runs" / "dpo" / "adapter_model.safetensors").is_file()
