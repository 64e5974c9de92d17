"""Chat messages → template prompt (Python and the Jinja chat_template agree); stop strings in streams."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kaika.data.messages import chat_prompt, jinja_chat_template
from kaika.data.prompts import load_template
from kaika.errors import KaikaError
from kaika.inference.engine import StopFilter, cut_at_stop
from kaika.inference.serve.pool import check_same_base, parse_adapters

JA = load_template("alpaca_ja")

CONVERSATIONS = [
    [{"role": "user", "content": "こんにちは"}],
    [{"role": "system", "content": "猫として答えて"}, {"role": "user", "content": "名前は？"}],
    [
        {"role": "system", "content": "a"},
        {"role": "developer", "content": ""},
        {"role": "user", "content": 'q1 "quoted" \\ {braces}'},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "user", "content": "q3"},
    ],
    [{"role": "assistant", "content": "先に話す"}, {"role": "user", "content": "x"}],
    [{"role": "user", "content": [{"type": "text", "text": "部分"}, {"type": "text", "text": "の連結"}]}],
]


def test_mapping():
    assert chat_prompt(JA, CONVERSATIONS[0]) == JA.format("こんにちは")
    assert chat_prompt(JA, CONVERSATIONS[1]) == JA.format("名前は？", "猫として答えて")
    history = chat_prompt(
        JA,
        [
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
        ],
    )
    assert history == JA.format("u1") + "a1\n\n" + JA.format("u2")
    assert chat_prompt(JA, CONVERSATIONS[4]) == JA.format("部分の連結")
    for bad, match in (
        ([], "last message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "robot", "content": "a"}], "role must be one of"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
    ):
        with pytest.raises(KaikaError, match=match):
            chat_prompt(JA, bad)


@pytest.mark.parametrize("template", ["alpaca_ja", "alpaca"])
def test_jinja_chat_template_renders_the_same_prompt(ja_tokenizer, template):
    tpl = load_template(template)
    tok = copy.deepcopy(ja_tokenizer)  # the fixture is shared: leave it as it was
    tok.chat_template = jinja_chat_template(tpl)
    for conv in CONVERSATIONS[:4]:
        assert tok.apply_chat_template(conv, tokenize=False) == chat_prompt(tpl, conv)
    with pytest.raises(Exception, match="last message"):
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False
        )


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abcあい#\n", max_size=30),
    stops=st.lists(st.text(alphabet="abcあい#\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_filter_streams_exactly_the_cut_text(text, stops, cuts):
    """However the text is split into deltas, the streamed text is the text before the first stop."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    f = StopFilter(stops)
    streamed = "".join(f.push(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)) + f.flush()
    expected, hit = cut_at_stop(text, stops)
    assert streamed == expected and f.stopped == hit


def test_adapter_names_and_bases(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert parse_adapters([str(a), f"other={b}"]) == {"a": a, "other": b}
    with pytest.raises(KaikaError, match="two adapters are named 'a'"):
        parse_adapters([str(a), f"a={b}"])
    for path, base in ((a, "bigscience/bloom-560m"), (b, "bigscience/bloom-1b1")):
        path.mkdir()
        (path / "kaika_config.yaml").write_text(f"model:\n  base_model: {base}\n")
    with pytest.raises(KaikaError, match="different base models"):
        check_same_base({"a": a, "b": b}, None)
    check_same_base({"a": a, "b": b}, "bigscience/bloom-560m")  # --base-model decides
