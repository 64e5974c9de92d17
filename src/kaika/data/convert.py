"""``kaika data convert``: Alpaca records into conversations and back, where they can be.

* ``--to messages``: every record as OpenAI-style ``messages`` (an Alpaca record's instruction and
  input become the user turn, its output the assistant's); conversations are kept as they are.
* ``--to sharegpt``: the same as ShareGPT ``conversations`` (``from``: system/human/gpt, ``value``).
* ``--to alpaca``: a conversation of one exchange (its system prompt becoming the input) as an
  Alpaca record; a multi-turn conversation has no Alpaca form and is left out, counted and named
  in the summary (``--strict``: refused before anything is written).

The input is read and checked as ``kaika train`` reads it; the output is written whole or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kaika.atomic import written_file
from kaika.data.conversations import to_alpaca, training_messages
from kaika.data.records import load_records
from kaika.errors import KaikaError
from kaika.guard import check_output_file

Target = Literal["messages", "sharegpt", "alpaca"]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


@dataclass
class ConvertResult:
    output: Path
    written: int
    left_out: list[str] = field(default_factory=list)  # where the records without that form were


def convert_record(rec: dict, to: Target) -> dict | None:
    if to == "alpaca":
        return (
            to_alpaca(rec["messages"])
            if "messages" in rec
            else {k: rec[k] for k in ("instruction", "input", "output")}
        )
    messages = training_messages(rec)
    if to == "sharegpt":
        return {
            "conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]
        }
    return {"messages": messages}


def convert_file(
    sources: list[str],
    output: str | Path,
    to: Target,
    columns: dict[str, str] | None = None,
    overwrite: bool = False,
    strict: bool = False,
) -> ConvertResult:
    """Convert every record of ``sources`` into one JSON Lines file ``output``."""
    if to not in ("messages", "sharegpt", "alpaca"):
        raise KaikaError(f"--to must be messages, sharegpt or alpaca, got {to!r}")
    out = Path(output)
    check_output_file(out, sources)
    if out.exists() and not overwrite:
        raise KaikaError(f"{out} exists: pass --overwrite or choose another output")
    records = load_records(sources, columns)
    converted, left_out = [], []
    for rec in records:
        new = convert_record(rec, to)
        if new is None:
            left_out.append(rec["where"])
        else:
            converted.append(new)
    if left_out and strict:
        raise KaikaError(
            f"{len(left_out)} conversation(s) have more than one exchange and no Alpaca form, the first at "
            f"{left_out[0]}; nothing was written (without --strict they are left out)"
        )
    with written_file(out, "the converted file") as f:  # whole or not at all
        for rec in converted:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return ConvertResult(out, len(converted), left_out)
