"""Automatic metrics for Japanese answers, each a pure function of strings (definitions in docs/eval.md).

Japanese is written without spaces, so everything here works on characters, never on
whitespace tokens. Text is NFKC-normalised first (full-width ``１`` and ``Ａ`` equal ``1`` and
``A``; half-width katakana become full-width), and whitespace is ignored: a line break in the
answer where the reference has none is formatting, not content.

* chrF: sacrebleu's ``CHRF`` with ``word_order=0`` (plain chrF, not chrF++: sacrebleu's word
  n-grams come from splitting on whitespace, which for Japanese yields whole sentences as
  "words") and ``whitespace=False`` (spaces are not part of any character n-gram), default
  ``char_order=6``, ``beta=2`` and sacrebleu's own smoothing (precision and recall averaged
  over the n-gram orders both texts have, so a short answer is not scored 0 for lacking 6-grams). Corpus chrF pools the n-gram statistics of all tasks, as
  sacrebleu does; per task the sentence chrF is kept.
* ROUGE-L: ``rouge-score``'s LCS F-measure with a character tokenizer (its default tokenizer
  lower-cases and keeps only ``[a-z0-9]``, which deletes every Japanese character).
* morpheme BLEU: sacrebleu's BLEU with its ``ja-mecab`` tokenizer (MeCab + IPAdic), the tokenization
  Japanese MT papers report; corpus BLEU over the tasks, sentence BLEU (effective order) per task.
* morpheme ROUGE-L: ROUGE-L F over MeCab morphemes (fugashi + UniDic-lite, the dictionary
  llm-jp-eval's and many Japanese papers' tokenizers use). Both see NFKC text with its whitespace
  (MeCab does not make tokens of spaces; removing them would glue Latin words together).
* repetition rate: share of character n-grams of an answer that repeat an n-gram seen earlier
  in the same answer, ``1 - unique / total`` (seq-rep-n of Welleck et al. 2019, on characters);
  undefined for answers shorter than n.
* empty rate: share of answers with nothing left after normalisation.
* Japanese ratio: hiragana, katakana and kanji among all letters (Unicode category L).
* length ratio: answer characters / reference characters.
* stop rate: share of answers that ended with EOS before ``max_new_tokens``.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import cache
from typing import Any

from kaika.errors import require_extra

# Character n-gram length for the repetition rate. On the ELYZA-tasks-100 reference answers the
# rate is 0.021 on average for n = 8 (0.078 for n = 4: short n-grams such as 「すること」 recur in
# fluent Japanese), while a looping answer scores near 1.
REPETITION_N = 8


def normalize(text: str) -> str:
    """NFKC with all whitespace removed: the text every metric here compares."""
    return "".join(unicodedata.normalize("NFKC", text).split())


METRIC_MODULES = (
    "sacrebleu.metrics",
    "rouge_score.rouge_scorer",
    "regex",
    "MeCab",
    "ipadic",
    "fugashi",
    "unidic_lite",
)


def _require(module: str):
    import importlib

    require_extra("eval", (module,), "kaika eval")
    return importlib.import_module(module)


def check_installed() -> None:
    """The metric packages are there: said before minutes of generation, not after."""
    require_extra("eval", METRIC_MODULES, "kaika eval")


@cache
def _chrf():
    metrics = _require("sacrebleu.metrics")
    return metrics.CHRF(char_order=6, word_order=0, beta=2, whitespace=False, eps_smoothing=False)


def chrf(answer: str, reference: str) -> float:
    """Sentence chrF (0–100) of one answer against one reference."""
    return float(_chrf().sentence_score(normalize(answer), [normalize(reference)]).score)


def corpus_chrf(answers: list[str], references: list[str]) -> float:
    """Corpus chrF (0–100): character n-gram statistics summed over all pairs, then one F-score."""
    if not answers:
        return 0.0
    return float(
        _chrf().corpus_score([normalize(a) for a in answers], [[normalize(r) for r in references]]).score
    )


class _CharTokenizer:
    """rouge-score tokenizer interface: one token per (normalised, non-space) character."""

    def tokenize(self, text: str) -> list[str]:
        return list(normalize(text))


@cache
def _rouge(unit: str):
    """rouge-score's ROUGE-L on ``unit``s: characters, or MeCab morphemes (UniDic-lite)."""
    rouge_scorer = _require("rouge_score.rouge_scorer")
    tokenizer = _CharTokenizer() if unit == "characters" else _MorphemeTokenizer()
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer)


def rouge_l(answer: str, reference: str) -> float:
    """Character ROUGE-L F-measure (0–1): longest common subsequence of characters."""
    return float(_rouge("characters").score(reference, answer)["rougeL"].fmeasure)


@cache
def _bleu():
    metrics = _require("sacrebleu.metrics")
    return metrics.BLEU(tokenize="ja-mecab", effective_order=True)


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()


def bleu_ja(answer: str, reference: str) -> float:
    """Sentence BLEU (0–100) on MeCab/IPAdic morphemes, effective order (short answers are not 0 for
    lacking 4-grams)."""
    return float(_bleu().sentence_score(_nfkc(answer), [_nfkc(reference)]).score)


def corpus_bleu_ja(answers: list[str], references: list[str]) -> float:
    """Corpus BLEU (0–100) on MeCab/IPAdic morphemes: n-gram counts pooled over all pairs."""
    return float(_bleu().corpus_score([_nfkc(a) for a in answers], [[_nfkc(r) for r in references]]).score)


@cache
def _tagger():
    fugashi = _require("fugashi")
    _require("unidic_lite")
    return fugashi.Tagger()  # finds UniDic-lite by itself when it is installed


class _MorphemeTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return [w.surface for w in _tagger()(_nfkc(text))]


def rouge_l_morph(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (0–1) over MeCab morphemes (UniDic-lite)."""
    return float(_rouge("morphemes").score(reference, answer)["rougeL"].fmeasure)


def morpheme_tokenizers() -> dict[str, str]:
    """What the morpheme metrics tokenized with, named for the report."""
    from importlib.metadata import version

    bleu = _bleu()
    bleu.corpus_score(["。"], [["。"]])  # the signature names the tokenizer once it has run
    return {
        "bleu_ja": f"sacrebleu {version('sacrebleu')} {bleu.get_signature()} (MeCab {version('mecab-python3')}, "
        f"IPAdic {version('ipadic')})",
        "rouge_l_morph": f"fugashi {version('fugashi')} (MeCab), UniDic-lite {version('unidic-lite')}",
    }


def repetition_rate(text: str, n: int = REPETITION_N) -> float | None:
    """``1 - unique/total`` over the character n-grams of ``text``; None when it is shorter than n
    (an empty answer is not a non-repetitive one)."""
    chars = normalize(text)
    grams = [chars[i : i + n] for i in range(len(chars) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else None


@cache
def _japanese_pattern():
    regex = _require("regex")
    # Script_Extensions, not Script: the long-vowel mark ー and the iteration marks are "Common"
    # by script but listed under Hiragana/Katakana by extension.
    return regex.compile(r"[\p{scx=Hiragana}\p{scx=Katakana}\p{scx=Han}]")


def japanese_ratio(text: str) -> float | None:
    """Hiragana, katakana and kanji characters among all letters; None when there is no letter."""
    letters = [c for c in normalize(text) if unicodedata.category(c).startswith("L")]
    if not letters:
        return None
    pattern = _japanese_pattern()
    return sum(1 for c in letters if pattern.match(c)) / len(letters)


def length_ratio(answer: str, reference: str) -> float | None:
    """Answer characters / reference characters (normalised); None for an empty reference."""
    ref = len(normalize(reference))
    return len(normalize(answer)) / ref if ref else None


def score(answer: str, reference: str, stopped: bool, repetition_n: int = REPETITION_N) -> dict[str, Any]:
    """Every per-answer metric; reference-based ones are None when there is no reference."""
    has_ref = bool(normalize(reference))
    return {
        "chrf": chrf(answer, reference) if has_ref else None,
        "rouge_l": rouge_l(answer, reference) if has_ref else None,
        "bleu_ja": bleu_ja(answer, reference) if has_ref else None,
        "rouge_l_morph": rouge_l_morph(answer, reference) if has_ref else None,
        "repetition": repetition_rate(answer, repetition_n),
        "japanese_ratio": japanese_ratio(answer),
        "length_ratio": length_ratio(answer, reference),
        "stopped": bool(stopped),
    }


@dataclass
class Summary:
    """Metrics of one model over one task set (fields documented in docs/eval.md)."""

    tasks: int
    chrf: float | None  # corpus chrF over the tasks that have a reference, 0–100
    rouge_l: float | None  # mean character ROUGE-L F over those tasks, 0–1
    bleu_ja: float | None  # corpus BLEU on MeCab/IPAdic morphemes over those tasks, 0–100
    rouge_l_morph: float | None  # mean morpheme ROUGE-L F (MeCab/UniDic-lite) over those tasks, 0–1
    stop_rate: float  # share of answers ended by EOS
    empty_rate: float  # share of answers with no character left after normalisation
    repetition: float | None  # mean repetition rate over answers of at least n characters
    japanese_ratio: float | None  # mean over answers with at least one letter
    length_ratio: float | None  # total answer chars / total reference chars
    mean_new_tokens: float


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict[str, Any]]) -> Summary:
    """Aggregate rows holding ``response``, ``reference``, ``new_tokens`` and the ``score`` fields."""
    with_ref = [r for r in rows if normalize(r.get("reference") or "")]
    ref_chars = sum(len(normalize(r["reference"])) for r in with_ref)
    return Summary(
        tasks=len(rows),
        chrf=corpus_chrf([r["response"] for r in with_ref], [r["reference"] for r in with_ref])
        if with_ref
        else None,
        rouge_l=_mean([r["rouge_l"] for r in with_ref]),
        bleu_ja=corpus_bleu_ja([r["response"] for r in with_ref], [r["reference"] for r in with_ref])
        if with_ref
        else None,
        rouge_l_morph=_mean([r["rouge_l_morph"] for r in with_ref if r.get("rouge_l_morph") is not None]),
        stop_rate=_mean([float(r["stopped"]) for r in rows]) or 0.0,
        empty_rate=_mean([float(not normalize(r["response"])) for r in rows]) or 0.0,
        repetition=_mean([r["repetition"] for r in rows if r["repetition"] is not None]),
        japanese_ratio=_mean([r["japanese_ratio"] for r in rows if r["japanese_ratio"] is not None]),
        length_ratio=sum(len(normalize(r["response"])) for r in with_ref) / ref_chars if ref_chars else None,
        mean_new_tokens=_mean([float(r["new_tokens"]) for r in rows]) or 0.0,
    )
