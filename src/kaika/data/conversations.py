"""Conversation records: OpenAI-style ``messages`` and ShareGPT ``conversations``, read and checked.

A conversation record becomes ``{"messages": [{"role", "content"}, …], "where": "file, line 3"}``
with roles ``system``, ``user`` and ``assistant`` only (ShareGPT's ``human``/``gpt``, OpenAI's
``developer`` and Gemma's ``model`` are renamed). The rules, each reported with the file, line,
turn and field before any model is loaded:

* a turn is an object with a known role and non-empty string content (a list of ``{"type": "text"}``
  parts is joined);
* system turns come first; the first other turn is the user's; the last is the assistant's (the
  answer there is to train on).

Two user (or two assistant) turns in a row are kept: kaika's templates join them with a blank line;
a chat template that cannot take them is reported when the conversation is rendered.

An Alpaca record and a one-exchange conversation convert into each other (:func:`to_messages`,
:func:`to_alpaca`): the instruction and its input become the user turn.
"""

from __future__ import annotations

from typing import Any

from kaika.data.problems import Problem

# What a record's turns list is called (``--columns messages=KEY`` names another), in order.
LIST_KEYS = ("messages", "conversations")
ROLE_KEYS, CONTENT_KEYS = ("role", "from"), ("content", "value")  # OpenAI, ShareGPT
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}
CONVERSATION_COLUMNS = ("messages", "role", "content")  # --columns targets for conversations


def turns_key(rec: dict, columns: dict[str, str]) -> str | None:
    """The key of ``rec``'s turns list, if ``rec`` is a conversation record."""
    if "messages" in columns:
        return columns["messages"] if columns["messages"] in rec else None
    return next((k for k in LIST_KEYS if k in rec), None)


def is_conversation(rec: dict) -> bool:
    return "messages" in rec


def _content(value: Any) -> str | None:
    """A turn's text: a string, or a list of text parts joined; None when it is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        texts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return None


def _not_text(value: Any, present: bool) -> str:
    """Why a turn's content is not text, in words that say what to do."""
    if not present:
        return "expected a string (missing)"
    if value is None:
        return "content is null (a tool call or an empty turn?); kaika trains on turns with text"
    if isinstance(value, list):
        kinds = sorted({str(p.get("type")) for p in value if isinstance(p, dict) and p.get("type") != "text"})
        if kinds:
            return (
                f"holds a {', '.join(kinds)} part: kaika trains on text only; remove the non-text parts "
                "or the turn"
            )
    return f"expected a string (got {type(value).__name__})"


def normalise_conversation(
    rec: dict,
    key: str,
    columns: dict[str, str],
    source: str,
    where: str,
    problems: list[Problem],
    ends_with: str = "assistant",
) -> dict | None:
    """``rec[key]`` as ``{"messages": […], "where": …}``, or None after adding its problems.

    ``ends_with``: whose turn is last, the assistant's (training data: the answer to train on) or
    the user's (a prompt, as in preference pairs)."""
    turns = rec[key]
    if not isinstance(turns, list):
        problems.append(Problem(source, where, key, f"expected a list of turns, got {type(turns).__name__}"))
        return None
    if not turns:
        problems.append(Problem(source, where, key, "the conversation has no turns"))
        return None
    before = len(problems)
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}, turn {i}"
        if not isinstance(turn, dict):
            problems.append(Problem(source, at, None, f"expected an object, got {type(turn).__name__}"))
            continue
        role_key = columns.get("role") or next((k for k in ROLE_KEYS if k in turn), ROLE_KEYS[0])
        content_key = columns.get("content") or next((k for k in CONTENT_KEYS if k in turn), CONTENT_KEYS[0])
        role = turn.get(role_key)
        if role not in ROLES:
            hint = (
                f"; the turn has keys {', '.join(map(str, turn))} — map them with --columns"
                if role is None
                else ""
            )
            problems.append(
                Problem(source, at, role_key, f"role {role!r} is not one of {', '.join(ROLES)}{hint}")
            )
            continue
        content = _content(turn.get(content_key))
        if content is None:
            problems.append(
                Problem(source, at, content_key, _not_text(turn.get(content_key), content_key in turn))
            )
            continue
        if not content.strip():
            problems.append(Problem(source, at, content_key, "empty"))
            continue
        messages.append({"role": ROLES[role], "content": content})
    if len(problems) > before:
        return None
    problem = order_problem(messages, ends_with)
    if problem:
        turn, message = problem
        problems.append(
            Problem(source, f"{where}, turn {turn}" if turn is not None else where, None, message)
        )
        return None
    return {"messages": messages, "where": f"{source}, {where}"}


def order_problem(
    messages: list[dict[str, str]], ends_with: str = "assistant"
) -> tuple[int | None, str] | None:
    """What is wrong with the order of the turns for training, if anything: (turn, message)."""
    roles = [m["role"] for m in messages]
    first = next((i for i, r in enumerate(roles) if r != "system"), None)
    if first is None:
        return None, "the conversation has only system turns: nothing to answer"
    late = next((i for i, r in enumerate(roles) if r == "system" and i > first), None)
    if late is not None:
        return late, "a system turn must come before the first user turn"
    if roles[first] != "user":
        return first, "the first turn after the system prompt must be the user's"
    if ends_with == "user" and roles[-1] != "user":
        return len(roles) - 1, "the prompt must end with a user turn (chosen and rejected answer it)"
    if ends_with == "assistant" and roles[-1] != "assistant":
        return len(roles) - 1, "the conversation must end with an assistant turn (the answer to train on)"
    return None


def to_messages(rec: dict[str, str]) -> list[dict[str, str]]:
    """An Alpaca record as a conversation: the instruction (and its input, after a blank line) is
    the user turn, the output (when there is one) the assistant's."""
    user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    messages = [{"role": "user", "content": user}]
    if rec.get("output"):
        messages.append({"role": "assistant", "content": rec["output"]})
    return messages


def to_alpaca(messages: list[dict[str, str]]) -> dict[str, str] | None:
    """A conversation of one exchange (a system prompt allowed: it becomes the input, as kaika's
    templates render it) as an Alpaca record; None for a multi-turn conversation."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    if [m["role"] for m in rest] != ["user", "assistant"]:
        return None
    return {"instruction": rest[0]["content"], "input": "\n\n".join(system), "output": rest[1]["content"]}


def training_messages(rec: dict) -> list[dict[str, str]]:
    """Any training record (Alpaca or conversation) as its list of turns."""
    return rec["messages"] if is_conversation(rec) else to_messages(rec)
