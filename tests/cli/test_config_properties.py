"""Property tests of the CLI's config layer: any value a user can type for any option of
``kaika train`` or ``kaika pretrain`` gives a clear error (argparse's usage error or a
``KaikaError``) or a config that passes every check, never a traceback, and nothing is written
anywhere before training starts."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import seed_records, write_jsonl
from kaika.cli import build_parser
from kaika.cli.options import namespace_overrides
from kaika.config import PretrainConfig, TrainConfig, check, resolve_config
from kaika.errors import KaikaError
from kaika.training.pretrain import check_pretrain_config
from kaika.training.sft import check_config

OPTIONS = {
    "train": [
        "--lr", "--epochs", "--max-steps", "--batch-size", "--micro-batch-size", "--cutoff-len",
        "--val-set-size", "--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target", "--lora-bias",
        "--lora-qkv", "--scheduler", "--warmup-steps", "--weight-decay", "--seed", "--eval-steps",
        "--save-steps", "--save-total-limit", "--logging-steps", "--dtype", "--quantization",
        "--attention", "--template", "--columns", "--output-dir",
    ],
    "pretrain": [
        "--lr", "--epochs", "--max-steps", "--batch-size", "--micro-batch-size", "--cutoff-len",
        "--val-set-size", "--packing", "--seed", "--dtype", "--text-field", "--vocab-size", "--save-dtype",
        "--from-scratch", "--tokenizer", "--output-dir",
    ],
}  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(
        ["0", "-1", "1", "2", "1e-3", "-1e-3", "nan", "inf", "-inf", "1e309", "0.5", "1.5", "99999999999999999999",
         "", " ", "auto", "none", "bogus", "query_key_value", "all-linear", "q,v", "a=b", "=", "../x", "/dev/null"]
    ),
    st.text(max_size=12),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)  # fmt: skip


def flags(command: str):
    return st.lists(st.tuples(st.sampled_from(OPTIONS[command]), VALUES), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    write_jsonl(root / "train.jsonl", seed_records(8, max_chars=80))
    (root / "text.txt").write_text("吾輩は猫である。名前はまだ無い。\n" * 20, encoding="utf-8")
    return root


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["train", "pretrain"]), data=st.data())
def test_any_option_value_is_a_clear_error_or_a_checked_config(workdir, command, data):
    pairs = data.draw(flags(command))
    source = "train.jsonl" if command == "train" else "text.txt"
    argv = [command, "--data", source, "--base-model", "tiny-bloom-ja", "--output-dir", "runs/x"]
    for flag, value in pairs:
        argv += [f"{flag}={value}"]  # "=" so values that start with "-" stay values
    before = snapshot(workdir)
    cwd = os.getcwd()
    os.chdir(workdir)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            try:
                ns = build_parser().parse_args(argv)
            except SystemExit as e:
                assert e.code == 2 and "error:" in stderr.getvalue(), stderr.getvalue()
                event("usage error")
                return
        cls, checker = (
            (TrainConfig, check_config) if command == "train" else (PretrainConfig, check_pretrain_config)
        )
        try:
            cfg = resolve_config(cls, ns.config, namespace_overrides(ns))
            checker(cfg)
        except KaikaError as e:
            assert str(e).strip() and "Traceback" not in str(e)
            event("KaikaError")
            return
        event("valid config")
        check(cfg)  # a config that got through is one every later check accepts too
    finally:
        os.chdir(cwd)
        assert snapshot(workdir) == before, "the config layer wrote files"


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_option_drawn_exists(command):
    # An option the parser does not know would make every draw a usage error, and the property vacuous.
    known = set(build_parser()._subparsers._group_actions[0].choices[command]._option_string_actions)
    assert set(OPTIONS[command]) <= known, set(OPTIONS[command]) - known
