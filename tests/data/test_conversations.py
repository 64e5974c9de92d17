"""Conversation records: OpenAI messages, ShareGPT, mixed with Alpaca, and what is refused where."""

from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from kaika.data.conversations import to_alpaca, to_messages
from kaika.data.records import DataError, load_records


def test_messages_sharegpt_and_alpaca_mix(tmp_path):
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "丁寧に"}, {"role": "user", "content": "こんにちは"},
        {"role": "assistant", "content": [{"type": "text", "text": "はい、"}, {"type": "text", "text": "どうぞ。"}]}]}])  # fmt: skip
    share = tmp_path / "s.json"
    share.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "一"}, {"from": "gpt", "value": "二"},
        {"from": "human", "value": "三"}, {"from": "gpt", "value": "四"}]}], ensure_ascii=False))  # fmt: skip
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "input": "", "output": "o"}])
    recs = load_records([str(msgs), str(share), str(alpaca)])
    assert recs[0]["messages"] == [{"role": "system", "content": "丁寧に"}, {"role": "user", "content": "こんにちは"},
                                   {"role": "assistant", "content": "はい、どうぞ。"}]  # fmt: skip
    assert [m["role"] for m in recs[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert recs[1]["where"] == f"{share}, line 1 (record 0)"
    assert recs[2] == {"instruction": "i", "input": "", "output": "o"}


def test_columns_map_other_names(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"dialogue": [{"speaker": "user", "text": "q"},
                                                            {"speaker": "assistant", "text": "a"}]}])  # fmt: skip
    recs = load_records([str(path)], {"messages": "dialogue", "role": "speaker", "content": "text"})
    assert recs[0]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_every_problem_is_named_with_file_line_and_turn(tmp_path):
    bad = [
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "y"},
            ]
        },  # fmt: skip
        {"messages": [{"role": "assistant", "content": "y"}]},
        {"messages": []},
        {"conversations": "not a list"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError) as e:
        load_records([str(path)])
    text = str(e.value)
    for expected in (
        "line 1, turn 0: field 'role': role 'robot' is not one of",
        "line 2, turn 0: field 'content': empty",
        "line 3, turn 0: the conversation must end with an assistant turn",
        "line 4, turn 0: field 'content': expected a string (got int)",
        "line 5, turn 1: a system turn must come before the first user turn",
        "line 6, turn 0: the first turn after the system prompt must be the user's",
        "line 7: field 'messages': the conversation has no turns",
        "line 8: field 'conversations': expected a list of turns, got str",
    ):
        assert expected in text, (expected, text)
    assert len(e.value.problems) == len(bad)


def test_alpaca_and_messages_convert_where_they_can():
    rec = {"instruction": "訳して", "input": "hello", "output": "こんにちは"}
    msgs = to_messages(rec)
    assert msgs == [
        {"role": "user", "content": "訳して\n\nhello"},
        {"role": "assistant", "content": "こんにちは"},
    ]
    assert to_alpaca(msgs) == {"instruction": "訳して\n\nhello", "input": "", "output": "こんにちは"}
    system = [{"role": "system", "content": "s"}, *msgs]
    assert to_alpaca(system)["input"] == "s"
    assert to_alpaca(msgs + msgs) is None  # two exchanges: no Alpaca record holds them
