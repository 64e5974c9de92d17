"""The judge path against a real OpenAI-compatible HTTP server on 127.0.0.1 (official openai client)."""

from __future__ import annotations

import json

import pytest

from judge_server import JudgeServer
from kaika.errors import KaikaError
from kaika.eval.judge import JUDGE_PROMPT, PROMPT_FILE, JudgeSettings, judge_runs

TASKS = [
    {"instruction": "猫の鳴き声を答えて", "reference": "にゃー", "eval_aspect": "- 「にゃー」なら5点"},
    {"instruction": "犬の鳴き声を答えて", "reference": "わん", "eval_aspect": "- 「わん」以外は2点"},
    {"instruction": "牛の鳴き声を答えて", "reference": "もー", "eval_aspect": "- 擬音語であれば4点以上"},
]


def rows(responses):
    return [
        {"id": i, "input": "", **t, "response": r}
        for i, (t, r) in enumerate(zip(TASKS, responses, strict=True))
    ]


def reply(prompt: str) -> tuple[int, str]:
    """Judge by task; refuse any prompt that lacks the task's grading notes and reference."""
    task = next((t for t in TASKS if t["instruction"] in prompt), None)
    if task is None or task["eval_aspect"] not in prompt or task["reference"] not in prompt:
        return 400, "the prompt lacks the task, its reference or its grading notes"
    if task is TASKS[0]:
        return 200, "参考回答と一致しています。\n点数：５"
    if task is TASKS[1]:
        return 200, "この回答は採点できません。"  # no score: unparseable
    return 400, "intentional failure for the third task"


def test_judge_scores_counts_and_saves(tmp_path):
    answers = {"base": rows(["わからない", "ワン", "モー"]), "adapter": rows(["にゃー", "わん", "もー"])}
    with JudgeServer(reply, api_key="sk-test") as server:
        settings = JudgeSettings(server.url, model="my-judge", api_key="sk-test", concurrency=2)
        settings.check()
        result = judge_runs(settings, answers, tmp_path)
    assert len(server.requests) == 6
    assert {r["model"] for r in server.requests} == {"my-judge"}
    assert all(r["temperature"] == 0 for r in server.requests)
    prompts = [r["messages"][-1]["content"] for r in server.requests]
    for t in TASKS:  # each task's grading notes reached the judge, once per model
        assert sum(t["eval_aspect"] in p for p in prompts) == 2
    assert sum("にゃー" in p and "## 回答\nにゃー" in p for p in prompts) == 1

    for name in ("base", "adapter"):
        assert result["models"][name] == {
            "judge_mean": 5.0,
            "judge_parsed": 1,
            "judge_unparseable": 1,
            "judge_errors": 1,
        }
        assert [r["judge_score"] for r in answers[name]] == [5.0, None, None]
        saved = [json.loads(line) for line in (tmp_path / f"judgments_{name}.jsonl").read_text().splitlines()]
        assert [s["judgment"] for s in saved[:2]] == [
            "参考回答と一致しています。\n点数：５",
            "この回答は採点できません。",
        ]
        assert saved[2]["judgment"] is None and "intentional failure" in saved[2]["error"]
        assert all(s["prompt"].startswith("あなたは日本語の回答を") for s in saved)
    assert (tmp_path / PROMPT_FILE).read_text(encoding="utf-8") == JUDGE_PROMPT


def test_judge_wrong_key_fails_clearly(tmp_path):
    with JudgeServer(reply, api_key="sk-right") as server:
        settings = JudgeSettings(server.url, api_key="sk-wrong")
        with pytest.raises(KaikaError, match="every judge request .* failed.*AuthenticationError"):
            judge_runs(settings, {"adapter": rows(["a", "b", "c"])}, tmp_path)
    assert server.requests == [] and len(server.rejected) == 3


def test_judge_url_is_checked():
    with pytest.raises(KaikaError, match="base URL of an OpenAI-compatible API"):
        JudgeSettings("127.0.0.1:8000").check()
