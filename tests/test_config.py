"""Typed config: YAML and command line map onto the same dataclasses; every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from kaika.cli import build_parser
from kaika.cli.options import namespace_overrides
from kaika.config import TrainConfig, load_train_config, resolve_train_config, save_yaml
from kaika.errors import KaikaError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
RECIPE_FLAGS = [
    "--base-model",
    "--data",
    "--output-dir",
    "--template",
    "--cutoff-len",
    "--batch-size",
    "--micro-batch-size",
    "--epochs",
    "--max-steps",
    "--lr",
    "--val-set-size",
    "--lora-r",
    "--lora-alpha",
    "--lora-dropout",
    "--lora-target",
    "--train-on-inputs",
    "--seed",
    "--resume",
    "--overwrite",
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_train_config(path)
    assert cfg.data.data and cfg.train.batch_size % cfg.train.micro_batch_size == 0


def test_shipped_configs_include_the_bloom_recipes():
    assert {"quickstart.yaml", "bloom-560m-ja.yaml", "bloom-1b1-ja.yaml"} <= {p.name for p in CONFIGS}


def test_recipe_flags_exist_and_override_yaml(tmp_path):
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in RECIPE_FLAGS:
        assert flag in help_text
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("lora: {r: 4}\ntrain: {epochs: 2, lr: 0.001}\n", encoding="utf-8")
    ns = build_parser().parse_args(
        [
            "train",
            "-c",
            str(cfg_path),
            "--lora-r",
            "16",
            "--train.epochs",
            "5",
            "--data",
            "a.jsonl",
            "b.jsonl",
            "--lora-target",
            "q_proj",
            "v_proj",
            "--train-on-inputs",
            "--columns",
            "output=response",
        ]
    )
    cfg = resolve_train_config(str(cfg_path), namespace_overrides(ns))
    assert (cfg.lora.r, cfg.train.epochs, cfg.train.lr) == (16, 5.0, 0.001)
    assert cfg.data.data == ["a.jsonl", "b.jsonl"] and cfg.lora.target == ["q_proj", "v_proj"]
    assert cfg.data.train_on_inputs is True and cfg.data.columns == {"output": "response"}


def test_resolved_config_round_trips(tmp_path):
    cfg = TrainConfig()
    cfg.lora.r, cfg.data.data = 32, ["x.jsonl"]
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_train_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {epoch: 3}\n", "unknown key(s) epoch"),
        ("lora: {r: eight}\n", "lora.r: expected int"),
        ("lora: {r: true}\n", "lora.r: expected int"),
        ("train: {resume: maybe}\n", "expected true or false"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("model: [\n", "invalid YAML"),
    ],
)
def test_bad_config_is_a_message(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KaikaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(path)


@pytest.mark.parametrize(
    ("model_type", "targets"),
    [
        ("bloom", ["query_key_value"]),
        ("gpt_neox", ["query_key_value"]),
        ("falcon", ["query_key_value"]),
        ("gpt2", ["c_attn"]),
        ("llama", ["q_proj", "v_proj"]),
        ("mistral", ["q_proj", "v_proj"]),
        ("qwen2", ["q_proj", "v_proj"]),
        ("gemma", ["q_proj", "v_proj"]),
        ("opt", ["q_proj", "v_proj"]),
    ],
)
def test_default_lora_targets(model_type, targets):
    from kaika.config import LoraArgs
    from kaika.modeling.lora import resolve_targets

    assert resolve_targets(LoraArgs(), model_type) == targets
    assert resolve_targets(LoraArgs(target=["all-linear"]), model_type) == "all-linear"
    assert resolve_targets(LoraArgs(target=["q_proj,k_proj", "v_proj"]), model_type) == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    with pytest.raises(KaikaError, match="no default LoRA target"):
        resolve_targets(LoraArgs(), "some_new_arch")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {scheduler: cosin}\n", "c.yaml.train.scheduler: 'cosin' is not one of linear, cosine"),
        ("model: {attention: flash}\n", "c.yaml.model.attention: 'flash' is not one of sdpa, eager"),
        ("model: {dtype: fp8}\n", "c.yaml.model.dtype: 'fp8' is not one of auto, float32"),
        ("lora: {bias: weird}\n", "c.yaml.lora.bias: 'weird' is not one of none, all, lora_only"),
        ("train: {lr: -0.001}\n", "c.yaml.train.lr: must be > 0, got -0.001"),
        ("train: {lr: .nan}\n", "c.yaml.train.lr: expected a finite number"),
        ("train: {micro_batch_size: 0}\n", "c.yaml.train.micro_batch_size: must be >= 1, got 0"),
        ("lora: {dropout: 1.5}\n", "c.yaml.lora.dropout: must be < 1, got 1.5"),
        ("data: {cutoff_len: 1}\n", "c.yaml.data.cutoff_len: must be >= 2, got 1"),
    ],
)
def test_choices_and_bounds_fail_when_the_config_is_built(tmp_path, text, message):
    """Before any data is read or model loaded: the config object cannot even be made."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KaikaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(path)


def test_python_built_configs_are_checked_too():
    from kaika.config import ModelArgs, TrainArgs, check

    with pytest.raises(KaikaError, match="TrainArgs.scheduler: 'cosin' is not one of"):
        TrainArgs(scheduler="cosin")
    cfg = TrainConfig()
    cfg.model = ModelArgs()
    cfg.train.lr = 0.0  # assigned after building: train() checks again before reading data
    with pytest.raises(KaikaError, match="TrainConfig.train.lr: must be > 0"):
        check(cfg)


def test_choices_become_argparse_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "--scheduler", "cosin"])
    assert exit_.value.code == 2
    assert "invalid choice: 'cosin'" in capsys.readouterr().err


def test_the_scheduler_choices_are_what_transformers_builds_from_a_name_alone():
    """Each choice builds a schedule that warms up and moves the learning rate; every other schedule of
    transformers needs more than a name (extra arguments, or a metric at each step), so it is left out."""
    import typing

    import torch
    from transformers import SchedulerType, get_scheduler

    from kaika.config import Scheduler

    def lrs(name):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10)
        out = []
        for _ in range(10):
            out.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return out

    for name in typing.get_args(Scheduler):
        values = lrs(name)
        assert all(0.0 <= v <= 1.0 for v in values), (name, values)
        if name != "constant":
            assert values[0] < values[2], (name, values)  # the warmup
        assert len(set(values)) > 1 or name == "constant", (name, values)
    needs_a_metric = {"reduce_lr_on_plateau", "greedy"}  # stepped with the eval loss: not by name alone
    for other in {s.value for s in SchedulerType} - set(typing.get_args(Scheduler)) - needs_a_metric:
        with pytest.raises((ValueError, TypeError)):
            lrs(other)


def test_an_empty_yaml_value_is_an_error_not_the_string_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  output_dir:\n", encoding="utf-8")
    with pytest.raises(KaikaError, match="c.yaml.train.output_dir: a value is needed"):
        load_train_config(path)


def test_each_limit_is_stated_once():
    """Options one command borrows from another's config carry its declared check, and a choice list
    copied from the module that implements it equals it."""
    import typing

    from kaika.cli import main
    from kaika.config import GgufQuant
    from kaika.modeling.to_gguf import QUANTS

    assert typing.get_args(GgufQuant) == tuple(QUANTS)
    for argv in (["eval", "loss", "run", "d.jsonl", "--cutoff-len", "1"], ["data", "check", "d.jsonl", "--cutoff-len", "1"],
                 ["data", "stats", "d.jsonl", "--cutoff-len", "1"], ["train", "--cutoff-len", "1"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    with pytest.raises(SystemExit):
        main(["serve", "--queue-size", "-1"])
    with pytest.raises(KaikaError, match="unknown key"):
        import kaika

        kaika.export("run", "out", quant_type="q8_0")
