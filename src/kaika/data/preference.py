"""Preference pairs: a prompt, a better answer (``chosen``) and a worse one (``rejected``).

The forms read (from JSON, JSONL, directories of them, saved and hub datasets, as training data):

* ``{"prompt": "…", "chosen": "…", "rejected": "…"}``: the prompt is one user turn;
* ``{"instruction": "…", "input": "…", "chosen": …, "rejected": …}``: an Alpaca prompt, rendered
  exactly as ``kaika train`` renders an Alpaca record;
* ``{"messages": [… ending with a user turn], "chosen": …, "rejected": …}`` (or ``prompt`` as such a
  list): a conversation so far;
* ``{"chosen": [whole conversation], "rejected": [whole conversation]}``: the prompt is the turns
  both share (the Anthropic HH / TRL "implicit prompt" form).

``chosen`` and ``rejected`` are strings, one assistant message ``{role, content}``, or a list of
one. Every problem of every record is reported at once, with file, line and field, before a model
loads: a missing or empty side, a side that is not the assistant's, chosen identical to rejected,
a prompt that is not a conversation ending with the user. ``--columns`` renames fields
(``chosen=better rejected=worse prompt=question``).

:func:`encode_pairs` turns pairs into token ids with :mod:`kaika.data.segments`, the encoder of
``kaika train`` and ``kaika generate``: the prompt ids are exactly those generation uses, each answer
ends with its end-of-turn tokens, and the loss is on the answers only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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

PAIR_FIELDS = ("prompt", "instruction", "input", "messages", "chosen", "rejected")
SIDES = ("chosen", "rejected")


def answer_text(value: Any) -> tuple[str | None, str | None]:
    """A side's text, or (None, what is wrong)."""
    from kaika.data.conversations import ROLES, _content

    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = ROLES.get(value.get("role", value.get("from")))
        if role != "assistant":
            return None, f"must be the assistant's answer, got role {value.get('role', value.get('from'))!r}"
        value = _content(value.get("content", value.get("value")))
        if value is None:
            return None, "the message's content must be a string"
    if isinstance(value, list):
        return None, "expected one answer (a string or one assistant message), got a list of turns"
    if not isinstance(value, str):
        return None, f"expected a string, got {type(value).__name__}"
    if not value.strip():
        return None, "empty"
    return value, None


def _turns(value: Any, source: str, where: str, key: str, problems: list[Problem]) -> list[dict] | None:
    """A prompt conversation (ending with the user's turn), checked as training conversations are."""
    from kaika.data.conversations import normalise_conversation

    rec = normalise_conversation({key: value}, key, {}, source, where, problems, ends_with="user")
    return rec["messages"] if rec else None


def _split_implicit(chosen: Any, rejected: Any, source: str, where: str, problems: list[Problem]):
    """Whole conversations on both sides: (prompt turns, chosen text, rejected text) or None."""
    from kaika.data.conversations import normalise_conversation

    sides = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        rec = normalise_conversation({key: value}, key, {}, source, where, problems)
        if rec is None:
            return None
        sides.append(rec["messages"])
    head_c, head_r = sides[0][:-1], sides[1][:-1]
    if head_c != head_r:
        problems.append(
            Problem(
                source,
                where,
                None,
                "chosen and rejected are whole conversations that differ before their last turn; "
                "the prompt must be the same on both sides (or give it apart as prompt/messages)",
            )
        )
        return None
    return head_c, sides[0][-1]["content"], sides[1][-1]["content"]


def normalise_pair(
    rec: Any, columns: dict[str, str], source: str, where: str, problems: list[Problem]
) -> dict | None:
    """``rec`` as ``{instruction, input}`` or ``{messages}``, with ``chosen``, ``rejected`` and
    ``where``; None after adding its problems."""
    if not isinstance(rec, dict):
        problems.append(Problem(source, where, None, f"expected a JSON object, got {type(rec).__name__}"))
        return None
    key = {f: columns.get(f, f) for f in PAIR_FIELDS}
    label = {f: f if key[f] == f else f"{key[f]} (as {f})" for f in PAIR_FIELDS}
    missing = [label[s] for s in SIDES if rec.get(key[s]) is None]
    if missing:
        keys = ", ".join(map(str, rec))
        problems.append(
            Problem(
                source, where, missing[0], f"missing; the record has keys {keys} — map them with --columns"
            )
        )
        return None
    before = len(problems)
    chosen_raw, rejected_raw = rec[key["chosen"]], rec[key["rejected"]]
    prompt_raw = prompt_value(rec, key)
    out: dict[str, Any] = {"where": f"{source}, {where}"}
    if prompt_raw is None and rec.get(key["instruction"]) is None:
        if not (isinstance(chosen_raw, list) and isinstance(rejected_raw, list) and len(chosen_raw) > 1):
            problems.append(
                Problem(source, where, None, "no prompt: give prompt, instruction (and input) or messages")
            )
            return None
        split = _split_implicit(chosen_raw, rejected_raw, source, where, problems)
        if split is None:
            return None
        out["messages"], chosen, rejected = split
    else:
        out.update(record_prompt(rec, key, label, source, where, problems))
        answers = {}
        for side, value in (("chosen", chosen_raw), ("rejected", rejected_raw)):
            text, problem = answer_text(value)
            if problem:
                problems.append(Problem(source, where, label[side], problem))
            answers[side] = text
        chosen, rejected = answers["chosen"], answers["rejected"]
    if len(problems) > before:
        return None
    if chosen.strip() == rejected.strip():
        problems.append(
            Problem(source, where, None, "chosen and rejected are the same answer: nothing to prefer")
        )
        return None
    out.update(chosen=chosen, rejected=rejected)
    return out


def prompt_value(rec: dict, key: dict[str, str]) -> Any:
    """``prompt``, else ``messages`` (a dataset with both columns has None in the one a record lacks)."""
    value = rec.get(key["prompt"])
    return value if value is not None else rec.get(key["messages"])


def record_prompt(
    rec: dict, key: dict[str, str], label: dict[str, str], source: str, where: str, problems: list[Problem]
) -> dict[str, Any]:
    """The prompt of a record that has one (``prompt``, ``messages``, or ``instruction`` and ``input``,
    by their ``--columns`` names ``key``): ``{messages}`` or ``{instruction, input}``, its problems added."""
    prompt_raw = prompt_value(rec, key)
    if isinstance(prompt_raw, list):
        fld = key["prompt"] if rec.get(key["prompt"]) is not None else key["messages"]
        return {"messages": _turns(prompt_raw, source, where, fld, problems)}
    if prompt_raw is not None:
        if not isinstance(prompt_raw, str) or not prompt_raw.strip():
            problems.append(
                Problem(source, where, label["prompt"], "expected a non-empty string or a list of turns")
            )
            return {}
        return {"instruction": prompt_raw, "input": ""}
    instruction, extra = rec[key["instruction"]], rec.get(key["input"]) or ""
    for fld, value in (("instruction", instruction), ("input", extra)):
        if not isinstance(value, str):
            problems.append(
                Problem(source, where, label[fld], f"expected a string, got {type(value).__name__}")
            )
    if isinstance(instruction, str) and not instruction.strip():
        problems.append(Problem(source, where, label["instruction"], "empty"))
    return {"instruction": instruction, "input": extra}


def load_pairs(sources: Iterable[str], columns: dict[str, str] | None = None) -> list[dict]:
    """Every preference pair of every source, validated; raises DataError listing every problem."""
    columns = columns or {}
    unknown = sorted(set(columns) - set(PAIR_FIELDS))
    if unknown:
        raise KaikaError(
            f"columns: unknown target field(s) {', '.join(unknown)}; use {', '.join(PAIR_FIELDS)}"
        )
    sources = list(sources)
    if not sources:
        raise KaikaError(
            "no preference data given: pass --data FILE (prompt, chosen, rejected; JSON or JSONL)"
        )
    problems: list[Problem] = []
    pairs: list[dict] = []
    for source in sources:
        before = len(pairs) + len(problems)
        for where, rec in iter_source(source, problems):
            pair = normalise_pair(rec, columns, source, where, problems)
            if pair is not None:
                pairs.append(pair)
        if len(pairs) + len(problems) == before:
            problems.append(Problem(source, "file", None, "contains no records"))
    if problems:
        raise DataError(problems)
    return pairs


def pair_prompt(pair: dict) -> dict | list[dict]:
    """The prompt of a pair: an Alpaca record ``{instruction, input}`` or a list of turns."""
    return (
        pair["messages"]
        if "messages" in pair
        else {"instruction": pair["instruction"], "input": pair["input"]}
    )


# --------------------------------------------------------------------------- tokens


@dataclass
class PreferenceReport:
    pairs: int = 0
    kept: int = 0
    dropped_prompt_too_long: int = (
        0  # pairs left out: the prompt leaves no room for an answer (as train does)
    )
    dropped_huge: int = 0  # pairs over cutoff_len × CHARS_PER_TOKEN_CAP characters, left out untokenized
    conversations: int = 0  # pairs whose prompt was a conversation (the others: Alpaca prompts)
    chosen_truncated: int = 0  # answers cut to fit cutoff_len (their end-of-turn tokens kept)
    rejected_truncated: int = 0
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # p50/p90/max
    chosen_tokens: dict[str, int] = field(default_factory=dict)
    rejected_tokens: dict[str, int] = field(default_factory=dict)
    cutoff_len: int = 0

    def summary(self) -> str:
        pct = percentile_text
        return (
            f"{self.kept}/{self.pairs} pairs kept ({self.dropped_prompt_too_long} dropped: prompt longer than "
            f"cutoff_len {self.cutoff_len}; {self.dropped_huge} left out untokenized: over cutoff_len × "
            f"{CHARS_PER_TOKEN_CAP} characters; {self.conversations} with a conversation prompt); tokens "
            f"p50/p90/max: prompt {pct(self.prompt_tokens)}, chosen {pct(self.chosen_tokens)}, rejected "
            f"{pct(self.rejected_tokens)}; cut to cutoff_len {self.cutoff_len}: {self.chosen_truncated} chosen, "
            f"{self.rejected_truncated} rejected (end of turn kept)"
        )


def percentile_text(d: dict[str, int]) -> str:
    """``{p50, p90, max}`` as "p50/p90/max", the reports' token columns."""
    return f"{d.get('p50')}/{d.get('p90')}/{d.get('max')}"


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": int(np.percentile(arr, 50)), "p90": int(np.percentile(arr, 90)), "max": int(arr.max())}


def encode_pairs(
    pairs: list[dict], template, tokenizer, cutoff_len: int
) -> tuple[list[dict[str, list[int]]], PreferenceReport]:
    """``{prompt_ids, chosen_ids, rejected_ids}`` per pair, each answer with its end-of-turn ids,
    prompt + answer within ``cutoff_len`` (a longer answer is cut, its end of turn kept).

    A pair whose prompt leaves no room for an answer is left out and counted, the rule of ``kaika
    train`` for its examples, said the same way in the report; when no pair is left, that is an error.
    """
    from kaika.data.segments import answer_ids, end_ids_count

    report = PreferenceReport(pairs=len(pairs), cutoff_len=cutoff_len)
    rows: list[dict[str, list[int]]] = []
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    for pair in pairs:
        if over_char_cap(pair, cutoff_len):
            warn_left_out(pair["where"], record_chars(pair), cutoff_len)
            report.dropped_huge += 1
            continue
        prompt = pair_prompt(pair)
        encoded = {}
        try:
            for side in SIDES:
                prompt_ids, ids, segment = answer_ids(template, tokenizer, prompt, pair[side])
                encoded[side] = (prompt_ids, ids, end_ids_count(template, tokenizer, segment))
        except KaikaError as e:
            raise KaikaError(f"{pair['where']}: {e}") from None
        prompt_ids = encoded["chosen"][0]
        if encoded["rejected"][0] != prompt_ids:  # by construction; a template that breaks it is refused
            raise KaikaError(
                f"{pair['where']}: the template renders the prompt differently before chosen and rejected"
            )
        keep = max(encoded["chosen"][2], encoded["rejected"][2])
        if len(prompt_ids) + keep + 1 > cutoff_len:
            report.dropped_prompt_too_long += 1
            continue
        row = {"prompt_ids": prompt_ids}
        for side in SIDES:
            _, ids, end = encoded[side]
            room = cutoff_len - len(prompt_ids)
            lengths[side].append(len(ids))
            if len(ids) > room:
                ids = ids[: room - end] + ids[-end:]
                setattr(report, f"{side}_truncated", getattr(report, f"{side}_truncated") + 1)
            row[f"{side}_ids"] = ids
        lengths["prompt"].append(len(prompt_ids))
        report.conversations += "messages" in pair
        rows.append(row)
    if pairs and not rows:
        raise KaikaError(
            f"no preference pair fits cutoff_len {cutoff_len}: {report.dropped_prompt_too_long} prompts leave "
            f"no room for an answer, {report.dropped_huge} pairs are over cutoff_len × {CHARS_PER_TOKEN_CAP} "
            "characters; raise --cutoff-len"
        )
    report.kept = len(rows)
    report.prompt_tokens = percentiles(lengths["prompt"])
    report.chosen_tokens = percentiles(lengths["chosen"])
    report.rejected_tokens = percentiles(lengths["rejected"])
    return rows, report
