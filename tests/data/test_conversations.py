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


def test_a_saved_dataset_of_conversations(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": "問"}, {"role": "assistant", "content": "答"}]}] * 2
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recs = load_records([str(tmp_path / "ds")])
    assert [r["messages"] for r in recs] == [rows[0]["messages"]] * 2 and recs[1]["where"].endswith(
        "record 1"
    )


def test_a_users_jinja_template(tmp_path, ja_tokenizer):
    from kaika.data.prompts import load_template
    from kaika.data.segments import prompt_ids, segments, stop_ids
    from kaika.errors import KaikaError

    jinja = tmp_path / "mine.jinja"
    jinja.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    template = load_template(jinja)
    assert template.kind == "chat" and template.name == "mine"
    conv = [{"role": "user", "content": "問い"}, {"role": "assistant", "content": "答え"}]
    answer = [s for s in segments(template, ja_tokenizer, conv) if s.answer is not None]
    assert [s.text for s in answer] == ["答え</s>\n"]  # the template's own EOS ends the turn
    assert stop_ids(template, ja_tokenizer) == [ja_tokenizer.eos_token_id]
    assert ja_tokenizer.decode(prompt_ids(template, ja_tokenizer, conv[:1])) == "[user] 問い\n[assistant] "
    # saved with a run and read back, it is the same template
    saved = tmp_path / "template.json"
    saved.write_text(template.to_json())
    assert load_template(saved) == template
    bad = tmp_path / "bad.jinja"
    bad.write_text("line one\n{% for m in messages %}")
    with pytest.raises(KaikaError, match="bad: invalid Jinja at line 2"):
        load_template(bad)


def test_check_and_stats_read_conversations(tmp_path):
    from kaika.data.check import check_files
    from kaika.data.stats import data_stats

    conv = {"messages": [{"role": "user", "content": "「桜」の意味を教えてください。"},
                         {"role": "assistant", "content": "春に咲く花です。"},
                         {"role": "user", "content": "もう少し詳しく。"},
                         {"role": "assistant", "content": "「日本の国花とされる花です。"}]}  # fmt: skip
    path = write_jsonl(tmp_path / "c.jsonl", [conv, conv, {"instruction": "こんにちは", "output": "はい。"}])
    report = check_files([str(path)])
    found = {(f.kind, f.where, f.field) for f in report.findings}
    assert ("bracket_unbalanced", "line 1", "turn 3 assistant") in found
    assert ("duplicate", "line 2", None) in found
    stats = data_stats([str(path)])
    assert stats.conversations == 2 and stats.turns_per_conversation["max"] == 4
    assert {"user turn", "assistant turn", "instruction"} <= set(stats.characters)


def test_convert_command(tmp_path, capsys):
    from kaika.cli.main import main

    chats, alpaca = tmp_path / "chats.jsonl", tmp_path / "alpaca.jsonl"
    assert main(["data", "convert", "seed-tasks-ja", "--to", "messages", "-o", str(chats)]) == 0
    assert main(["data", "convert", str(chats), "--to", "alpaca", "-o", str(alpaca)]) == 0
    assert "wrote 175 record(s) as alpaca" in capsys.readouterr().out
    # Back to Alpaca: the input went into the user turn, so it comes back inside the instruction.
    back = [json.loads(line) for line in alpaca.read_text(encoding="utf-8").splitlines()]
    seeds = load_records(["seed-tasks-ja"])
    assert [b["output"] for b in back] == [s["output"] for s in seeds]
    assert all(
        b["instruction"].startswith(s["instruction"]) and b["input"] == ""
        for b, s in zip(back, seeds, strict=True)
    )
    assert (
        main(["data", "convert", "seed-chats-ja", "--to", "alpaca", "-o", str(alpaca)]) == 2
    )  # exists: a usage error
    assert "exists" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "convert",
                "seed-chats-ja",
                "--to",
                "alpaca",
                "-o",
                str(alpaca),
                "--overwrite",
                "--strict",
            ]
        )
        == 2
    )
    assert "nothing was written" in capsys.readouterr().err and len(alpaca.read_text().splitlines()) == 175


def test_a_conversation_the_template_refuses_is_named_before_the_model_loads(tmp_path, ja_tokenizer):
    from kaika.data.examples import encode_records
    from kaika.data.prompts import load_template
    from kaika.errors import KaikaError

    jinja = tmp_path / "strict.jinja"
    jinja.write_text(
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    two = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", [ok, two])
    records = load_records([str(path)])  # valid as data: kaika's templates join the two user turns
    with pytest.raises(
        KaikaError, match=r"d.jsonl, line 2: the chat template strict cannot render .*alternate"
    ):
        encode_records(records, load_template(jinja), ja_tokenizer, 64)


def test_a_chat_template_without_a_generation_prompt_and_one_that_fails_silently_are_named(
    tmp_path, ja_tokenizer
):
    from kaika.data.prompts import load_template
    from kaika.data.segments import segments
    from kaika.errors import KaikaError

    conv = [{"role": "user", "content": "問い"}, {"role": "assistant", "content": "答え"}]
    no_prompt = tmp_path / "nogen.jinja"  # ignores add_generation_prompt: the header would be trained
    no_prompt.write_text(
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    with pytest.raises(KaikaError, match="nogen writes no generation prompt"):
        segments(load_template(no_prompt), ja_tokenizer, conv)
    silent = tmp_path / "silent.jinja"  # raises with no message
    silent.write_text("{{ raise_exception('') }}")
    with pytest.raises(
        KaikaError, match="cannot render this conversation: TemplateError raised with no message"
    ):
        segments(load_template(silent), ja_tokenizer, conv)
