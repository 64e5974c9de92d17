from __future__ import annotations

import json

import pytest

from kaika.data.prompts import builtin_templates, load_template
from kaika.errors import KaikaError


def test_builtin_templates():
    assert {"alpaca", "alpaca_ja"} <= set(builtin_templates())
    ja = load_template("alpaca_ja")
    with_input = ja.format("要約して", "本文{です}")
    assert "### 指示:\n要約して" in with_input and "### 入力:\n本文{です}" in with_input
    assert with_input.endswith("### 応答:\n")
    no_input = ja.format("挨拶して")
    assert "入力" not in no_input and no_input.endswith("### 応答:\n")
    assert ja.split_response(no_input + "こんにちは") == "こんにちは"
    assert load_template("alpaca").format("Say hi").endswith("### Response:\n")


def test_user_template_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "prompt_input": "Q: {instruction} / {input}\nA:",
                "prompt_no_input": "Q: {instruction}\nA:",
                "response_split": "A:",
            }
        ),
        encoding="utf-8",
    )
    tpl = load_template(str(path))
    assert tpl.format("x", "y") == "Q: x / y\nA:" and tpl.name == "mine"
    assert load_template(str(path)) == type(tpl)(**json.loads(tpl.to_json()))


def test_bad_templates(tmp_path):
    with pytest.raises(KaikaError, match="unknown template"):
        load_template("nope")
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {"prompt_input": "{instruction}", "prompt_no_input": "{instruction}", "response_split": "A:"}
        ),
        encoding="utf-8",
    )
    with pytest.raises(KaikaError, match="lacks the placeholder {input}"):
        load_template(str(path))
