"""Unpaired preferences for KTO: one answer per record, marked desirable or not.

The forms read (the files, directories and datasets ``kaika dpo`` reads):

* ``{"prompt": "…", "completion": "…", "label": true}`` (``prompt`` may be a conversation ending
  with a user turn; ``instruction`` and ``input``, or ``messages``, work as for pairs);
* a preference pair ``{…, "chosen": …, "rejected": …}``: two records, chosen with label true and
  rejected with label false (TRL's rule too).

``label`` is a JSON boolean: a string such as ``"true"`` or a number is refused with file, line and
field, as a missing label is; data with one class only is refused (KTO weighs the desirable answers
against the undesirable ones, and learns nothing from one side). Encoded by the encoder of ``kaika
train`` (:mod:`kaika.data.segments`), so the prompt ids are those generation uses and each answer ends
with its end-of-turn tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kaika.data.preference import (
    PAIR_FIELDS,
    answer_text,
    normalise_pair,
    pair_prompt,
    percentile_text,
    percentiles,
    record_prompt,
)
from kaika.data.records import (
    CHARS_PER_TOKEN_CAP,
    DataError,
    Problem,
    iter_source,
    over_char_cap,
    record_chars,
    warn_left_out,
)
from kaika.errors import KaikaError

UNPAIRED_FIELDS = ("prompt", "instruction", "input", "messages", "completion", "label")
COLUMN_FIELDS = tuple(dict.fromkeys(UNPAIRED_FIELDS + PAIR_FIELDS))


def normalise_unpaired(
    rec: Any, columns: dict[str, str], source: str, where: str, problems: list[Problem]
) -> list[dict]:
    """``rec`` as records ``{instruction, input}`` or ``{messages}`` with ``completion``, ``label``
    and ``where``: one, two for a pair, none after adding its problems."""
    if not isinstance(rec, dict):
        problems.append(Problem(source, where, None, f"expected a JSON object, got {type(rec).__name__}"))
        return []
    key = {f: columns.get(f, f) for f in COLUMN_FIELDS}
    label = {f: f if key[f] == f else f"{key[f]} (as {f})" for f in COLUMN_FIELDS}
    if key["completion"] not in rec and key["chosen"] in rec and key["rejected"] in rec:
        pair = normalise_pair(rec, columns, source, where, problems)
        if pair is None:
            return []
        prompt = {k: v for k, v in pair.items() if k not in ("chosen", "rejected")}
        return [{**prompt, "completion": pair["chosen"], "label": True},
                {**prompt, "completion": pair["rejected"], "label": False}]  # fmt: skip
    before = len(problems)
    for fld, why in (
        ("completion", "missing; KTO records need completion and label (or chosen and rejected)"),
        ("label", "missing: true for a desirable answer, false for an undesirable one"),
    ):
        if rec.get(key[fld]) is None:
            problems.append(
                Problem(source, where, label[fld], f"{why}; the record has keys {', '.join(map(str, rec))}")
            )
    if all(rec.get(key[f]) is None for f in ("prompt", "messages", "instruction")):
        problems.append(
            Problem(source, where, None, "no prompt: give prompt, instruction (and input) or messages")
        )
    if len(problems) > before:
        return []
    verdict = rec[key["label"]]
    if not isinstance(verdict, bool):
        problems.append(
            Problem(
                source, where, label["label"], f"expected true or false (a JSON boolean), got {verdict!r}"
            )
        )
    completion, problem = answer_text(rec[key["completion"]])
    if problem:
        problems.append(Problem(source, where, label["completion"], problem))
    out = {"where": f"{source}, {where}", **record_prompt(rec, key, label, source, where, problems)}
    if len(problems) > before:
        return []
    return [{**out, "completion": completion, "label": verdict}]


def load_unpaired(sources: Iterable[str], columns: dict[str, str] | None = None) -> list[dict]:
    """Every record of every source, validated, with both labels present; raises DataError listing
    every problem, or KaikaError when one class is missing."""
    columns = columns or {}
    unknown = sorted(set(columns) - set(COLUMN_FIELDS))
    if unknown:
        raise KaikaError(
            f"columns: unknown target field(s) {', '.join(unknown)}; use {', '.join(COLUMN_FIELDS)}"
        )
    sources = list(sources)
    if not sources:
        raise KaikaError("no KTO data given: pass --data FILE (prompt, completion, label; JSON or JSONL)")
    problems: list[Problem] = []
    records: list[dict] = []
    for source in sources:
        before = len(records) + len(problems)
        for where, rec in iter_source(source, problems):
            records.extend(normalise_unpaired(rec, columns, source, where, problems))
        if len(records) + len(problems) == before:
            problems.append(Problem(source, "file", None, "contains no records"))
    if problems:
        raise DataError(problems)
    good = sum(r["label"] for r in records)
    if good in (0, len(records)):
        raise KaikaError(
            f"{', '.join(sources)}: all {len(records)} records have label {str(bool(good)).lower()}; KTO weighs "
            "desirable answers (label true) against undesirable ones (label false) and needs both"
        )
    return records


@dataclass
class UnpairedReport:
    records: int = 0
    kept: int = 0
    desirable: int = 0  # kept records with label true
    undesirable: int = 0
    dropped_prompt_too_long: int = 0  # the prompt leaves no room for an answer (as train does)
    dropped_huge: int = 0  # over cutoff_len × CHARS_PER_TOKEN_CAP characters, left out untokenized
    conversations: int = 0
    truncated: int = 0  # answers cut to fit cutoff_len (their end-of-turn tokens kept)
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # p50/p90/max
    completion_tokens: dict[str, int] = field(default_factory=dict)
    cutoff_len: int = 0

    def summary(self) -> str:
        pct = percentile_text
        return (
            f"{self.kept}/{self.records} answers kept, {self.desirable} desirable and {self.undesirable} "
            f"undesirable ({self.dropped_prompt_too_long} dropped: prompt longer than cutoff_len {self.cutoff_len}; "
            f"{self.dropped_huge} left out untokenized: over cutoff_len × {CHARS_PER_TOKEN_CAP} characters; "
            f"{self.conversations} with a conversation prompt); tokens p50/p90/max: prompt "
            f"{pct(self.prompt_tokens)}, answer {pct(self.completion_tokens)}; {self.truncated} answers cut to "
            f"cutoff_len (end of turn kept)"
        )

    def weights_hint(self, desirable_weight: float, undesirable_weight: float) -> str | None:
        """The KTO paper's advice (its eq. 8, as TRL words it) when the classes are unbalanced and the
        weights do not make up for it; None when they do."""
        d, u = max(self.desirable, 1), max(self.undesirable, 1)
        low, high = u * undesirable_weight / d, 1.33 * u * undesirable_weight / d
        if d == u or low <= desirable_weight <= high:
            return None
        return (
            f"{d} desirable and {u} undesirable answers: the KTO paper advises desirable_weight × desirable "
            f"≈ undesirable_weight × undesirable (up to 4:3), e.g. --desirable-weight {low:.2f}"
        )


def encode_unpaired(
    records: list[dict], template, tokenizer, cutoff_len: int
) -> tuple[list[dict[str, Any]], UnpairedReport]:
    """``{prompt_ids, completion_ids, label}`` per record, the answer with its end-of-turn ids, prompt +
    answer within ``cutoff_len`` (a longer answer is cut, its end of turn kept)."""
    from kaika.data.segments import answer_ids, end_ids_count

    report = UnpairedReport(records=len(records), cutoff_len=cutoff_len)
    rows: list[dict[str, Any]] = []
    prompt_lengths: list[int] = []
    answer_lengths: list[int] = []
    for rec in records:
        if over_char_cap(rec, cutoff_len):
            warn_left_out(rec["where"], record_chars(rec), cutoff_len)
            report.dropped_huge += 1
            continue
        try:
            prompt_ids, ids, segment = answer_ids(template, tokenizer, pair_prompt(rec), rec["completion"])
        except KaikaError as e:
            raise KaikaError(f"{rec['where']}: {e}") from None
        end = end_ids_count(template, tokenizer, segment)
        room = cutoff_len - len(prompt_ids)
        if room < end + 1:
            report.dropped_prompt_too_long += 1
            continue
        prompt_lengths.append(len(prompt_ids))
        answer_lengths.append(len(ids))
        if len(ids) > room:
            ids = ids[: room - end] + ids[-end:]
            report.truncated += 1
        report.conversations += "messages" in rec
        report.desirable += rec["label"]
        rows.append({"prompt_ids": prompt_ids, "completion_ids": ids, "label": rec["label"]})
    if records and not rows:
        raise KaikaError(f"no KTO record fits cutoff_len {cutoff_len}: raise --cutoff-len")
    report.kept = len(rows)
    report.undesirable = report.kept - report.desirable
    report.prompt_tokens = percentiles(prompt_lengths)
    report.completion_tokens = percentiles(answer_lengths)
    return rows, report
