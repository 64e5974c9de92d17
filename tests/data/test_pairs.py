"""Preference pairs: every form read, every problem named with file, line and field, and the ids
exactly those training and generation use."""

from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from kaika.data.preference import encode_pairs, load_pairs
from kaika.data.prompts import load_template, resolve_template
from kaika.data.records import DataError
from kaika.data.segments import prompt_ids, record_prompt_ids, stop_ids
from kaika.data.tokenize import encode_example
from kaika.errors import KaikaError


def test_every_form_reads_to_a_prompt_and_two_answers(tmp_path):
    turns = [{"role": "system", "content": "丁寧に。"}, {"role": "user", "content": "こんにちは"}]
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "首都は？", "chosen": "東京", "rejected": "大阪"},
            {"instruction": "訳して", "input": "cat", "chosen": "猫", "rejected": "犬"},
            {"messages": turns, "chosen": {"role": "assistant", "content": "はい"}, "rejected": "いいえ"},
            {"prompt": turns, "chosen": [{"role": "assistant", "content": "はい"}], "rejected": "ええ"},
            {  # the implicit-prompt form: two whole conversations that share their prompt
                "chosen": [*turns, {"role": "assistant", "content": "はい"}],
                "rejected": [*turns, {"from": "gpt", "value": "だめ"}],
            },
        ],
    )
    pairs = load_pairs([str(path)])
    assert [(p.get("instruction"), p.get("input")) for p in pairs[:2]] == [
        ("首都は？", ""),
        ("訳して", "cat"),
    ]
    assert all(p["messages"] == turns for p in pairs[2:])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("東京", "大阪"), ("猫", "犬"), ("はい", "いいえ"), ("はい", "ええ"), ("はい", "だめ"),
    ]  # fmt: skip
    assert pairs[4]["where"] == f"{path}, line 5"


def test_columns_rename_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "首都は？", "good": "東京", "bad": "大阪"}])
    (pair,) = load_pairs([str(path)], {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert (pair["instruction"], pair["chosen"], pair["rejected"]) == ("首都は？", "東京", "大阪")


def test_every_problem_is_named_with_its_line_and_field_before_anything_loads(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": "a", "chosen": "同じ", "rejected": " 同じ "},  # 1
        {"prompt": "a", "chosen": "", "rejected": "b"},  # 2
        {"prompt": "a", "rejected": "b"},  # 3
        {"prompt": "a", "chosen": {"role": "user", "content": "x"}, "rejected": "b"},  # 4
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "chosen": "a", "rejected": "b"},  # 5
        {"chosen": "a", "rejected": "b"},  # 6
        {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "b"}]},  # 7
        {"prompt": "a", "chosen": 3, "rejected": "b"},  # 8
    ]  # fmt: skip
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{broken\n", encoding="utf-8"
    )
    with pytest.raises(DataError) as err:
        load_pairs([str(path)])
    text = str(err.value)
    for expected in (
        "line 1: chosen and rejected are the same answer",
        "line 2: field 'chosen': empty",
        "line 3: field 'chosen': missing",
        "line 4: field 'chosen': must be the assistant's answer",
        "line 5, turn 1: the prompt must end with a user turn",
        "line 6: no prompt",
        "line 7: chosen and rejected are whole conversations that differ before their last turn",
        "line 8: field 'chosen': expected a string, got int",
        "line 9: malformed JSON",
    ):
        assert expected in text, text
    assert len(err.value.problems) == 9


def test_alpaca_pairs_encode_exactly_as_kaika_train_encodes_the_record(ja_tokenizer):
    template = load_template("alpaca_ja")
    pair = {"instruction": "次の文を要約してください。", "input": "吾輩は猫である。名前はまだ無い。",
            "chosen": "猫の自己紹介です。", "rejected": "犬です。", "where": "f, line 1"}  # fmt: skip
    (row,), report = encode_pairs([pair], template, ja_tokenizer, 512)
    assert row["prompt_ids"] == record_prompt_ids(template, ja_tokenizer, pair)  # what generate sends
    for side in ("chosen", "rejected"):
        train = encode_example(
            ja_tokenizer, template.format(pair["instruction"], pair["input"]), pair[side], 512
        )
        assert row["prompt_ids"] + row[f"{side}_ids"] == train.input_ids  # what kaika train trains on
        assert row[f"{side}_ids"][-1] == ja_tokenizer.eos_token_id
    assert report.kept == 1 and report.chosen_truncated == report.rejected_truncated == 0


def test_chat_template_pairs_end_with_the_end_of_turn_and_prompt_as_generation(gemma_tokenizer):
    tokenizer = gemma_tokenizer
    template = resolve_template("chat", tokenizer)
    turns = [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "やあ"},
             {"role": "user", "content": "元気？"}]  # fmt: skip
    pair = {"messages": turns, "chosen": "元気です。", "rejected": "知らない。", "where": "f, line 1"}
    (row,), _ = encode_pairs([pair], template, tokenizer, 512)
    assert row["prompt_ids"] == prompt_ids(template, tokenizer, turns)
    end_of_turn = set(stop_ids(template, tokenizer)) - {tokenizer.eos_token_id}
    assert end_of_turn and all(row[f"{s}_ids"][-2] in end_of_turn for s in ("chosen", "rejected"))
    assert tokenizer.decode(row["chosen_ids"]).startswith("元気です。")


def test_long_answers_are_cut_keeping_the_end_and_long_prompts_left_out_as_train_does(ja_tokenizer):
    template = load_template("alpaca_ja")
    long = {
        "instruction": "書いて",
        "input": "",
        "chosen": "猫" * 400,
        "rejected": "犬",
        "where": "a.jsonl, line 1",
    }
    (row,), report = encode_pairs([long], template, ja_tokenizer, 64)
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == 64
    assert row["chosen_ids"][-1] == ja_tokenizer.eos_token_id and report.chosen_truncated == 1
    huge = {**long, "instruction": "長い" * 200, "where": "a.jsonl, line 7"}
    rows, report = encode_pairs([long, huge], template, ja_tokenizer, 64)
    assert len(rows) == report.kept == 1 and report.dropped_prompt_too_long == 1
    assert "1/2 pairs kept (1 dropped: prompt longer than cutoff_len 64" in report.summary()
    with pytest.raises(KaikaError, match="no preference pair fits cutoff_len 64"):
        encode_pairs([huge], template, ja_tokenizer, 64)


def test_the_shipped_preference_set_is_valid_and_prefers_the_tasks_own_answers():
    from helpers import seed_records

    pairs = load_pairs(["seed-prefs-ja"])
    assert len(pairs) == 154
    tasks = [t for t in seed_records() if len(t["instruction"]) + len(t["input"]) <= 200]
    assert [p["chosen"] for p in pairs] == [t["output"] for t in tasks]
    runon = pairs[0::2]
    assert all(p["rejected"].startswith(p["chosen"] + "\n\n### 指示:\n") for p in runon)
    assert all("### 指示:" not in p["rejected"] and p["rejected"] != p["chosen"] for p in pairs[1::2])
