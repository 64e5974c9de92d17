"""Conversations → ids and labels: the mask over arbitrary conversations, and training = inference.

For any conversation, on BLOOM's byte-level tokenizer with kaika's template and on Gemma 3's
tokenizer with its chat template:

* a token is trained iff it belongs to a trained answer (every answer, or the last one), the
  EOS/end-of-turn that closes it included; nothing else is;
* the trained tokens of each answer decode to its text followed by the end of its turn;
* the ids before each answer equal what inference builds for the turns before it with the
  generation prompt added (``prompt_ids``, used by chat, serve and generate).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaika.data.prompts import load_template, resolve_template
from kaika.data.segments import encode_conversation, end_of_turn, prompt_ids, segments, stop_ids
from kaika.data.tokenize import IGNORE_INDEX
from kaika.errors import KaikaError

# Text that tokenizes in interesting ways: Japanese, spaces and newlines at the edges (BPE merges
# across a boundary would show), markup that looks like control tokens (must stay text for kaika's
# templates).
TEXT = st.text(alphabet="あいう漢字カナ ab.\n!？「」</s>#", min_size=1, max_size=24).filter(str.strip)


@st.composite
def conversations(draw, alternate: bool = False):
    system = draw(st.lists(TEXT, max_size=1))
    n = draw(st.integers(1, 4))
    msgs = [{"role": "system", "content": s} for s in system]
    for _ in range(n):
        msgs.append({"role": "user", "content": draw(TEXT)})
        if not alternate and draw(st.booleans()):  # two user turns in a row (kaika joins them)
            msgs.append({"role": "user", "content": draw(TEXT)})
        msgs.append({"role": "assistant", "content": draw(TEXT)})
    return msgs


def check_invariants(template, tok, msgs, train_on):
    segs = segments(template, tok, msgs)
    ex = encode_conversation(template, tok, msgs, cutoff_len=10**6, train_on=train_on)
    ids = [i for s in segs for i in s.ids]
    assert ex.input_ids == ids and not ex.truncated and ex.turns_dropped == 0
    answers = [s for s in segs if s.answer is not None]
    assert len(answers) == sum(m["role"] == "assistant" for m in msgs)
    stops = set(stop_ids(template, tok))
    pos = 0
    for s in segs:
        span = ex.labels[pos : pos + len(s.ids)]
        trained = s.answer is not None and (train_on == "assistant" or s.answer == answers[-1].answer)
        assert span == (s.ids if trained else [IGNORE_INDEX] * len(s.ids))
        if s.answer is not None:
            assert stops & set(s.ids), "every answer ends its turn with a stop token"
            # The prompt of this answer is exactly what inference builds for the turns before it.
            k = [i for i, m in enumerate(msgs) if m["role"] == "assistant"][s.answer]
            assert prompt_ids(template, tok, msgs[:k]) == ids[:pos]
        pos += len(s.ids)
    return segs, ex


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=conversations(), train_on=st.sampled_from(["assistant", "last"]))
def test_kaika_template_masks_exactly_the_answers(ja_tokenizer, msgs, train_on):
    template = load_template("alpaca_ja")
    segs, ex = check_invariants(template, ja_tokenizer, msgs, train_on)
    for s in segs:
        if s.answer is not None:  # the answer's text, then EOS; a literal "</s>" stays text
            assert s.ids[-1] == ja_tokenizer.eos_token_id and ja_tokenizer.eos_token_id not in s.ids[:-1]
            assert ja_tokenizer.decode(s.ids[:-1]) == s.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=conversations(alternate=True), train_on=st.sampled_from(["assistant", "last"]))
def test_gemma_chat_template_masks_exactly_the_answers(gemma_tokenizer, msgs, train_on):
    tok = gemma_tokenizer
    template = resolve_template("chat", tok)
    segs, ex = check_invariants(template, tok, msgs, train_on)
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    for s in segs:
        if s.answer is not None:  # the answer (trimmed, as Gemma's format does), <end_of_turn>, newline
            assert s.ids[-2:] == [end, tok.encode("\n", add_special_tokens=False)[0]]
            content = [m["content"] for m in msgs if m["role"] == "assistant"][s.answer]
            assert tok.decode(s.ids) == content.strip() + "<end_of_turn>\n"
    assert segs[0].ids[0] == tok.bos_token_id and sum(i == tok.bos_token_id for i in ex.input_ids) == 1


def test_gemma_stops_at_end_of_turn_and_refuses_two_user_turns(gemma_tokenizer):
    tok = gemma_tokenizer
    template = resolve_template("chat", tok)
    assert end_of_turn(template, tok) == "<end_of_turn>\n"
    assert stop_ids(template, tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}]  # fmt: skip
    with pytest.raises(KaikaError, match="alternate"):
        segments(template, tok, two_users)
    # auto: the chat template for conversations, kaika's for Alpaca data
    assert resolve_template("auto", tok, conversations=True).kind == "chat"
    assert resolve_template("auto", tok, conversations=False).name == "alpaca_ja"


def test_long_conversations_keep_the_system_prompt_and_lose_old_exchanges(ja_tokenizer):
    template = load_template("alpaca_ja")
    msgs = [{"role": "system", "content": "丁寧に答えてください。"}]
    for i in range(6):
        msgs += [
            {"role": "user", "content": f"質問{i}です。" * 3},
            {"role": "assistant", "content": f"答え{i}。" * 3},
        ]
    full = encode_conversation(template, ja_tokenizer, msgs, 10**6)
    last_two = msgs[:1] + msgs[-4:]
    want = encode_conversation(template, ja_tokenizer, last_two, 10**6)
    ex = encode_conversation(template, ja_tokenizer, msgs, len(want.input_ids))
    assert ex.input_ids == want.input_ids and ex.labels == want.labels and ex.turns_dropped == 4
    assert ex.full_length == len(full.input_ids)
    # One exchange that is still too long: its answer is cut, EOS kept; --truncation drop leaves it out.
    one = msgs[:1] + msgs[-2:]
    short = encode_conversation(
        template,
        ja_tokenizer,
        one,
        len(encode_conversation(template, ja_tokenizer, one, 10**6).input_ids) - 3,
    )
    assert (
        short.truncated
        and short.input_ids[-1] == ja_tokenizer.eos_token_id
        and short.labels[-1] == short.input_ids[-1]
    )
    assert encode_conversation(template, ja_tokenizer, msgs, len(want.input_ids), truncation="drop") is None
    assert encode_conversation(template, ja_tokenizer, one, 5) is None  # the prompt alone does not fit


def test_an_alpaca_record_is_the_same_conversation(ja_tokenizer):
    from kaika.data.tokenize import encode_example

    template = load_template("alpaca_ja")
    rec = {"instruction": "要約して", "input": "長い文章です。", "output": "短い文章。"}
    a = encode_example(ja_tokenizer, template.format(rec["instruction"], rec["input"]), rec["output"], 512)
    conv = [{"role": "system", "content": rec["input"]}, {"role": "user", "content": rec["instruction"]},
            {"role": "assistant", "content": rec["output"]}]  # fmt: skip
    b = encode_conversation(template, ja_tokenizer, conv, 512)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=conversations(), train_on=st.sampled_from(["assistant", "last"]))
def test_chatml_template_of_a_real_instruct_model(smollm2_tokenizer, msgs, train_on):
    """ChatML adds a default system prompt when there is none, and takes two user turns in a row."""
    tok = smollm2_tokenizer
    template = resolve_template("chat", tok)
    segs, _ = check_invariants(template, tok, msgs, train_on)
    for s in segs:
        if s.answer is not None:
            assert tok.decode(s.ids).endswith("<|im_end|>\n")
