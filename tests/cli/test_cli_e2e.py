"""The installed ``kaika`` command, as a user runs it: train on the builtin model, then generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import seed_records, write_jsonl

pytestmark = pytest.mark.slow


def kaika(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kaika", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_train_then_generate_from_the_command_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", seed_records(24, max_chars=150))
    run = kaika(
        "train",
        "--data",
        str(data),
        "--output-dir",
        "out",
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--cutoff-len",
        "128",
        "--val-set-size",
        "0.25",
        "--lora-r",
        "4",
        "--eval-steps",
        "2",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "verified: the saved adapter is the trained one" in run.stderr
    assert "adapter saved to out — 3 steps" in run.stdout
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["records"] == 18 and report["kept"] + report["dropped_prompt_too_long"] == 18

    again = kaika("train", "--data", str(data), "--output-dir", "out", "--max-steps", "1", cwd=tmp_path)
    assert again.returncode == 2 and "is not empty" in again.stderr

    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [{"instruction": "挨拶してください。"}, {"instruction": "要約して", "input": "吾輩は猫である。"}],
    )
    gen = kaika(
        "generate",
        "out",
        "--file",
        str(prompts),
        "--output",
        "answers.jsonl",
        "--max-new-tokens",
        "8",
        cwd=tmp_path,
    )
    assert gen.returncode == 0, gen.stderr
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["instruction"] for a in answers] == ["挨拶してください。", "要約して"]
    assert all(0 < a["new_tokens"] <= 8 or a["stopped"] for a in answers)

    one = kaika(
        "generate", "out", "日本の首都はどこですか？", "--max-new-tokens", "4", "--no-stream", cwd=tmp_path
    )
    assert one.returncode == 0, one.stderr

    missing = kaika("generate", str(tmp_path), "hi", cwd=tmp_path)
    assert missing.returncode == 2 and "adapter_config.json is missing" in missing.stderr
