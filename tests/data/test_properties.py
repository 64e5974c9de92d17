"""Property-based tests: random Unicode through the data loader and the masking function.

Japanese, emoji, control characters, lookalike line breaks (U+2028, U+0085), special-token
strings, empty and very long fields, and lone surrogates (what a ``\\ud800`` escape in JSON decodes to:
not valid Unicode, which no tokenizer takes). The loader either returns exactly the records given or
raises its documented ``DataError`` naming the bad lines; ``encode_example`` always keeps the
masking invariants.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaika.data.prompts import load_template
from kaika.data.records import DataError, load_records
from kaika.data.tokenize import IGNORE_INDEX, encode_example, encode_prompt

FRAGMENTS = [
    "吾輩は猫である。", "名前はまだ無い", "ｶﾀｶﾅ", "🌸", "👩‍👩‍👧", "🇯🇵", "\u3000", "\t", "\r\n", "\n",
    "\x00", "\x1b[31m", "\x7f", "\u2028", "\u0085", "\ufeff", "\u200b", "</s>", "<pad>", "<s>",
    "<unk>", "### 指示:", "### 応答:", "é", "\U0001f600" * 3, " ",
]  # fmt: skip
SURROGATES = ["\ud800", "\udfff", "\udc00x"]  # lone halves of a pair: in the files, JSON \\u escapes
SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def texts(max_size: int = 40, surrogates: bool = False) -> st.SearchStrategy[str]:
    pieces = st.one_of(st.text(max_size=8), st.sampled_from(FRAGMENTS + (SURROGATES if surrogates else [])))
    short = st.lists(pieces, max_size=max_size).map("".join)
    very_long = st.tuples(st.sampled_from(FRAGMENTS[:5]), st.integers(500, 3000)).map(lambda t: t[0] * t[1])
    return st.one_of(short, short, short, very_long)


field_values = st.one_of(
    texts(), texts(surrogates=True), st.none(), st.integers(), st.lists(texts(3, surrogates=True), max_size=2)
)
records = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "extra"]), field_values, max_size=4
)


def unicode(value) -> bool:
    if isinstance(value, str):
        return not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return all(unicode(v) for v in value)
    return True


def dump(value) -> str:
    """JSON as an editor writes it (UTF-8, non-ASCII as is), lone surrogates as \\u escapes."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


def is_valid(rec: dict) -> bool:
    if not all(unicode(v) for v in rec.values()):
        return False

    def ok(key: str, required: bool) -> bool:
        value = rec.get(key)
        if value is None:
            return not required
        return isinstance(value, str) and (not required or bool(value.strip()))

    return ok("instruction", True) and ok("output", True) and ok("input", False)


@SETTINGS
@given(recs=st.lists(records, min_size=1, max_size=6), as_array=st.booleans())
def test_loader_returns_the_records_or_names_every_bad_line(tmp_path, recs, as_array):
    path = tmp_path / ("data.json" if as_array else "data.jsonl")
    if as_array:
        path.write_text("[\n" + ",\n".join(dump(r) for r in recs) + "\n]", encoding="utf-8")
    else:
        path.write_text("".join(dump(r) + "\n" for r in recs), encoding="utf-8")
    bad = [i for i, r in enumerate(recs) if not is_valid(r)]
    try:
        loaded = load_records([str(path)])
    except DataError as e:
        assert bad, f"valid records refused: {e}"
        named = {p.where for p in e.problems}
        # Every problem names this file and a record that really is bad, and every bad one is named.
        assert all(p.source == str(path) for p in e.problems)
        index = (
            (lambda w: int(w.split("record ")[1].rstrip(")")))
            if as_array
            else (lambda w: int(w.split()[1]) - 1)
        )
        assert {index(w) for w in named} == set(bad)
        return
    assert not bad
    assert loaded == [
        {"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in recs
    ]


@SETTINGS
@given(
    instruction=texts(),
    input_=texts(),
    response=texts(),
    cutoff=st.integers(2, 300),
    train_on_inputs=st.booleans(),
    template=st.sampled_from(["alpaca_ja", "alpaca"]),
)
def test_masking_invariants_hold_for_any_text(
    ja_tokenizer, instruction, input_, response, cutoff, train_on_inputs, template
):
    tok = ja_tokenizer
    prompt = load_template(template).format(instruction, input_)
    enc = encode_example(tok, prompt, response, cutoff, train_on_inputs)
    prompt_ids = encode_prompt(tok, prompt)
    if enc is None:  # documented: the prompt leaves no room for one response token and EOS
        assert len(prompt_ids) + 2 > cutoff
        return
    ids, labels = enc.input_ids, enc.labels
    n = len(prompt_ids)
    assert len(ids) == len(labels) <= cutoff
    assert ids[:n] == prompt_ids  # the prompt is never cut
    assert labels[:n] == (prompt_ids if train_on_inputs else [IGNORE_INDEX] * n)
    assert labels[n:] == ids[n:] and IGNORE_INDEX not in labels[n:]  # the response is supervised, all of it
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == labels[-1] == tok.eos_token_id  # one EOS, last
    assert len(ids) > n + 0  # at least the EOS after the prompt
    assert enc.truncated == (enc.full_length > cutoff)
    assert tok.pad_token_id not in ids  # literal "<pad>" in text stays text
