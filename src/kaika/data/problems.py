"""A problem in the data, named by its file, record and field, and the error that lists them: what
every reader of kaika (records, conversations, preference pairs, tasks, text) reports."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kaika.errors import KaikaError

MAX_SHOWN = 20


@dataclass(frozen=True)
class Problem:
    source: str
    where: str  # "line 12", "record 7"
    field: str | None
    message: str

    def __str__(self) -> str:
        fld = f" field {self.field!r}:" if self.field else ""
        return shown(f"{self.source}, {self.where}:{fld} {self.message}")


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def shown(text: str) -> str:
    """``text`` safe to print: control characters (ANSI escapes, NUL…) as escapes, never sent raw to
    the terminal; lone surrogates as escapes (a terminal's encoder would fail on them)."""
    text = CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class DataError(KaikaError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_SHOWN])
        more = f"\n  … and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        super().__init__(
            f"{len(problems)} problem(s) in the data:\n{listed}{more}\n"
            "Fix these records (or remove them) and run again; nothing was trained or written."
        )
