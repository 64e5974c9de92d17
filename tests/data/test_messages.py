"""Chat messages → template prompt (Python and the Jinja chat_template agree); stop strings in streams."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kaika.data.messages import jinja_chat_template, kaika_pieces
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
    [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ],
]


def rendered(template, conv, eos: str) -> str:
    return "".join(text + (eos if kind == "answer" else "") for kind, text in kaika_pieces(template, conv))


def test_mapping():
    assert kaika_pieces(JA, CONVERSATIONS[0]) == [("prompt", JA.format("こんにちは"))]
    assert kaika_pieces(JA, CONVERSATIONS[1]) == [("prompt", JA.format("名前は？", "猫として答えて"))]
    # The system text is the first prompt's input; later user turns use prompt_turn; runs of one
    # role are joined; an empty system message is nothing.
    assert kaika_pieces(JA, CONVERSATIONS[2]) == [
        ("prompt", JA.format('q1 "quoted" \\ {braces}', "a")),
        ("answer", "a1"),
        ("prompt", "### 指示:\nq2\n\nq3\n\n### 応答:\n"),
    ]
    assert kaika_pieces(JA, CONVERSATIONS[3]) == [("prompt", JA.format("")), ("answer", "先に話す"),
                                                  ("prompt", JA.format_turn("x"))]  # fmt: skip
    assert kaika_pieces(JA, CONVERSATIONS[4]) == [("prompt", JA.format("部分の連結"))]
    # An Alpaca record is the conversation [system: input, user: instruction, assistant: output].
    assert kaika_pieces(JA, [{"role": "system", "content": "x"}, {"role": "user", "content": "i"},
                             {"role": "assistant", "content": "o"}]) == [("prompt", JA.format("i", "x")), ("answer", "o")]  # fmt: skip
    for bad, match in (
        ([{"role": "robot", "content": "a"}], "role must be one of"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
    ):
        with pytest.raises(KaikaError, match=match):
            kaika_pieces(JA, bad)


@pytest.mark.parametrize("template", ["alpaca_ja", "alpaca"])
def test_jinja_chat_template_renders_the_same_prompt(ja_tokenizer, template):
    tpl = load_template(template)
    tok = copy.deepcopy(ja_tokenizer)  # the fixture is shared: leave it as it was
    tok.chat_template = jinja_chat_template(tpl)
    for conv in CONVERSATIONS:
        plain = [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list)
                 else m for m in conv]  # fmt: skip
        assert tok.apply_chat_template(plain, tokenize=False) == rendered(tpl, conv, tok.eos_token)


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
