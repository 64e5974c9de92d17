"""kaika data check / stats on hand-made records with known problems (and on clean ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import seed_records, write_jsonl
from kaika.cli import main
from kaika.data.check import (
    KINDS,
    CheckOptions,
    FixOptions,
    bracket_issues,
    check_files,
    fix_files,
    fix_text,
)
from kaika.data.stats import data_stats
from kaika.errors import KaikaError

# Twenty clean Japanese records of similar length: the background every case is checked against.
CLEAN = [
    {
        "instruction": f"{i}番目の質問に答えてください。",
        "input": "",
        "output": f"これは{i}番目の答えで、問題はありません。",
    }
    for i in range(20)
] + [
    {
        "instruction": "「吾輩は猫である」の作者は？",
        "input": "",
        "output": "夏目漱石（なつめ そうせき）です。",
    },
    {"instruction": "次の文を英訳してください。", "input": "猫が好きです。", "output": "I like cats."},
    {"instruction": "リストを作ってください。", "input": "", "output": "1) りんご 2) みかん :) 【果物】"},
    {
        "instruction": "次のコードを説明してください。",
        "input": "```python\n# 合計を計算する\ntotal = sum(values)  # see https://example.com/(docs)\n```",
        "output": "`sum(` 関数で合計を求めています（リストの和）。",
    },
]

# kind -> (record, field it must name, text the message must contain)
CASES = {
    "missing_field": ({"instruction": "出力がありません。", "input": ""}, "output", "missing"),
    "not_string": ({"instruction": "数値の出力", "input": "", "output": 5}, "output", "string"),
    "empty_field": ({"instruction": "空の出力", "input": "", "output": "  "}, "output", "empty"),
    "duplicate": (CLEAN[3], None, "same as line 4"),
    "near_duplicate": (
        {
            "instruction": "３番目の質問に答えてください",
            "input": "",
            "output": "これは3番目の答えで 問題はありません！",
        },
        None,
        "same as line 4",
    ),
    "same_prompt": (
        {"instruction": CLEAN[5]["instruction"], "input": "", "output": "別の答えです。"},
        None,
        "line 6",
    ),
    "output_copies_input": (
        {"instruction": "要約してください。", "input": "短い文です。", "output": "短い文です。"},
        "output",
        "input",
    ),
    "bracket_unbalanced": (
        {"instruction": "波ではなく、神の手を見る」の意味を説明する。", "input": "", "output": "比喩です。"},
        "instruction",
        "」 at column 13 has no opening 「; probably lost at the start of the sentence (column 1)",
    ),
    "bracket_mixed_width": (
        {"instruction": "東京（とうきょう)とは？", "input": "", "output": "首都です。"},
        "instruction",
        "（ at column 3 is closed by )",
    ),
    "residual_english": (
        {
            "instruction": "説明してください。",
            "input": "",
            "output": "This answer was left in English by the translator.",
        },
        "output",
        "100% of letters are Latin",
    ),
    "untranslated_comment": (
        {
            "instruction": "コードを書いてください。",
            "input": "",
            "output": "例です。\n```python\n# compute the sum of the list\nx = sum(xs)\n```",
        },
        "output",
        "compute the sum",
    ),
    "width": (
        {"instruction": "ｶﾀｶﾅの質問", "input": "", "output": "答えです。"},
        "instruction",
        "NFKC gives 'カタカナ'",
    ),
    "bad_char": (
        {"instruction": "壊れた\ufffd文字", "input": "", "output": "答えです。"},
        "instruction",
        "U+FFFD",
    ),
    "whitespace": (
        {"instruction": "空白があります。 ", "input": "", "output": "答えです。"},
        "instruction",
        "whitespace",
    ),
    "length_outlier": (
        {"instruction": "長い答え", "input": "", "output": "とても長い答えです。" * 200},
        "output",
        "2,000 characters",
    ),
}


def test_clean_records_have_no_findings(tmp_path):
    report = check_files([str(write_jsonl(tmp_path / "clean.jsonl", CLEAN))])
    assert report.records == len(CLEAN)
    assert report.japanese == {str(tmp_path / "clean.jsonl"): True}
    assert report.findings == [], [f"{f.kind}: {f.message}" for f in report.findings]


@pytest.mark.parametrize("kind", list(CASES))
def test_each_check_finds_its_problem(tmp_path, kind):
    rec, fld, text = CASES[kind]
    path = write_jsonl(tmp_path / "d.jsonl", [*CLEAN, rec])
    report = check_files([str(path)])
    found = [f for f in report.findings if f.kind == kind]
    assert len(found) == 1, [f"{f.kind}: {f.message}" for f in report.findings]
    (f,) = found
    assert (f.index, f.where, f.field, f.severity) == (
        len(CLEAN),
        f"line {len(CLEAN) + 1}",
        fld,
        KINDS[kind][0],
    )
    assert text in f.message
    others = {x.kind for x in report.findings} - {kind}
    allowed = {"near_duplicate": {"width"}, "width": set(), "untranslated_comment": set()}.get(kind, set())
    assert others <= allowed, others


def test_unreadable_line_and_duplicates_across_files(tmp_path):
    a = write_jsonl(tmp_path / "train.jsonl", CLEAN)
    b = tmp_path / "eval.jsonl"
    b.write_text(json.dumps(CLEAN[7], ensure_ascii=False) + "\n{not json\n[1, 2]\n", encoding="utf-8")
    report = check_files([str(a), str(b)])
    kinds = [(f.kind, Path(f.source).name, f.where) for f in report.findings]
    assert ("duplicate", "eval.jsonl", "line 1") in kinds  # a train/eval overlap
    assert ("unreadable", "eval.jsonl", "line 2") in kinds  # malformed JSON
    assert ("unreadable", "eval.jsonl", "line 3") in kinds  # not an object
    dup = next(f for f in report.findings if f.kind == "duplicate")
    assert dup.message == "same as train.jsonl line 8"


def test_brackets():
    assert bracket_issues("「正しい」『二重』（括弧）【見出し】") == []
    assert bracket_issues("1) 一つ目 2) 二つ目 :) (a)") == []
    msgs = [i.message for i in bracket_issues("「開いたまま（閉じない")]
    assert msgs == ["「 at column 1 is never closed", "（ at column 7 is never closed"]
    # a closer that skips an unclosed inner opener: the inner one is reported, the pair matches
    assert [i.message for i in bracket_issues("「外（内」")] == ["（ at column 3 is never closed"]
    (mixed,) = bracket_issues("(全角で閉じる）")
    assert mixed.fix == (7, "）", ")")


def test_japanese_checks_only_for_japanese_data(tmp_path):
    english = [
        {"instruction": f"Please answer question {i} (the first part", "input": "", "output": f"Answer {i}."}
        for i in range(5)
    ]
    path = str(write_jsonl(tmp_path / "en.jsonl", english))
    assert check_files([path]).findings == []  # English data: no brackets / English checks
    forced = check_files([path], CheckOptions(lang="ja"))
    assert {f.kind for f in forced.findings} == {"bracket_unbalanced", "residual_english"}


def test_fail_on_and_json(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [*CLEAN, CASES["bracket_unbalanced"][0], CASES["width"][0]])
    out = tmp_path / "report.json"
    assert main(["data", "check", str(path), "--json", str(out)]) == 0  # warnings only: default passes
    printed = capsys.readouterr().out
    assert "bracket_unbalanced" in printed and "神の手を見る" in printed
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["counts"] == {"bracket_unbalanced": 1, "width": 1} and report["records"] == len(CLEAN) + 2
    assert report["findings"][0]["where"] == f"line {len(CLEAN) + 1}"
    assert main(["data", "check", str(path), "--fail-on", "warning"]) == 1
    assert main(["data", "check", str(path), "--fail-on", "info"]) == 1
    assert main(["data", "check", str(path), "--fail-on", "width"]) == 1
    assert main(["data", "check", str(path), "--fail-on", "duplicate,bad_char"]) == 0
    assert main(["data", "check", str(path), "--fail-on", "no_such_kind"]) == 2
    assert "unknown kind(s) no_such_kind" in capsys.readouterr().err
    broken = write_jsonl(tmp_path / "b.jsonl", [*CLEAN, CASES["missing_field"][0]])
    assert main(["data", "check", str(broken)]) == 1
    assert main(["data", "check", str(broken), "--fail-on", "never"]) == 0


def test_fix_writes_a_new_file_and_a_log(tmp_path, capsys):
    recs = [
        *CLEAN,
        {"instruction": "東京（とうきょう)とは？ ", "input": "", "output": "首都\u200bです。"},
        {
            "instruction": "真珠の耳飾りの少女」を描いた画家は？",
            "input": "",
            "output": "「真珠の耳飾りの少女」はフェルメールです。",
        },
        {"instruction": "ｶﾀｶﾅ", "input": "", "output": "答えは１２３です。", "extra": "kept"},
        {"instruction": "手がかりのない」括弧", "input": "", "output": "答え"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    before = path.read_bytes()
    out_dir = tmp_path / "fixed"
    assert main(["data", "check", str(path), "--fix", "--nfkc", "width", "--out-dir", str(out_dir)]) == 0
    assert path.read_bytes() == before  # never in place
    fixed = [
        json.loads(line) for line in (out_dir / "d.fixed.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(fixed) == len(recs) and fixed[: len(CLEAN)] == CLEAN
    assert fixed[-4] == {"instruction": "東京（とうきょう）とは？", "input": "", "output": "首都です。"}
    assert fixed[-3]["instruction"] == "「真珠の耳飾りの少女」を描いた画家は？"
    assert fixed[-2] == {"instruction": "カタカナ", "input": "", "output": "答えは123です。", "extra": "kept"}
    assert fixed[-1] == recs[-1]  # no evidence where the 「 went: left for a person
    log = [json.loads(line) for line in (out_dir / "d.fixes.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(e["index"], e["field"]) for e in log] == [(24, "instruction"), (24, "output"), (25, "instruction"),
                                                       (26, "instruction"), (26, "output")]  # fmt: skip
    assert all(e["before"] == recs[e["index"]][e["field"]] and e["after"] != e["before"] for e in log)
    assert "5 field(s) changed" in capsys.readouterr().out
    after = check_files([str(out_dir / "d.fixed.jsonl")])
    assert {f.kind for f in after.findings} == {"bracket_unbalanced"}  # only the unfixable one is left
    # a second --fix refuses to overwrite; an input is never an output
    assert main(["data", "check", str(path), "--fix", "--out-dir", str(out_dir)]) == 2
    other = write_jsonl(tmp_path / "d.fixed.jsonl", CLEAN)  # would be d.jsonl's output
    with pytest.raises(KaikaError, match="never writes in place"):
        fix_files([str(path), str(other)], None, CheckOptions(), FixOptions())


def test_fix_refuses_unreadable_input(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{broken\n', encoding="utf-8")
    with pytest.raises(KaikaError, match="repair unreadable lines first"):
        fix_files([str(path)], str(tmp_path / "o"), CheckOptions(), FixOptions())


def test_fix_text_nfkc_full_and_code_untouched():
    text = "ＡＢＣ（全角）と`print(x)` "
    new, done = fix_text(text, [], True, FixOptions(nfkc="full"))
    assert new == "ABC(全角)と`print(x)`" and "NFKC" in done
    new, _ = fix_text("`f(`は関数です（説明)", [], True, FixOptions())
    assert new == "`f(`は関数です（説明）"  # the code's parenthesis is not a bracket to balance


def test_stats_and_too_long(tmp_path, ja_tokenizer, capsys):
    from kaika.data.prompts import load_template
    from kaika.data.tokenize import encode_example

    tok_dir = tmp_path / "tok"
    ja_tokenizer.save_pretrained(tok_dir)
    recs = seed_records(40)
    path = write_jsonl(tmp_path / "seed.jsonl", recs)
    png = tmp_path / "hist.png"
    report = data_stats([str(path)], [str(tok_dir)], cutoff_len=128, plot=str(png))
    assert report.records == 40 and report.with_input == sum(bool(r["input"]) for r in recs)
    assert report.characters["output"]["max"] == max(len(r["output"]) for r in recs)
    t = report.tokenizers[str(tok_dir)]
    # the lengths are the ones training makes
    template = load_template("alpaca_ja")
    full = [
        encode_example(
            ja_tokenizer, template.format(r["instruction"], r["input"]), r["output"], 10**6
        ).full_length
        for r in recs
    ]
    assert t["example_tokens"]["max"] == max(full)
    assert t["truncated_at_cutoff_len"] == sum(n > 128 for n in full)
    assert sum(n <= t["cutoff_len_for_95"] for n in full) >= 0.95 * len(full)
    assert sum(n <= t["cutoff_len_for_95"] - 1 for n in full) < 0.95 * len(full)
    chars = sum(len(r[f]) for r in recs for f in ("instruction", "input", "output"))
    toks = sum(
        len(ja_tokenizer.encode(r[f], add_special_tokens=False))
        for r in recs
        for f in ("instruction", "input", "output")
        if r[f]
    )
    assert t["tokens_per_character"] == round(toks / chars, 3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["data", "check", str(path), "--model", str(tok_dir), "--cutoff-len", "128"]) == 0
    out = capsys.readouterr().out
    assert f"{t['truncated_at_cutoff_len']} of 40 examples exceed cutoff_len 128" in out
    report = check_files([str(path)], CheckOptions(model=str(tok_dir), cutoff_len=128))
    assert sum(f.kind == "too_long" for f in report.findings) == sum(n > 128 for n in full)

    js = tmp_path / "stats.json"
    assert main(["data", "stats", str(path), "--model", str(tok_dir), str(tok_dir), "--json", str(js)]) == 0
    assert "tokens per character" in capsys.readouterr().out
    assert json.loads(js.read_text(encoding="utf-8"))["records"] == 40


def test_unfenced_code_is_code_not_english(tmp_path):
    """Alpaca-style data pastes code without fences: its parentheses and English are not prose."""
    code = "def count_x(x, y):\n    # count how often x appears in the list y\n    return y.count(x)"
    rec = {"instruction": "次の関数を説明してください。", "input": code, "output": "yの中のxを数えます。"}
    report = check_files([str(write_jsonl(tmp_path / "d.jsonl", [*CLEAN, rec]))])
    assert [(f.kind, f.field) for f in report.findings] == [("untranslated_comment", "input")]
    english = {
        "instruction": "説明してください。",
        "input": "",
        "output": "The count function counts (how often x appears.",
    }
    report = check_files([str(write_jsonl(tmp_path / "e.jsonl", [*CLEAN, english]))])
    assert {f.kind for f in report.findings} == {"residual_english", "bracket_unbalanced"}  # prose, not code


GOOD_LINE = json.dumps(
    {"instruction": "日本の首都は？", "input": "", "output": "東京です。"}, ensure_ascii=False
)
CHAT = [{"role": "user", "content": "問"}, {"role": "assistant", "content": "答"}]
# Second lines that `kaika train` refuses, one per class of refusal its reader has.
REFUSED = {
    "not JSON": '{"instruction": "i", "output": ',
    "not an object": '["i", "o"]',
    "missing output": '{"instruction": "i"}',
    "empty instruction": '{"instruction": " ", "output": "o"}',
    "a number": '{"instruction": "i", "output": 3}',
    "a lone surrogate": '{"instruction": "i\\ud800", "output": "o"}',
    "a surrogate deep inside": '{"instruction": "i", "output": "o", "meta": {"x": ["\\udfff"]}}',
    "nested too deep": "[" * 5000 + "]" * 5000,
    "two forms": json.dumps({"instruction": "i", "output": "o", "messages": CHAT}),
    "a key twice": '{"instruction": "a", "instruction": "b", "output": "o"}',
    "an unknown role": json.dumps({"messages": [{"role": "robot", "content": "x"}, *CHAT]}),
    "no answer": json.dumps({"messages": [{"role": "user", "content": "x"}]}),
    "an image part": json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}, CHAT[1]]}
    ),
    "null content": json.dumps({"messages": [CHAT[0], {"role": "assistant", "content": None}]}),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_data_check_finds_every_record_training_refuses(tmp_path, case):
    """What the training reader refuses, data check reports as an error at the same line first."""
    from kaika.data.records import DataError, load_records

    path = tmp_path / "d.jsonl"
    path.write_text(GOOD_LINE + "\n" + REFUSED[case] + "\n", encoding="utf-8")
    with pytest.raises(DataError) as refused:
        load_records([str(path)])
    line = lambda where: where.split(",")[0]  # noqa: E731 ("line 2, turn 0": the record's line)
    assert {line(p.where) for p in refused.value.problems} == {"line 2"}, refused.value
    errors = [f for f in check_files([str(path)]).findings if KINDS[f.kind][0] == "error"]
    assert errors and {line(f.where) for f in errors} == {"line 2"}, errors


def test_data_check_finds_what_the_template_and_the_length_rule_refuse(tmp_path, ja_tokenizer):
    """With a tokenizer, data check renders each record as training does: a conversation the chat
    template refuses is an error naming its line (training would stop on it), and a record over
    cutoff_len × 64 characters is reported as left out, untokenized (training leaves it out)."""
    from kaika.data.examples import encode_records
    from kaika.data.prompts import load_template
    from kaika.data.records import load_records

    tok_dir = tmp_path / "tok"
    ja_tokenizer.save_pretrained(tok_dir)
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    two_users = {"messages": [{"role": "user", "content": "a"}, *CHAT]}
    huge = {"messages": [{"role": "user", "content": "長" * (64 * 64 + 1)}, CHAT[1]]}
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, two_users, {"messages": CHAT[::1]}, huge])
    records = load_records([str(path)])
    with pytest.raises(KaikaError, match="line 2: the chat template strict cannot render"):
        encode_records(records, load_template(strict), ja_tokenizer, 64)
    features, data = encode_records([records[i] for i in (0, 2, 3)], load_template(strict), ja_tokenizer, 64)
    assert data.dropped_huge == 1 and len(features) == 2

    report = check_files([str(path)], CheckOptions(model=str(tok_dir), template=str(strict), cutoff_len=64))
    found = {(f.kind, f.where) for f in report.findings}
    assert ("unrenderable", "line 2") in found and ("too_long", "line 4") in found, found
    assert "roles must alternate" in next(f.message for f in report.findings if f.kind == "unrenderable")
    assert report.too_long["dropped"] == 1


PAIR = {"instruction": "日本の首都は？", "chosen": "東京です。", "rejected": "大阪です。"}
PAIR_REFUSED = {
    "identical sides": {"instruction": "i", "chosen": "同じ", "rejected": "同じ"},
    "an empty side": {"instruction": "i", "chosen": "a", "rejected": " "},
    "no prompt": {"chosen": "a", "rejected": "b"},
    "a number": {"instruction": "i", "chosen": 1, "rejected": "b"},
    "a lone surrogate": {"instruction": "i", "chosen": "a\ud800", "rejected": "b"},
}


@pytest.mark.parametrize("case", list(PAIR_REFUSED))
def test_data_check_reads_preference_pairs_as_dpo_does(tmp_path, case):
    from kaika.data.preference import load_pairs
    from kaika.data.records import DataError

    clean = write_jsonl(tmp_path / "ok.jsonl", [PAIR, {**PAIR, "instruction": "富士山の高さは？"}])
    assert check_files([str(clean)]).findings == []
    assert fix_files([str(clean)], str(tmp_path / "fixed"), CheckOptions(), FixOptions())[0][2] == 0
    path = tmp_path / "d.jsonl"
    bad = json.dumps(PAIR_REFUSED[case])  # ASCII: a lone surrogate is written as JSON's "\ud800" escape
    path.write_text(json.dumps(PAIR) + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(DataError) as refused:
        load_pairs([str(path)])
    assert {p.where for p in refused.value.problems} == {"line 2"}, refused.value
    errors = [f for f in check_files([str(path)]).findings if KINDS[f.kind][0] == "error"]
    assert errors and {f.where for f in errors} == {"line 2"}, errors
