"""Task files for ``kaika eval generate``: Alpaca and ELYZA-tasks-100 forms, and their errors."""

from __future__ import annotations

import csv
import json

import pytest

from helpers import ELYZA_TASKS, write_jsonl
from kaika.data.records import DataError
from kaika.eval.answers import load_tasks

ELYZA = ELYZA_TASKS


def test_elyza_csv_and_its_alpaca_jsonl_agree():
    from_csv = load_tasks(ELYZA / "elyza_tasks_100.csv")
    from_jsonl = load_tasks(ELYZA / "elyza_tasks_100.jsonl")
    assert len(from_csv) == len(from_jsonl) == 100
    with (ELYZA / "elyza_tasks_100.csv").open(encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    for i, (task, row, alpaca) in enumerate(zip(from_csv, raw, from_jsonl, strict=True)):
        assert task == {
            "id": i,
            "instruction": row["input"],
            "input": "",
            "reference": row["output"],
            "eval_aspect": row["eval_aspect"],
        }
        # The Alpaca copy has the same task and reference but no grading notes.
        assert (alpaca["instruction"], alpaca["reference"], alpaca["eval_aspect"]) == (
            row["input"],
            row["output"],
            "",
        )
    assert all(t["eval_aspect"].strip() for t in from_csv)


def test_elyza_form_as_jsonl_and_alpaca_with_input(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"input": "猫を描写して", "output": "白い猫", "eval_aspect": "- 猫なら5点"},
            {"instruction": "要約して", "input": "吾輩は猫である。", "output": "猫の話"},
            {"instruction": "挨拶して"},  # no reference: answered, not scored against one
        ],
    )
    tasks = load_tasks(path)
    assert [(t["instruction"], t["input"], t["reference"], t["eval_aspect"]) for t in tasks] == [
        ("猫を描写して", "", "白い猫", "- 猫なら5点"),
        ("要約して", "吾輩は猫である。", "猫の話", ""),
        ("挨拶して", "", "", ""),
    ]


def test_bad_task_files_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"input": "ok", "output": "ok"}),
                json.dumps({"question": "x"}),
                json.dumps({"instruction": ""}),
                json.dumps({"input": "x", "output": 3}),
                "{broken",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError) as err:
        load_tasks(path)
    text = str(err.value)
    assert "bad.jsonl, line 2: neither Alpaca form" in text and "question" in text
    assert "line 3: field 'instruction': empty" in text
    assert "line 4: field 'output': expected a string, got int" in text
    assert "line 5: malformed JSON" in text
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("question,answer\nx,y\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv, line 2: neither Alpaca form"):
        load_tasks(bad_csv)
    empty = tmp_path / "empty.csv"
    empty.write_text("input,output,eval_aspect\n", encoding="utf-8")
    with pytest.raises(DataError, match="contains no tasks"):
        load_tasks(empty)


def test_the_shipped_copy_by_its_builtin_name():
    tasks = load_tasks("elyza-tasks-100")
    assert tasks == load_tasks(ELYZA / "elyza_tasks_100.csv")
    assert len(tasks) == 100 and all(t["eval_aspect"] for t in tasks)
