"""Japanese MT-Bench and ``kaika eval suite`` end to end: a tiny adapter answers, a real local
OpenAI-compatible server judges (tests/judge_server.py), the report is read back.

The judge's taste is not under test; its plumbing is: MT-Bench's prompts per turn and category, the
model's own first answer inside the second turn's prompt, the references for math, reasoning and
coding, ``[[N]]`` parsing, failures named and the other results kept."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adapters import tiny_adapters  # noqa: F401  (fixture)
from judge_server import JudgeServer, mt_bench_reply
from kaika.eval.mtbench import load_questions, parse_rating


@pytest.mark.parametrize(
    ("reply", "rating"),
    [("評価：[[5]]", 5), ("Rating: [[8.5]]", 8.5), ("[[2]] then [[9]]", 9), ("評価: [6]", 6),
     ("評価：［［７］］", 7), ("[[0]]", None), ("[[11]]", None), ("no rating", None), (None, None)],
)  # fmt: skip
def test_parse_rating(reply, rating):
    assert parse_rating(reply) == rating


def test_questions_and_references():
    qs = load_questions()
    assert len(qs) == 80 and {q["category"] for q in qs} == {
        "coding", "extraction", "humanities", "math", "reasoning", "roleplay", "stem", "writing"}  # fmt: skip
    assert all((q["reference"] is not None) == (q["category"] in ("math", "reasoning", "coding")) for q in qs)
    two = load_questions(per_category=2)
    assert len(two) == 16 and all(sum(q["category"] == c["category"] for q in two) == 2 for c in two)


def kaika(*args, cwd, check=True) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "kaika", *args], cwd=cwd, capture_output=True, text=True)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_mt_bench_judged_end_to_end(tmp_path, tiny_adapters):  # noqa: F811
    with JudgeServer(mt_bench_reply) as server:
        kaika("eval", "mt-bench", str(tiny_adapters[0]), "--categories", "coding", "math", "--limit", "3",
              "--judge", server.url, "--judge-model", "mt-judge", "--max-new-tokens", "12",
              "--output-dir", "mt", cwd=tmp_path)  # fmt: skip
    out = tmp_path / "mt"
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["kind"] == "mt-bench" and summary["questions"] == 3
    assert len(server.requests) == 3 * 2 * 2  # questions × turns × (base, adapter)
    by_turn = {1: [], 2: []}
    for body in server.requests:
        system, user = body["messages"]
        by_turn[2 if "Assistant A's Conversation" in user["content"] else 1].append((system, user))
    assert all(s["content"] == "あなたは有益な助手です。" for s, _ in by_turn[1])
    assert all(s["content"].startswith("Please act as an impartial judge") for s, _ in by_turn[2])
    rows = [json.loads(x) for x in (out / "answers_adapter.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["category"] for r in rows] == ["coding", "coding", "coding"]
    for r in rows:  # turn 2 was graded on the model's own first answer, with the references (coding)
        assert len(r["answers"]) == 2 and r["reference"] is not None
        prompt = next(
            u["content"]
            for _, u in by_turn[2]
            if r["turns"][1] in u["content"] and r["answers"][1] in u["content"]
        )
        assert f"### Assistant A:\n{r['answers'][0]}\n\n### User:\n{r['turns'][1]}" in prompt
        assert r["reference"][1] in prompt and "<|The Start of Reference Answer|>" in prompt
    assert [r["scores"] for r in rows] == [[None, 3.0], [7.0, 3.0], [7.0, 3.0]]
    m = summary["models"]["adapter"]
    assert (m["turn_1"], m["turn_2"], m["score"]) == (7.0, 3.0, pytest.approx(23 / 5))
    assert summary["judge"]["models"]["adapter"]["judge_unparseable"] == 1
    assert "Judged by `mt-judge`" in (out / "summary.md").read_text(encoding="utf-8")
