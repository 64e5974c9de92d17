"""Each command that writes refuses, before reading data or loading a model, an output that would
destroy one of its inputs or a directory kaika did not write; the inputs stay byte for byte."""

from __future__ import annotations

import json

from helpers import seed_records, write_jsonl
from kaika.cli import main


def records_file(path, n=3, trailing_newline=True):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in seed_records(n, max_chars=60))
    path.write_text(text + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


def test_translate_into_its_own_input(tmp_path, capsys):
    src = records_file(tmp_path / "u.jsonl", trailing_newline=False)  # its last line looks torn
    before = src.read_bytes()
    assert main(["translate", str(src), "--output", str(src), "--dry-run"]) == 2
    assert "also an input" in capsys.readouterr().err and src.read_bytes() == before


def test_translate_never_cuts_a_file_that_is_not_its_own(tmp_path, capsys):
    src = records_file(tmp_path / "in.jsonl")
    other = tmp_path / "other.jsonl"
    other.write_text('{"note": "not a translation"', encoding="utf-8")  # one unfinished line
    assert main(["translate", str(src), "--output", str(other), "--dry-run"]) == 2
    assert "not a kaika translate record" in capsys.readouterr().err
    assert other.read_text(encoding="utf-8") == '{"note": "not a translation"'


def test_translate_without_a_key_creates_no_output(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DEEPL_AUTH_KEY", raising=False)
    src = records_file(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    code = main(["translate", str(src), "--output", str(out), "--cache", str(tmp_path / "c.sqlite")])
    assert code == 2 and "no DeepL auth key" in capsys.readouterr().err and not out.exists()


def test_generate_into_its_own_prompts(tmp_path, capsys):
    prompts = records_file(tmp_path / "p.jsonl")
    before = prompts.read_bytes()
    code = main(["generate", str(tmp_path / "no-run"), "--file", str(prompts), "--output", str(prompts)])
    assert code == 2 and "also an input" in capsys.readouterr().err and prompts.read_bytes() == before


def test_data_check_fix_into_a_file(tmp_path, capsys):
    src = records_file(tmp_path / "small.jsonl")
    before = src.read_bytes()
    assert main(["data", "check", str(src), "--fix", "--out-dir", str(src)]) == 2
    assert "is a file" in capsys.readouterr().err and src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.jsonl"]


def test_train_overwrite_of_the_directory_holding_its_data(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = write_jsonl(run / "train.jsonl", seed_records(4, max_chars=60))
    (run / "kaika_config.yaml").write_text("{}\n")  # it looks like a run kaika wrote
    before = data.read_bytes()
    code = main(["train", "--base-model", "tiny-bloom-ja", "--data", str(data), "--output-dir", str(run),
                 "--overwrite", "--max-steps", "1"])  # fmt: skip
    assert code == 2 and "holds the input" in capsys.readouterr().err and data.read_bytes() == before


def test_train_overwrite_never_empties_a_users_folder(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", seed_records(4, max_chars=60))
    folder = tmp_path / "folder"
    (folder / "checkpoints").mkdir(parents=True)  # a name kaika uses, in a folder kaika did not write
    (folder / "notes.txt").write_text("mine")
    code = main(["train", "--base-model", "tiny-bloom-ja", "--data", str(data), "--output-dir", str(folder),
                 "--overwrite", "--max-steps", "1"])  # fmt: skip
    assert code == 2 and "notes.txt" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "checkpoints").is_dir()


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", seed_records(4, max_chars=60))
    code = main(
        ["train", "--data", str(data), "--output-dir", str(tmp_path / "r"), "--resume", "--overwrite"]
    )
    assert code == 2 and "contradict" in capsys.readouterr().err and not (tmp_path / "r").exists()
