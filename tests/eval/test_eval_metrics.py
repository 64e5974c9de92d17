"""Each metric of ``kaika eval generate`` on hand-made cases whose values are worked out by hand."""

from __future__ import annotations

import pytest

from kaika.eval import metrics
from kaika.eval.judge import build_prompt, parse_score


def test_normalize_is_nfkc_without_whitespace():
    assert metrics.normalize("ＡＢ　１２\nｶﾀｶﾅ です") == "AB12カタカナです"


def test_chrf_bounds_and_japanese_formatting():
    assert metrics.chrf("吾輩は猫である。", "吾輩は猫である。") == pytest.approx(100.0)
    assert metrics.chrf("abc", "吾輩は猫") == pytest.approx(0.0)
    # Spaces, line breaks and full-width forms are formatting: no n-gram changes.
    assert metrics.chrf("吾輩は 猫\nである。１", "吾輩は猫である。1") == pytest.approx(100.0)


def test_chrf_value_by_hand():
    # hyp あいう, ref あいうえ (char_order 6, beta 2). sacrebleu averages precision and recall over
    # the "effective" orders, those both sides have n-grams of, then takes F-beta:
    #   n=1: P 3/3, R 3/4;  n=2: P 2/2, R 2/3;  n=3: P 1/1, R 1/2;  n=4..6: the hypothesis has none.
    p = (1 + 1 + 1) / 3
    r = (3 / 4 + 2 / 3 + 1 / 2) / 3
    expected = 100 * (1 + 4) * p * r / (4 * p + r)
    assert metrics.chrf("あいう", "あいうえ") == pytest.approx(expected, abs=1e-6)


def test_corpus_chrf_pools_statistics():
    a, b = ("あいう", "あいうえ"), ("かきくけこ", "かきくけこ")
    pooled = metrics.corpus_chrf([a[0], b[0]], [a[1], b[1]])
    # Pooled counts differ from the mean of the sentence scores, and lie between them.
    assert metrics.chrf(*a) < pooled < metrics.chrf(*b) == pytest.approx(100.0)
    assert pooled != pytest.approx((metrics.chrf(*a) + metrics.chrf(*b)) / 2)


def test_rouge_l_on_characters():
    # LCS of きょうはてんき and きょうはいいてんき is 7 characters: P = 7/7, R = 7/9, F = 14/16.
    assert metrics.rouge_l("きょうはてんき", "きょうはいいてんき") == pytest.approx(0.875)
    assert metrics.rouge_l("ねこ", "いぬ") == 0.0
    assert metrics.rouge_l("猫が好き", "猫 が 好き") == pytest.approx(1.0)


def test_morpheme_rouge_l_by_hand():
    # UniDic-lite cuts 今日は良い天気です into 今日/は/良い/天気/です and 今日は天気です into
    # 今日/は/天気/です: LCS 4 morphemes, P = 4/4, R = 4/5, F = 8/9.
    assert [w for w in metrics._MorphemeTokenizer().tokenize("今日は良い天気です")] == [
        "今日",
        "は",
        "良い",
        "天気",
        "です",
    ]
    assert metrics.rouge_l_morph("今日は天気です", "今日は良い天気です") == pytest.approx(8 / 9)
    # Full-width forms and spaces are formatting here too; MeCab does not make tokens of spaces.
    assert metrics.rouge_l_morph("ＡＩは　すごい", "AIはすごい") == pytest.approx(1.0)


def test_morpheme_bleu():
    assert metrics.bleu_ja("吾輩は猫である。", "吾輩は猫である。") == pytest.approx(100.0)
    assert metrics.bleu_ja("犬", "吾輩は猫である。") == 0.0
    # The tokenizer is MeCab (IPAdic): 吾輩/は/猫/で/ある/。 against 吾輩/は/犬/で/ある/。 share
    # 5 of 6 unigrams, 3 of 5 bigrams, 1 of 4 trigrams, 0 of 3 four-grams → sacrebleu's
    # exponential smoothing; sacrebleu computed on its own tokens gives the same number.
    from sacrebleu.metrics import BLEU

    plain = (
        BLEU(effective_order=True).sentence_score("吾輩 は 猫 で ある 。", ["吾輩 は 犬 で ある 。"]).score
    )
    assert metrics.bleu_ja("吾輩は猫である。", "吾輩は犬である。") == pytest.approx(plain)
    names = metrics.morpheme_tokenizers()
    assert (
        "tok:ja-mecab" in names["bleu_ja"]
        and "IPA" in names["bleu_ja"]
        and "UniDic-lite" in names["rouge_l_morph"]
    )


def test_repetition_rate():
    assert metrics.repetition_rate("ああああ", n=2) == pytest.approx(2 / 3)  # ああ ×3, 1 unique
    # 8 chars → 5 four-grams, 猫です。 twice: 1 - 4/5
    assert metrics.repetition_rate("猫です。猫です。", n=4) == pytest.approx(0.2)
    assert metrics.repetition_rate("吾輩は猫である。名前はまだ無い。", n=4) == 0.0
    assert metrics.repetition_rate("短い", n=8) is None  # no n-gram: undefined, not "no repetition"
    assert metrics.repetition_rate("ありがとう。" * 20) > 0.9  # a loop, default n


def test_japanese_ratio():
    assert metrics.japanese_ratio("Python は楽しい") == pytest.approx(4 / 10)  # 6 Latin + 4 Japanese
    assert metrics.japanese_ratio("ラーメンを々") == 1.0  # ー and 々 count as Japanese
    assert metrics.japanese_ratio("Hello, world!") == 0.0
    assert metrics.japanese_ratio("ＡＢＣ漢字") == pytest.approx(2 / 5)  # full-width Latin is Latin
    assert metrics.japanese_ratio("123、!?") is None  # no letters: undefined, not 0


def test_length_ratio():
    assert metrics.length_ratio("あいう", "あいう えおか") == pytest.approx(0.5)
    assert metrics.length_ratio("あ", " ") is None


def row(response, reference, stopped, new_tokens=3):
    return {
        "response": response,
        "reference": reference,
        "new_tokens": new_tokens,
        **metrics.score(response, reference, stopped),
    }


def test_summarize():
    rows = [
        row("あいう", "あいうえ", True, 4),
        row("Hello", "あいうえおかきくけこ", False, 8),
        row("123", "", True, 2),  # no reference, no letter
    ]
    s = metrics.summarize(rows)
    assert s.tasks == 3
    assert s.stop_rate == pytest.approx(2 / 3)
    assert s.empty_rate == 0.0 and metrics.summarize([row(" \n", "あ", False)]).empty_rate == 1.0
    assert s.repetition is None  # no answer has 8 characters
    # The mean repetition is over the answers long enough to have an 8-gram: 10 × あ gives 1 - 1/3.
    assert metrics.summarize(
        [row("ああああああああああ", "x", False), row("", "x", False)]
    ).repetition == pytest.approx(2 / 3)
    assert s.japanese_ratio == pytest.approx((1.0 + 0.0) / 2)  # the letter-less answer is left out
    assert s.length_ratio == pytest.approx((3 + 5) / (4 + 10))  # tasks with a reference only
    assert s.rouge_l == pytest.approx((rows[0]["rouge_l"] + 0.0) / 2)
    assert s.rouge_l_morph == pytest.approx((rows[0]["rouge_l_morph"] + rows[1]["rouge_l_morph"]) / 2)
    assert s.bleu_ja == pytest.approx(
        metrics.corpus_bleu_ja(["あいう", "Hello"], ["あいうえ", "あいうえおかきくけこ"])
    )
    assert s.chrf == pytest.approx(
        metrics.corpus_chrf(["あいう", "Hello"], ["あいうえ", "あいうえおかきくけこ"])
    )
    assert s.mean_new_tokens == pytest.approx(14 / 3)
    assert rows[2]["chrf"] is None and rows[2]["length_ratio"] is None


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("参考回答と同じ内容です。\n点数: 4", 4),
        ("理由: よい。\n点数：５点", 5),  # full-width colon and digit
        ("**点数**: 3", 3),
        ("4", 4),
        ("2点", 2),
        ("評価: 2/5", 2),
        ("初めは点数: 2 と考えたが、見直して\n点数: 4", 4),  # the last score wins
        ("Score: 1", 1),
        ("点数: 7", None),  # out of range
        ("点数: 0", None),
        ("採点できません。", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_judge_prompt_carries_the_grading_notes():
    prompt = build_prompt(
        {
            "instruction": "猫について",
            "input": "",
            "reference": "猫は動物",
            "eval_aspect": "- 動物と書けば5点",
            "response": "猫は可愛い",
        }
    )
    for part in ("猫について", "猫は動物", "- 動物と書けば5点", "猫は可愛い", "点数: N"):
        assert part in prompt
    assert "(特になし)" in build_prompt({"instruction": "x", "response": ""})
