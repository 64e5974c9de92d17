"""``kaika data check``: what is wrong with instruction data (and the ``kaika data`` subcommands;
the numbers of ``kaika data stats`` come from ``kaika.data.stats``).

``check_files()`` reads every record as it is (broken ones included), runs the checks below
and returns a report of findings, each with its kind, severity, record, field and a short
excerpt. The checks, by kind:

* structure: ``unreadable``, ``missing_field``, ``not_string``, ``empty_field``;
  ``duplicate`` (identical records), ``near_duplicate`` (identical after NFKC, case folding
  and dropping spaces and punctuation), ``same_prompt`` (one prompt, different answers),
  ``output_copies_input``;
* Japanese (sources whose text is mostly Japanese): ``bracket_unbalanced`` (「」『』（）【】…
  opened and never closed, or closed and never opened — the classic machine-translation
  loss), ``bracket_mixed_width`` (（…) ), ``residual_english`` (a field mostly in Latin letters,
  code and URLs aside), ``untranslated_comment`` (English comments inside code blocks, kept
  apart from the code itself, which is never flagged), ``width`` (half-width katakana,
  full-width Latin letters and digits: NFKC would change them);
* text: ``bad_char`` (U+FFFD, control and zero-width characters), ``whitespace`` (leading or
  trailing);
* length: ``length_outlier`` (far out on a log scale), and with a tokenizer ``too_long``
  (the example exceeds ``cutoff_len`` tokens and would be truncated, or dropped).

Preference pairs (records with ``chosen`` and ``rejected``) are read as ``kaika dpo`` reads them: its
refusals are findings, and the prompt and both answers are checked as fields.

Conversation records (``messages``, ShareGPT) are read as training reads them; each turn is
checked like a field (named ``turn 2 assistant``), lengths are compared within one role, and a
duplicate is the same turns.

``fix_files()`` applies only unambiguous mechanical fixes and writes new files plus a log of
every change; inputs are never modified. It fixes Alpaca fields; conversations and preference pairs
are copied as they are.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kaika.atomic import written_files
from kaika.config import Checked, DataArgs, check, option
from kaika.data.preference import normalise_pair
from kaika.data.records import (
    CHARS_PER_TOKEN_CAP,
    FIELDS,
    Problem,
    iter_source,
    normalise_record,
    over_char_cap,
    record_chars,
)
from kaika.data.stats import TokenLengths
from kaika.errors import KaikaError
from kaika.guard import check_output_file

SEVERITIES = ("info", "warning", "error")
# kind -> (severity, what it means); the order is the order of the report.
KINDS: dict[str, tuple[str, str]] = {
    "unreadable": ("error", "line or record that is not valid JSON / UTF-8 / an object"),
    "missing_field": ("error", "instruction or output missing"),
    "not_string": ("error", "a field that is not a string"),
    "empty_field": ("error", "instruction or output empty"),
    "unrenderable": ("error", "the template refuses the record (with --model): training would stop on it"),
    "duplicate": ("warning", "identical to an earlier record"),
    "near_duplicate": ("warning", "identical to an earlier record after normalisation"),
    "same_prompt": ("info", "same instruction and input as an earlier record, different output"),
    "output_copies_input": ("warning", "output identical to the input or the instruction"),
    "bracket_unbalanced": ("warning", "bracket or quote opened and never closed, or closed and never opened"),
    "bracket_mixed_width": ("info", "full-width bracket closed by a half-width one, or the reverse"),
    "residual_english": ("warning", "mostly Latin letters in a field of Japanese data (code and URLs aside)"),
    "untranslated_comment": ("info", "English comment inside a code block of Japanese data"),
    "width": ("info", "half-width katakana or full-width Latin letters/digits (NFKC would change them)"),
    "bad_char": ("warning", "replacement character U+FFFD, control or zero-width characters"),
    "whitespace": ("info", "leading or trailing whitespace"),
    "length_outlier": (
        "info",
        "field far longer than the rest (Tukey's far-out fence on log length, >= 4x the median)",
    ),
    "too_long": ("warning", "example longer than cutoff_len tokens: truncated (or dropped) in training"),
}

# Pairs checked for balance; half- and full-width parentheses/brackets balance each other.
PAIRS = {"「": "」", "『": "』", "（": "）", "(": ")", "【": "】", "〔": "〕", "［": "］", "[": "]",
         "《": "》", "〈": "〉", "｛": "｝", "{": "}", "“": "”"}  # fmt: skip
CLOSERS = {v: k for k, v in PAIRS.items()}
FAMILY = {"（": "(", "）": ")", "［": "[", "］": "]", "｛": "{", "｝": "}"}  # full-width -> half-width
# "1)", "a)", ":)" are list markers and smileys, not unbalanced brackets.
_NOT_A_BRACKET = re.compile(r"(?:(?<=^)|(?<=[\s、。：:]))[0-9A-Za-z０-９]{1,2}[)）]|[:;][)(]", re.M)
_CODE = re.compile(r"\n?(```|~~~)[^\n]*\n.*?(?:\1[^\n]*|\Z)|`[^`\n]+`", re.S)
_URL_MAIL = re.compile(r"(?:https?|ftp)://\S+|www\.\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_FENCE = re.compile(r"(```|~~~)[^\n]*\n(.*?)(?:\1|\Z)", re.S)
_COMMENT = re.compile(r"(?:^|\s)(?:#|//|--)\s+(\S.*)$|/\*(.*?)\*/|<!--(.*?)-->", re.M | re.S)
_JA = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9d]")
_LATIN = re.compile(r"[A-Za-zＡ-Ｚａ-ｚ]")
_HALFWIDTH_KANA = re.compile(r"[\uff61-\uff9f]+")
_FULLWIDTH_ALNUM = re.compile(r"[０-９Ａ-Ｚａ-ｚ]+")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200d\u2060\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_PUNCT_SPACE = re.compile(r"[\s\W_]+")


@dataclass
class CheckOptions(Checked):
    """What data check looks for."""

    lang: Literal["auto", "ja", "other"] = option(
        "auto", "Run the Japanese checks: ja, other (skip them), auto (per file, by its text)"
    )
    english_ratio: float = option(
        0.5, "residual_english: the share of Latin among Latin + Japanese letters", ge=0.0, le=1.0
    )
    english_min_letters: int = option(20, "residual_english: ... and at least this many Latin letters", ge=1)
    columns: dict[str, str] = option({}, "Column mapping, as in train (KEY=VALUE)")
    model: str | None = option(
        None, "Tokenizer (model id, dir, .gguf or builtin) to render the records as training does and count "
        "those over --cutoff-len",
    )  # fmt: skip
    template: str = option(DataArgs().template, "Prompt template for the token counts, as in train")
    cutoff_len: int = option(DataArgs().cutoff_len, "cutoff_len to measure against, as in train", ge=2)


@dataclass
class CheckCommand(Checked):
    """What data check does with its report."""

    json: str | None = option(None, "Also write the report as JSON to this path")
    fail_on: str = option(
        "error",
        "Exit 1 on findings at or above a severity (info, warning, error), or of a comma list of kinds; "
        "'never' always exits 0",
    )
    show: int = option(3, "Examples printed per kind", ge=0)
    fix: bool = option(False, "Write NAME.fixed.jsonl + NAME.fixes.jsonl (log) with the safe fixes")
    out_dir: str | None = option(None, "Where --fix writes (default: next to each input)")
    overwrite: bool = option(False, "Let --fix replace earlier .fixed/.fixes files")


@dataclass
class Finding:
    kind: str
    severity: str
    source: str
    index: int  # record index in its source; -1 when the record could not be read
    where: str  # "line 12"
    field: str | None
    message: str
    excerpt: str = ""

    def location(self) -> str:
        return f"{Path(self.source).name} {self.where}" + (f" {self.field}" if self.field else "")


@dataclass
class CheckReport:
    sources: list[str]
    records: int = 0
    japanese: dict[str, bool] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    too_long: dict[str, Any] = field(default_factory=dict)  # summary when a tokenizer was given

    def counts(self) -> dict[str, int]:
        c = Counter(f.kind for f in self.findings)
        return {k: c[k] for k in KINDS if c[k]}

    def records_with(self, kind: str) -> int:
        return len({(f.source, f.index) for f in self.findings if f.kind == kind})

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "records": self.records,
            "japanese": self.japanese,
            "counts": self.counts(),
            "records_with": {k: self.records_with(k) for k in self.counts()},
            "kinds": {k: {"severity": s, "meaning": m} for k, (s, m) in KINDS.items()},
            "too_long": self.too_long,
            "findings": [asdict(f) for f in self.findings],
        }


@dataclass
class Rec:
    source: str
    index: int
    where: str
    raw: Any
    fields: dict[str, str] | None  # None when the record is structurally broken
    record: dict | None = None  # as training reads it (Alpaca, or a conversation's "messages")

    @property
    def conversation(self) -> bool:
        return self.record is not None and "messages" in self.record

    @property
    def pair(self) -> bool:  # a preference pair (kaika dpo's data)
        return self.record is not None and "chosen" in self.record


def record_fields(norm: dict | None) -> dict[str, str] | None:
    """The texts of a record by field: Alpaca's three, or a conversation's turns ("turn 2 assistant");
    a preference pair's prompt so, then its ``chosen`` and ``rejected`` answers."""
    if norm is None:
        return None
    if "messages" in norm:
        fields = {f"turn {i} {m['role']}": m["content"] for i, m in enumerate(norm["messages"])}
    else:
        fields = {f: norm[f] for f in FIELDS if isinstance(norm.get(f), str)}
    if "chosen" in norm:
        fields.update(chosen=norm["chosen"], rejected=norm["rejected"])
    return fields


def is_pair(raw: Any, columns: dict[str, str]) -> bool:
    """A record with both preference sides is a pair (``kaika dpo``'s data), read as dpo reads it."""
    return isinstance(raw, dict) and all(columns.get(s, s) in raw for s in ("chosen", "rejected"))


def field_group(fld: str) -> str:
    """An Alpaca field, or the role of a conversation turn: what length outliers are compared within."""
    return fld.rsplit(" ", 1)[-1] if fld.startswith("turn ") else fld


# --------------------------------------------------------------------------- reading


def read_records(sources: list[str], columns: dict[str, str], report: CheckReport) -> list[Rec]:
    """Every record as it is; structural problems become findings, not an exception."""
    recs: list[Rec] = []
    for source in sources:
        problems: list[Problem] = []
        n = 0
        for where, raw in iter_source(source, problems):
            rec_problems: list[Problem] = []
            if is_pair(raw, columns):
                norm = normalise_pair(raw, columns, source, where, rec_problems)
            else:
                norm = normalise_record(raw, columns, source, where, rec_problems, conversations=True)
            for p in rec_problems:
                report.findings.append(_structure_finding(p, n))
            recs.append(Rec(source, n, where, raw, record_fields(norm), norm))
            n += 1
        for p in problems:  # read errors: malformed lines, bad UTF-8, missing file
            report.findings.append(_finding("unreadable", p.source, -1, p.where, None, p.message))
        if n == 0 and not problems:
            report.findings.append(_finding("unreadable", source, -1, "file", None, "contains no records"))
    report.records = len(recs)
    return recs


def _structure_finding(p: Problem, index: int) -> Finding:
    if p.field is None:
        kind = "unreadable"
    elif p.message.startswith("missing"):
        kind = "missing_field"
    elif p.message == "empty":
        kind = "empty_field"
    else:
        kind = "not_string"
    return _finding(kind, p.source, index, p.where, p.field, p.message)


def _finding(
    kind: str, source: str, index: int, where: str, fld: str | None, message: str, excerpt: str = ""
):
    return Finding(kind, KINDS[kind][0], source, index, where, fld, message, excerpt)


def excerpt(text: str, pos: int = 0, width: int = 40) -> str:
    start = max(0, pos - width // 2)
    end = min(len(text), start + width)
    s = text[start:end].replace("\n", "⏎")
    return ("…" if start > 0 else "") + s + ("…" if end < len(text) else "")


def is_japanese_source(recs: list[Rec]) -> bool:
    """Most records have Japanese in their instruction or output."""
    ok = [r for r in recs if r.fields]
    ja = sum(bool(_JA.search("".join(r.fields.values()))) for r in ok)
    return bool(ok) and ja >= 0.5 * len(ok)


# Code pasted without fences (common in Alpaca-style data): ASCII lines that look like code.
_CODE_HINT = re.compile(
    r"^\s*(?:def |class |import |from [\w.]+ import |return\b|for .* in |while |if .*:|elif |else:|try:|except"
    r"|print\(|SELECT |INSERT |UPDATE |var |let |const |function |#include|public |private |[{}])"
    r"|^(?: {2,}|\t)\S|[;{}]\s*$|\s(?:=|==|\+=|->|=>)\s|\w\([^)]*\)"
)


def code_lines(text: str) -> Iterator[re.Match]:
    """Lines of unfenced code: ASCII only and shaped like code (``def``, ``x = …``, ``f(x)``, ``{``…)."""
    for m in re.finditer(r"[^\n]+", text):
        line = m.group()
        if line.isascii() and _CODE_HINT.search(line):
            yield m


def code_blocks(text: str) -> Iterator[str]:
    """The contents of fenced code blocks and unfenced code lines (where comments live)."""
    yield from (m.group(2) for m in _FENCE.finditer(text))
    yield from (m.group() for m in code_lines(_CODE.sub(lambda m: "\n" * m.group().count("\n"), text)))


def mask_code(text: str) -> str:
    """``text`` with code (fenced, inline, unfenced lines), URLs and e-mail addresses blanked,
    positions kept: the prose checks see prose only."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group())  # noqa: E731
    text = _URL_MAIL.sub(blank, _CODE.sub(blank, text))
    for m in code_lines(text):
        text = text[: m.start()] + " " * len(m.group()) + text[m.end() :]
    return text


# --------------------------------------------------------------------------- per-field checks


@dataclass
class BracketIssue:
    pos: int
    char: str
    message: str
    fix: tuple[int, str, str] | None = None  # (position, old, new): replace old at position by new


def bracket_issues(text: str) -> list[BracketIssue]:
    """Unbalanced and mixed-width brackets in ``text`` (already masked of code)."""
    # "1)" starting a line and smileys are never brackets; "、2)" mid-line is one only if a "(" is open.
    always, maybe = set(), set()
    for m in _NOT_A_BRACKET.finditer(text):
        at_line_start = m.group()[0] not in ":;" and (m.start() == 0 or text[m.start() - 1] == "\n")
        (always if at_line_start or m.group()[0] in ":;" else maybe).add(m.end() - 1)
    stack: list[tuple[int, str]] = []
    issues: list[BracketIssue] = []
    for pos, ch in enumerate(text):
        if pos in always or (pos in maybe and not any(FAMILY.get(o, o) == "(" for _, o in stack)):
            continue
        if ch in PAIRS and not (ch == "“" and stack and stack[-1][1] == "“"):
            stack.append((pos, ch))
        elif ch in CLOSERS:
            want = FAMILY.get(CLOSERS[ch], CLOSERS[ch])
            depth = next(
                (i for i in range(len(stack) - 1, -1, -1) if FAMILY.get(stack[i][1], stack[i][1]) == want),
                None,
            )
            if depth is None:
                issues.append(BracketIssue(pos, ch, f"{ch} at column {pos + 1} has no opening {CLOSERS[ch]}"))
                continue
            for p, o in stack[depth + 1 :]:
                issues.append(BracketIssue(p, o, f"{o} at column {p + 1} is never closed"))
            opos, opener = stack[depth]
            del stack[depth:]
            if PAIRS[opener] != ch:  # （…) or (…）
                issues.append(
                    BracketIssue(
                        pos,
                        ch,
                        f"{opener} at column {opos + 1} is closed by {ch} at column {pos + 1}",
                        fix=(pos, ch, PAIRS[opener]),
                    )
                )
    issues.extend(BracketIssue(p, o, f"{o} at column {p + 1} is never closed") for p, o in stack)
    return sorted(issues, key=lambda i: i.pos)


def repair_lost_opener(text: str, issue: BracketIssue, others: list[str]) -> tuple[int, str, str] | None:
    """An unambiguous place for a lost opening bracket: another field quotes the same span whole.

    「波ではなく、神の手を見る」の意味を説明する。 that lost its 「 is repaired when the input or output
    holds 「波ではなく、神の手を見る」: the opener goes where that quoted text starts. Otherwise None.
    """
    if issue.char not in CLOSERS or "has no opening" not in issue.message:
        return None
    opener = CLOSERS[issue.char]
    candidates = set()
    for other in others:
        for m in re.finditer(
            re.escape(opener) + r"([^" + re.escape(opener + issue.char) + r"]+)" + re.escape(issue.char),
            other,
        ):
            inner = m.group(1)
            start = issue.pos - len(inner)
            if start >= 0 and text[start : issue.pos] == inner:
                candidates.add(start)
    return (min(candidates), "", opener) if len(candidates) == 1 else None


_SENTENCE_START = re.compile(r"(?:^|[。！？!?\n])[\s\-・*]*")
_BRACKET_CHARS = set(PAIRS) | set(CLOSERS)


def sentence_start_opener(text: str, issue: BracketIssue) -> int | None:
    """Where a lost opening bracket most likely stood: the start of the sentence holding the closer,
    when nothing between the two is a bracket (DeepL's usual loss). A hint, not a fix: the quote
    may have begun mid-sentence."""
    if issue.char not in CLOSERS or "has no opening" not in issue.message:
        return None
    start = max((m.end() for m in _SENTENCE_START.finditer(text, 0, issue.pos)), default=0)
    segment = text[start : issue.pos]
    return start if segment and not _BRACKET_CHARS & set(segment) else None


def english_share(text: str) -> tuple[int, float]:
    latin = len(_LATIN.findall(text))
    ja = len(_JA.findall(text))
    return latin, latin / max(latin + ja, 1)


def check_text(rec: Rec, fld: str, text: str, japanese: bool, opts: CheckOptions, out: list[Finding]) -> None:
    add = lambda kind, msg, pos=0: out.append(  # noqa: E731
        _finding(kind, rec.source, rec.index, rec.where, fld, msg, excerpt(text, pos))
    )
    if text != text.strip():
        add("whitespace", "leading or trailing whitespace", 0 if text[:1].isspace() else len(text))
    for pattern, what in ((_ZERO_WIDTH, "zero-width character"), (_CONTROL, "control character")):
        m = pattern.search(text)
        if m:
            add("bad_char", f"{what} U+{ord(m.group()):04X} at column {m.start() + 1}", m.start())
    if "\ufffd" in text:
        i = text.index("\ufffd")
        add("bad_char", f"replacement character U+FFFD at column {i + 1} (text damaged by a bad decode)", i)
    if not japanese:
        return
    masked = mask_code(text)
    others = [t for f, t in rec.fields.items() if f != fld and t]
    for issue in bracket_issues(masked):
        if issue.fix:
            add("bracket_mixed_width", issue.message, issue.pos)
        else:
            fix = repair_lost_opener(text, issue, others)
            hint = sentence_start_opener(masked, issue) if not fix else None
            add(
                "bracket_unbalanced",
                issue.message
                + ("; repairable from another field" if fix else "")
                + (
                    f"; probably lost at the start of the sentence (column {hint + 1})"
                    if hint is not None
                    else ""
                ),
                issue.pos,
            )
    latin, share = english_share(masked)
    if latin >= opts.english_min_letters and share >= opts.english_ratio:
        add("residual_english", f"{share:.0%} of letters are Latin ({latin}), outside code and URLs")
    for pattern, what in (
        (_HALFWIDTH_KANA, "half-width katakana"),
        (_FULLWIDTH_ALNUM, "full-width Latin/digits"),
    ):
        m = pattern.search(masked)
        if m:
            add(
                "width",
                f"{what} {m.group()!r}: NFKC gives {unicodedata.normalize('NFKC', m.group())!r}",
                m.start(),
            )
    for block in code_blocks(text):
        for c in _COMMENT.finditer(block):
            comment = next(g for g in c.groups() if g is not None).strip()
            if len(_LATIN.findall(comment)) >= 8 and not _JA.search(comment):
                add(
                    "untranslated_comment",
                    f"code comment in English: {comment[:60]!r}",
                    max(text.find(comment), 0),
                )


# --------------------------------------------------------------------------- record-level checks


def norm_key(text: str) -> str:
    return _PUNCT_SPACE.sub("", unicodedata.normalize("NFKC", text).casefold())


def check_duplicates(recs: list[Rec], out: list[Finding]) -> None:
    exact: dict[tuple, Rec] = {}
    near: dict[tuple, Rec] = {}
    prompts: dict[tuple, Rec] = {}
    for rec in recs:
        if not rec.fields:
            continue
        # Alpaca: (instruction, input, output); a conversation: its turns, tagged so the two never meet.
        key = (rec.conversation, *rec.fields.values())
        nkey = tuple(norm_key(x) if isinstance(x, str) else x for x in key)
        prompt = nkey[:-1]  # all but the answer (the last turn, or output)
        text = next(iter(rec.fields.values()))
        first = exact.get(key) or near.get(nkey)
        if key in exact:
            out.append(_dup("duplicate", rec, exact[key], text))
        elif nkey in near:
            out.append(_dup("near_duplicate", rec, near[nkey], text))
        elif prompt in prompts:
            out.append(_dup("same_prompt", rec, prompts[prompt], text))
        if first is None:
            exact.setdefault(key, rec)
            near.setdefault(nkey, rec)
        prompts.setdefault(prompt, rec)


def _dup(kind: str, rec: Rec, first: Rec, text: str) -> Finding:
    name = "" if first.source == rec.source else f"{Path(first.source).name} "
    return _finding(
        kind, rec.source, rec.index, rec.where, None, f"same as {name}{first.where}", excerpt(text)
    )


def check_copies(rec: Rec, out: list[Finding]) -> None:
    f = rec.fields
    o = norm_key(f["output"])
    for other in ("input", "instruction"):
        if f[other] and o and o == norm_key(f[other]):
            out.append(
                _finding(
                    "output_copies_input",
                    rec.source,
                    rec.index,
                    rec.where,
                    "output",
                    f"output is the {other}",
                    excerpt(f["output"]),
                )  # fmt: skip
            )
            return


def check_lengths(recs: list[Rec], out: list[Finding]) -> None:
    """Far-out values (Tukey: above Q3 + 3 IQR) of log character length, per field, at least 4x the median."""
    import numpy as np

    groups: dict[str, list[tuple[Rec, str]]] = {}
    for r in recs:
        for fld, text in (r.fields or {}).items():
            if text:
                groups.setdefault(field_group(fld), []).append((r, fld))
    for pairs in groups.values():
        items = [(r, fld, len(r.fields[fld])) for r, fld in pairs]
        if len(items) < 20:
            continue
        logs = np.log([n for _, _, n in items])
        q1, q3 = np.percentile(logs, [25, 75])
        fence = max(q3 + 3 * (q3 - q1), np.median(logs) + math.log(4))  # and never under 4x the median
        for rec, fld, n in items:
            if math.log(n) > fence:
                out.append(
                    _finding(
                        "length_outlier",
                        rec.source,
                        rec.index,
                        rec.where,
                        fld,
                        f"{n:,} characters (far-out fence: {math.exp(fence):,.0f})",
                        excerpt(rec.fields[fld]),
                    )  # fmt: skip
                )


def _lengths(tok: TokenLengths, recs: list[Rec], report: CheckReport) -> list[tuple[Rec, tuple[int, int]]]:
    """Token lengths as training encodes the records; a record the template refuses is a finding
    (training would stop on it), the others are measured."""
    try:
        return list(zip(recs, tok.example_lengths([r.record for r in recs]), strict=True))
    except KaikaError:  # one record at a time, to name each the template refuses
        pass
    out = []
    for rec in recs:
        try:
            out.append((rec, tok.example_lengths([rec.record])[0]))
        except KaikaError as e:
            report.findings.append(_finding("unrenderable", rec.source, rec.index, rec.where, None, str(e)))
    return out


def _huge_records(recs: list[Rec], cutoff_len: int, report: CheckReport) -> list[Rec]:
    """Records training leaves out before tokenizing them (over cutoff_len × CHARS_PER_TOKEN_CAP
    characters), each a too_long finding; not tokenized here either."""
    huge = [r for r in recs if over_char_cap(r.record, cutoff_len)]
    for rec in huge:
        msg = (
            f"{record_chars(rec.record):,} characters, over cutoff_len {cutoff_len} × {CHARS_PER_TOKEN_CAP}: "
            "left out in training, untokenized"
        )
        first = excerpt(next(iter(rec.fields.values())))
        report.findings.append(_finding("too_long", rec.source, rec.index, rec.where, None, msg, first))
    return huge


def check_token_lengths(recs: list[Rec], opts: CheckOptions, report: CheckReport) -> None:
    ok = [r for r in recs if r.record and not r.pair]  # pairs: kaika dpo reports their lengths
    tok = TokenLengths.load(opts.model, opts.template, any(r.conversation for r in ok))
    huge = _huge_records(ok, opts.cutoff_len, report)
    measured = _lengths(tok, [r for r in ok if r not in huge], report)
    truncated, dropped = 0, len(huge)
    for rec, (prompt_len, full_len) in measured:
        if full_len <= opts.cutoff_len:
            continue
        if rec.conversation:  # what training does with it: oldest exchanges out first, then the cut
            from kaika.data.segments import encode_conversation

            ex = encode_conversation(tok.template, tok.tokenizer, rec.record["messages"], opts.cutoff_len)
            if ex is None:
                dropped += 1
                msg = f"{full_len} tokens, and its last exchange alone does not fit cutoff_len {opts.cutoff_len}: dropped in training"
            else:
                truncated += 1
                left = f"its {ex.turns_dropped} oldest exchange(s) are left out" if ex.turns_dropped else ""
                cut = "its last answer is cut, end of turn kept" if ex.truncated else ""
                msg = f"{full_len} tokens > cutoff_len {opts.cutoff_len}: " + " and ".join(
                    x for x in (left, cut) if x
                )
        elif prompt_len + 1 >= opts.cutoff_len:
            dropped += 1
            msg = (
                f"the prompt alone is {prompt_len} tokens (cutoff_len {opts.cutoff_len}): dropped in training"
            )
        else:
            truncated += 1
            msg = f"{full_len} tokens > cutoff_len {opts.cutoff_len}: the response is cut, EOS kept"
        report.findings.append(
            _finding(
                "too_long",
                rec.source,
                rec.index,
                rec.where,
                None,
                msg,
                excerpt(next(iter(rec.fields.values()))),
            )
        )
    report.too_long = {
        "model": opts.model,
        "template": tok.template.name,
        "cutoff_len": opts.cutoff_len,
        "truncated": truncated,
        "dropped": dropped,
        "examples": len(ok),
    }


def check_files(sources: list[str], opts: CheckOptions | None = None) -> CheckReport:
    """Run every check on every record of ``sources``; nothing is modified."""
    opts = opts or CheckOptions()
    check(opts)  # its choices and bounds again: the fields may have been assigned after it was built
    if not sources:
        raise KaikaError("give at least one data file")
    report = CheckReport(list(sources))
    recs = read_records(list(sources), opts.columns, report)
    for source in sources:
        mine = [r for r in recs if r.source == source]
        report.japanese[source] = opts.lang == "ja" or (opts.lang == "auto" and is_japanese_source(mine))
    check_duplicates(recs, report.findings)  # across files too: train/eval overlap is a duplicate
    for rec in recs:
        if not rec.fields:
            continue
        if not rec.conversation and not rec.pair:
            check_copies(rec, report.findings)
        for fld, text in rec.fields.items():  # a conversation: each turn, checked like a field
            if text:
                check_text(rec, fld, text, report.japanese[rec.source], opts, report.findings)
    check_lengths(recs, report.findings)
    if opts.model:
        check_token_lengths(recs, opts, report)
    order = {k: i for i, k in enumerate(KINDS)}
    report.findings.sort(key=lambda f: (order[f.kind], sources.index(f.source), f.index))
    return report


# --------------------------------------------------------------------------- fixes


@dataclass
class FixOptions(Checked):
    """What --fix changes (unambiguous, mechanical fixes only)."""

    brackets: bool = option(True, "Mixed-width closers; lost openers where another field shows the place")
    whitespace: bool = option(True, "Strip leading and trailing whitespace")
    invisible: bool = option(True, "Drop zero-width characters and BOMs")
    nfkc: Literal["none", "width", "full"] = option(
        "none", "NFKC on half-width kana and full-width Latin/digits only (width), or on everything (full)"
    )


def fix_text(text: str, others: list[str], japanese: bool, fx: FixOptions) -> tuple[str, list[str]]:
    """``text`` with the safe fixes applied, and what was done."""
    done = []
    if fx.invisible and _ZERO_WIDTH.search(text):
        text = _ZERO_WIDTH.sub("", text)
        done.append("removed zero-width characters")
    if fx.whitespace and text != text.strip():
        text = text.strip()
        done.append("stripped whitespace")
    if fx.nfkc == "full" and unicodedata.normalize("NFKC", text) != text:
        text = unicodedata.normalize("NFKC", text)
        done.append("NFKC")
    elif fx.nfkc == "width":
        new = _FULLWIDTH_ALNUM.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)
        new = _HALFWIDTH_KANA.sub(lambda m: unicodedata.normalize("NFKC", m.group()), new)
        if new != text:
            text = new
            done.append("NFKC on half-width katakana and full-width Latin/digits")
    if fx.brackets and japanese:
        edits = []
        for issue in bracket_issues(mask_code(text)):
            fix = issue.fix or repair_lost_opener(text, issue, others)
            if fix:
                edits.append((fix, issue.message))
        for (pos, old, new), message in sorted(
            edits, key=lambda e: -e[0][0]
        ):  # right to left: positions hold
            text = text[:pos] + new + text[pos + len(old) :]
            done.append(f"bracket: {message} -> {'inserted ' + new if not old else old + ' → ' + new}")
    return text, done


def fix_files(
    sources: list[str], out_dir: str | None, opts: CheckOptions, fx: FixOptions, overwrite: bool = False
) -> list[tuple[Path, Path, int]]:
    """Write ``<name>.fixed.jsonl`` and ``<name>.fixes.jsonl`` (the log) per source; never in place."""
    report = CheckReport(list(sources))
    recs = read_records(list(sources), opts.columns, report)
    unreadable = [f for f in report.findings if f.kind == "unreadable"]
    if unreadable:  # such lines cannot be copied into the fixed file, and nothing may vanish silently
        raise KaikaError(
            f"--fix: {unreadable[0].location()}: {unreadable[0].message}; repair unreadable lines first"
        )
    if out_dir and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise KaikaError(f"--out-dir {out_dir} is a file; give a directory for the fixed files")
    targets = {}  # every output checked before the first is written
    for source in sources:
        src = Path(source)
        base = Path(out_dir) if out_dir else src.parent
        targets[source] = (base / f"{src.stem}.fixed.jsonl", base / f"{src.stem}.fixes.jsonl")
    outputs = [p for pair in targets.values() for p in pair]
    for p in outputs:
        check_output_file(p, sources, "--fix output (it never writes in place)")
        if p.exists() and not overwrite:
            raise KaikaError(f"{p} exists: pass --overwrite or choose another --out-dir")
    if len(set(outputs)) < len(outputs):
        raise KaikaError(
            "two inputs have the same file name, so their fixed files would collide: use --out-dir per file"
        )
    written = []
    for source in sources:
        mine = [r for r in recs if r.source == source]
        japanese = opts.lang == "ja" or (opts.lang == "auto" and is_japanese_source(mine))
        fixed, log = targets[source]
        changes = 0
        # Both files appear whole, together, or neither does: a rerun never meets half a fix.
        with written_files([fixed, log], "--fix output") as (fo, fl):
            for rec in mine:
                raw = rec.raw
                if (
                    rec.fields and isinstance(raw, dict) and not rec.conversation and not rec.pair
                ):  # Alpaca only
                    raw = dict(raw)
                    for fld in FIELDS:
                        key = opts.columns.get(fld, fld)
                        text = rec.fields[fld]
                        others = [rec.fields[f] for f in FIELDS if f != fld and rec.fields[f]]
                        new, done = fix_text(text, others, japanese, fx)
                        if done:
                            raw[key] = new
                            changes += 1
                            entry = {"index": rec.index, "where": rec.where, "field": fld, "fixes": done,
                                     "before": text, "after": new}  # fmt: skip
                            fl.write(json.dumps(entry, ensure_ascii=False) + "\n")
                fo.write(json.dumps(raw, ensure_ascii=False) + "\n")  # broken records kept as they were
        written.append((fixed, log, changes))
    return written


# --------------------------------------------------------------------------- exit status and table


def failing(report: CheckReport, fail_on: str) -> list[Finding]:
    """Findings that make the check fail: at or above a severity, or of the listed kinds."""
    if fail_on == "never":
        return []
    if fail_on in SEVERITIES:
        floor = SEVERITIES.index(fail_on)
        return [f for f in report.findings if SEVERITIES.index(f.severity) >= floor]
    kinds = {k.strip() for k in fail_on.split(",") if k.strip()}
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise KaikaError(
            f"--fail-on: unknown kind(s) {', '.join(unknown)}; use never, {', '.join(SEVERITIES)} "
            f"or kinds: {', '.join(KINDS)}"
        )
    return [f for f in report.findings if f.kind in kinds]


def print_report(report: CheckReport, show: int = 3) -> None:
    n_files = len(report.sources)
    langs = ", ".join(
        f"{Path(s).name}: {'Japanese' if ja else 'not Japanese'}" for s, ja in report.japanese.items()
    )
    print(f"{report.records:,} records in {n_files} file{'s' * (n_files != 1)} ({langs})")
    counts = report.counts()
    if not counts:
        print("no problems found")
        return
    print(f"\n{'kind':<22} {'severity':<8} {'findings':>9} {'records':>8}  meaning")
    for kind, n in counts.items():
        sev, meaning = KINDS[kind]
        print(f"{kind:<22} {sev:<8} {n:>9,} {report.records_with(kind):>8,}  {meaning}")
    if report.too_long:
        t = report.too_long
        print(
            f"\nwith {t['model']} and template {t['template']}: {t['truncated'] + t['dropped']} of {t['examples']} "
            f"examples exceed cutoff_len {t['cutoff_len']}: {t['truncated']} shortened (response cut, EOS kept; "
            f"a conversation's oldest exchanges left out first), {t['dropped']} dropped (the prompt alone is too long)"
        )
    by_kind: dict[str, list[Finding]] = defaultdict(list)
    for f in report.findings:
        by_kind[f.kind].append(f)
    for kind in counts:
        print(f"\n{kind}:")
        for f in by_kind[kind][:show]:
            ex = f"  “{f.excerpt}”" if f.excerpt else ""
            print(f"  {f.location()}: {f.message}{ex}")
        if len(by_kind[kind]) > show:
            print(f"  … {len(by_kind[kind]) - show:,} more")
