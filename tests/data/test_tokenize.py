"""Loss masking and EOS: the traps of the alpaca-lora recipe, each as an assertion."""

from __future__ import annotations

import pytest

from helpers import seed_records
from kaika.data.examples import encode_records
from kaika.data.prompts import load_template
from kaika.data.tokenize import IGNORE_INDEX, encode_example, resolve_pad_token


class FakeTokenizer:
    """One id per character (offset past the specials); optional BOS like Llama's tokenizers."""

    def __init__(self, add_bos: bool = False):
        self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id = 1, 2, 0, None
        self.add_bos = add_bos

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) + 10 for c in text]
        return ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids


@pytest.mark.parametrize("add_bos", [False, True])
def test_labels_mask_exactly_the_prompt_and_end_with_eos(add_bos):
    tok = FakeTokenizer(add_bos)
    enc = encode_example(tok, "指示:", "答え", cutoff_len=64)
    n_prompt = len("指示:") + add_bos
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert (
        enc.labels[n_prompt:]
        == enc.input_ids[n_prompt:]
        == [ord("答") + 10, ord("え") + 10, tok.eos_token_id]
    )
    assert enc.input_ids[0] == (tok.bos_token_id if add_bos else ord("指") + 10)
    assert not enc.truncated


def test_train_on_inputs_supervises_the_prompt():
    enc = encode_example(FakeTokenizer(), "abc", "de", cutoff_len=64, train_on_inputs=True)
    assert enc.labels == enc.input_ids


def test_truncation_cuts_the_response_and_keeps_eos():
    tok = FakeTokenizer()
    enc = encode_example(tok, "p" * 5, "r" * 100, cutoff_len=16)
    assert len(enc.input_ids) == 16
    assert enc.input_ids[-1] == enc.labels[-1] == tok.eos_token_id
    assert enc.truncated and enc.full_length == 5 + 100 + 1
    assert enc.labels[:5] == [IGNORE_INDEX] * 5


def test_prompt_that_leaves_no_room_is_dropped_and_counted():
    tok = FakeTokenizer()
    assert encode_example(tok, "p" * 16, "r", cutoff_len=16) is None
    assert encode_example(tok, "p" * 14, "r", cutoff_len=16) is not None  # 14 + 1 + EOS
    records = [
        {"instruction": "x" * 300, "input": "", "output": "y"},
        {"instruction": "a", "input": "", "output": "b"},
    ]
    feats, report = encode_records(records, load_template("alpaca"), tok, cutoff_len=400)
    assert (report.kept, report.dropped_prompt_too_long, len(feats)) == (1, 1, 1)


def test_real_tokenizer_japanese_boundary_is_exact(ja_tokenizer):
    """Segments are tokenized apart, so prompt and response decode back exactly, EOS last."""
    template = load_template("alpaca_ja")
    for rec in seed_records(30):
        prompt = template.format(rec["instruction"], rec["input"])
        enc = encode_example(ja_tokenizer, prompt, rec["output"], cutoff_len=4096)
        n_prompt = sum(label == IGNORE_INDEX for label in enc.labels)
        assert ja_tokenizer.decode(enc.input_ids[:n_prompt]) == prompt
        assert ja_tokenizer.decode(enc.input_ids[n_prompt:-1]) == rec["output"]
        assert enc.input_ids[-1] == ja_tokenizer.eos_token_id
        assert all(label != IGNORE_INDEX for label in enc.labels[n_prompt:])


def test_joint_tokenization_would_merge_across_the_boundary(ja_tokenizer):
    """The trap is real for this tokenizer: BPE merges straddle a cut inside Japanese text."""

    def ids(text):
        return ja_tokenizer.encode(text, add_special_tokens=False)

    outputs = [r["output"] for r in seed_records(40)]
    straddled = [o for o in outputs if ids(o) != ids(o[: len(o) // 2]) + ids(o[len(o) // 2 :])]
    assert len(straddled) >= 10


def test_every_example_ends_with_eos_even_when_truncated(ja_tokenizer):
    feats, report = encode_records(seed_records(), load_template("alpaca_ja"), ja_tokenizer, cutoff_len=96)
    assert report.truncated > 0 and report.kept == len(feats)
    for f in feats:
        assert f["input_ids"][-1] == ja_tokenizer.eos_token_id == f["labels"][-1]
        assert len(f["input_ids"]) <= 96
    assert 0.2 < report.tokens_per_character < 3


def test_pad_is_never_eos(ja_tokenizer):
    assert resolve_pad_token(ja_tokenizer) == ja_tokenizer.pad_token_id != ja_tokenizer.eos_token_id


def test_pad_falls_back_when_tokenizer_pads_with_eos(ja_tokenizer):
    tok = ja_tokenizer.__class__(
        tokenizer_object=ja_tokenizer.backend_tokenizer, eos_token="</s>", pad_token="</s>"
    )  # no unk either: like GPT-2 with pad = eos
    pad = resolve_pad_token(tok)
    assert pad != tok.eos_token_id and tok.pad_token_id == pad


def test_eos_does_not_depend_on_add_eos_token(tmp_path, ja_tokenizer):
    """Whether a tokenizer honours add_eos_token (BLOOM's ignored it; transformers 5's generic
    backend appends it) must not matter: exactly one EOS, at the end, either way."""
    from transformers import AutoTokenizer

    ja_tokenizer.save_pretrained(tmp_path)
    encodings = []
    for flag in (True, False):
        tok = AutoTokenizer.from_pretrained(tmp_path, add_eos_token=flag)
        enc = encode_example(tok, "吾輩は", "猫である", cutoff_len=64)
        assert enc.input_ids.count(tok.eos_token_id) == 1 and enc.input_ids[-1] == tok.eos_token_id
        encodings.append(enc.input_ids)
    assert encodings[0] == encodings[1]
