"""Data validation: every bad input names its file, line or record, and field; nothing is written."""

from __future__ import annotations

import json

import pytest

from helpers import SEED_TASKS, write_jsonl
from kaika.cli import main
from kaika.data.records import DataError, load_prompts, load_records, split_records
from kaika.errors import KaikaError

GOOD = {"instruction": "挨拶して", "input": "", "output": "こんにちは"}


def problems_of(path, **kw):
    with pytest.raises(DataError) as info:
        load_records([str(path)], **kw)
    return info.value.problems, str(info.value)


def test_good_jsonl_and_json_array(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, "input": "x"}])
    (tmp_path / "b.json").write_text(json.dumps([GOOD], ensure_ascii=False), encoding="utf-8")
    recs = load_records([str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")])
    assert [r["input"] for r in recs] == ["", "x", ""]
    assert len(load_records([str(SEED_TASKS)])) == 175


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"input": "", "output": "o"}, "instruction", "missing"),
        ({"instruction": "i", "input": ""}, "output", "missing"),
        ({"instruction": "i", "output": 3}, "output", "expected a string, got int"),
        ({"instruction": "i", "output": "   "}, "output", "empty"),
        ({"instruction": ["i"], "output": "o"}, "instruction", "expected a string, got list"),
        ({"instruction": "i", "input": 1.5, "output": "o"}, "input", "expected a string, got float"),
    ],
)
def test_bad_records_name_line_and_field(tmp_path, record, field, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, record])
    (problem,), text = problems_of(path)
    assert (problem.where, problem.field) == ("line 3", field)
    assert message in problem.message
    assert f"{path}, line 3: field '{field}': {message}" in text


def test_malformed_json_line_and_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD, ensure_ascii=False).encode()
    path.write_bytes(
        good + b"\n" + b'{"instruction": "i", "output": \n' + good + b"\n" + b'{"instruction": "\xff\xfe"}\n'
    )
    problems, _ = problems_of(path)
    assert [p.where for p in problems] == ["line 2", "line 4"]
    assert "malformed JSON" in problems[0].message and "invalid UTF-8" in problems[1].message


def test_json_array_reports_the_line_of_the_bad_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]\n', encoding="utf-8"
    )
    (problem,), _ = problems_of(path)
    assert problem.where == "line 3 (record 1)" and problem.field == "output"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]', encoding="utf-8")
    (problem,), _ = problems_of(path)
    assert problem.where == "line 3" and "malformed JSON" in problem.message


def test_not_an_object_missing_file_and_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('["a", "b"]\n', encoding="utf-8")
    assert "expected a JSON object" in problems_of(path)[0][0].message
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    assert "the file is empty" in problems_of(tmp_path / "empty.jsonl")[0][0].message
    (tmp_path / "empty.json").write_bytes(b"")
    assert "the file is empty" in problems_of(tmp_path / "empty.json")[0][0].message
    assert "not found" in problems_of(tmp_path / "nope.jsonl")[0][0].message


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "i", "context": "c", "response": "r"}])
    (problem,), text = problems_of(path)
    assert problem.field == "output" and "--columns" in text
    recs = load_records([str(path)], {"input": "context", "output": "response"})
    assert recs == [{"instruction": "i", "input": "c", "output": "r"}]
    (problem,), _ = problems_of(path, columns={"input": "contxt", "output": "response"})
    assert problem.field == "contxt (as input)" and "absent" in problem.message
    with pytest.raises(KaikaError, match="unknown target field"):
        load_records([str(path)], {"answer": "response"})


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD, {**GOOD, "output": ""}]).save_to_disk(str(tmp_path / "ds"))
    (problem,), _ = problems_of(tmp_path / "ds")
    assert (problem.where, problem.field) == ("record 1", "output")


def test_split_is_deterministic_and_disjoint():
    recs = [{"instruction": str(i), "input": "", "output": "o"} for i in range(100)]
    train, val = split_records(recs, 0.1, seed=7)
    assert len(val) == 10 and len(train) == 90
    assert split_records(recs, 0.1, seed=7) == (train, val)
    assert split_records(recs, 10, seed=8)[1] != val
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in val)
    with pytest.raises(KaikaError, match="val_set_size"):
        split_records(recs, 100, seed=0)


def test_prompts_need_no_output(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "i"}, {"instruction": "j", "input": "k"}])
    assert load_prompts(str(path)) == [{"instruction": "i", "input": ""}, {"instruction": "j", "input": "k"}]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"instruction": "i", "output": ""}\n', "line 2: field 'output': empty"),
        (b'{"instruction": "i", "output": \n', "line 2: malformed JSON"),
        (b'{"instruction": "\xff", "output": "o"}\n', "line 2: invalid UTF-8"),
        (b'{"instruction": "i"}\n', "line 2: field 'output': missing"),
    ],
    ids=["empty-output", "malformed-json", "invalid-utf8", "missing-key"],
)
def test_cli_bad_data_exits_nonzero_and_writes_nothing(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD, ensure_ascii=False).encode() + b"\n" + content)
    out = tmp_path / "run"
    code = main(
        ["train", "--data", str(path), "--output-dir", str(out), "--base-model", str(tmp_path / "nowhere")]
    )
    assert code == 2
    assert f"{path}, {expected}" in capsys.readouterr().err
    assert not out.exists()


def test_builtin_data_by_name():
    from kaika.data.records import load_records

    assert len(load_records(["seed-tasks-ja"])) == 175
    chats = load_records(["seed-chats-ja"])
    assert len(chats) == 87 and sum(len(c["messages"]) for c in chats) == 448
    elyza = load_records(["elyza-tasks-100"])
    assert len(elyza) == 100 and all(r["input"] == "" and r["output"] for r in elyza)
    with pytest.raises(
        KaikaError,
        match="a builtin: seed-tasks-ja, seed-chats-ja, seed-prefs-ja, seed-kto-ja, elyza-tasks-100",
    ):
        load_records(["seed-tasks-jp"])


def test_bom_json_lines_named_json_and_a_directory_of_files(tmp_path):
    # What editors and libraries write: a UTF-8 BOM (Excel, Notepad), JSON Lines in a .json file
    # (datasets' to_json); a directory of files names the file and line of a bad record.
    recs = [{"instruction": f"問{i}", "output": f"答{i}"} for i in range(3)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "lines.json").write_text(lines, encoding="utf-8")
    (tmp_path / "bom_array.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(recs).encode())
    for name in ("bom.jsonl", "lines.json", "bom_array.json"):
        assert load_records([str(tmp_path / name)]) == [{**r, "input": ""} for r in recs], name
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text(lines, encoding="utf-8")
    (d / "sub" / "b.json").write_text('[{"instruction": "x"}]', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_records([str(d)])
    (problem,) = err.value.problems
    assert problem.where == "sub/b.json line 1 (record 0)" and problem.field == "output"


def test_text_that_is_not_unicode_is_refused_by_every_reader_naming_record_and_field(tmp_path, capsys):
    """A lone surrogate (JSON's "\\ud800" escape of half a pair) is read by Python's JSON as a string no
    tokenizer, file or server takes: every reader refuses it, data check included, before any model."""
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(GOOD, ensure_ascii=False) + "\n" + '{"instruction": "i\\ud800", "output": "o"}\n'
        + '{"instruction": "i", "output": "o", "note": {"x": ["\\udfff"]}}\n',
        encoding="utf-8",
    )  # fmt: skip
    problems, text = problems_of(path)
    assert [(p.where, p.field) for p in problems] == [("line 2", "instruction"), ("line 3", "note.x[0]")]
    assert "lone surrogate \\ud800 at character 2" in text
    with pytest.raises(DataError, match="line 2"):
        load_prompts(str(path))
    for command in (["data", "check", str(path)], ["data", "stats", str(path)], ["train", "--data", str(path),
                    "--output-dir", str(tmp_path / "run")]):  # fmt: skip
        assert main(command) in (1, 2)
        err = capsys.readouterr()
        assert "line 2" in err.out + err.err and "lone surrogate" in err.out + err.err, command
    assert not (tmp_path / "run").exists()


def test_nesting_deeper_than_the_reader_is_a_named_problem_not_a_traceback(tmp_path, capsys):
    deep = "[" * 5000 + "]" * 5000
    (tmp_path / "deep.jsonl").write_text(json.dumps(GOOD) + "\n" + deep + "\n", encoding="utf-8")
    (tmp_path / "deep.json").write_text(deep, encoding="utf-8")
    for name, where in (("deep.jsonl", "line 2"), ("deep.json", "file")):
        problems, _ = problems_of(tmp_path / name)
        assert [p.where for p in problems] == [where] and "nested deeper" in problems[0].message
        assert main(["data", "check", str(tmp_path / name)]) == 1
        assert "nested deeper" in capsys.readouterr().out


def test_a_data_directory_is_read_whole_or_refused_naming_what_it_would_not_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [GOOD])
    (data / "README.md").write_text("# my data\n")  # documentation: skipped
    assert len(load_records([str(data)])) == 1
    (data / "more.csv").write_text("instruction,output\ni,o\n")
    (data / "notes.txt").write_text("todo\n")
    problems, _ = problems_of(data)
    assert len(problems) == 1 and "more.csv, notes.txt" in problems[0].message
    # Only other kinds of files, mixed: the datasets library would read one kind and drop the rest.
    (data / "a.jsonl").unlink()
    problems, _ = problems_of(data)
    assert "several kinds (.csv, .txt)" in problems[0].message


def test_control_characters_in_a_problem_are_shown_escaped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"\x1b[31mred": "x", "output": "o"}])
    _, text = problems_of(path)
    assert "\x1b" not in text and "\\x1b[31mred" in text


def test_ambiguous_records_are_refused_not_decided_in_silence(tmp_path, caplog):
    chat = [{"role": "user", "content": "問"}, {"role": "assistant", "content": "答"}]
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({**GOOD, "messages": chat}, ensure_ascii=False) + "\n"  # Alpaca fields and messages
        + json.dumps({"messages": chat, "conversations": chat}, ensure_ascii=False) + "\n"
        + '{"instruction": "a", "instruction": "b", "output": "o"}\n',  # a key twice: JSON keeps the last
        encoding="utf-8",
    )  # fmt: skip
    problems, _ = problems_of(path)
    assert [p.where for p in problems] == ["line 1", "line 2", "line 3"]
    assert "several forms of one example (messages, instruction, output)" in problems[0].message
    assert "several forms" in problems[1].message
    assert problems[2].field == "instruction" and "appears twice" in problems[2].message


def test_messages_that_say_what_to_do(tmp_path):
    cr = tmp_path / "mac.jsonl"
    cr.write_bytes((json.dumps(GOOD) + "\r" + json.dumps(GOOD) + "\r").encode())
    problems, _ = problems_of(cr)
    assert "carriage return alone" in problems[0].message
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
             {"role": "assistant", "content": None}]  # fmt: skip
    problems, _ = problems_of(write_jsonl(tmp_path / "img.jsonl", [{"messages": image}]))
    assert "holds a image_url part: kaika trains on text only" in problems[0].message
    assert "content is null" in problems[1].message


def test_pretraining_text_with_nul_characters_is_refused(tmp_path):
    from kaika.training.pretrain import read_documents

    (tmp_path / "a.txt").write_text("吾輩は猫である。", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"b\.txt, file: holds NUL characters"):
        read_documents([str(tmp_path)], "text")


def test_messages_name_the_option_to_use(tmp_path):
    from kaika.config import ModelArgs
    from kaika.modeling.load import resolve_source
    from kaika.rundir import RunDir

    with pytest.raises(KaikaError, match="no such directory .moved or deleted.*--base-model NEW_PATH"):
        resolve_source(ModelArgs(base_model=str(tmp_path / "gone" / "model")))
    (tmp_path / "run.yaml").write_text("x: 1\n")
    with pytest.raises(KaikaError, match="is a file; give the directory of a kaika run"):
        RunDir.open(tmp_path / "run.yaml")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "?"}])
    with pytest.raises(DataError) as err:
        load_prompts(str(prompts))
    assert "the record has keys question" in str(err.value) and "--columns" not in str(err.value)


def test_an_api_key_no_request_could_match_is_refused_at_start():
    from kaika.inference.serve import ServeOptions, serve

    for key in (" padded", "tab\tkey", "鍵"):
        with pytest.raises(KaikaError, match="no request could ever match this key"):
            serve([], ServeOptions(api_key=key))
