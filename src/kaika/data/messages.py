"""Chat messages → one prompt in the instruction template the model was trained with.

An Alpaca-style template has one instruction, an optional input and a response; chat has
turns. kaika maps one onto the other the same way everywhere (``kaika chat``, ``kaika serve``'s
``/v1/chat/completions``, and the ``chat_template`` that ``kaika merge`` writes into the merged
tokenizer, so other servers prompt the merged model the same way):

* the **last user** message is the ``{instruction}``;
* **system** (or ``developer``) messages, joined by blank lines, are the ``{input}`` — the
  template's "additional context" slot; without any the no-input wording is used;
* **earlier** user/assistant pairs come first, each as a formatted prompt (no input) followed
  by the assistant's answer and a blank line — the same prompt/response shape as training.

The conversation must end with a user message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from kaika.data.prompts import PromptTemplate
from kaika.errors import KaikaError

ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def as_messages(raw: Sequence[dict | Message]) -> list[Message]:
    """Validate OpenAI-style ``[{role, content}]`` (content a string or a list of text parts)."""
    out = []
    for i, m in enumerate(raw):
        if isinstance(m, Message):
            out.append(m)
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise KaikaError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # [{"type": "text", "text": "..."}]
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise KaikaError(f"messages[{i}].content: only text parts are supported")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise KaikaError(f"messages[{i}].content must be a string or a list of text parts")
        out.append(Message(role, content))
    return out


def chat_prompt(template: PromptTemplate, messages: Sequence[dict | Message]) -> str:
    """The prompt for ``messages`` (see the module docstring for the mapping)."""
    msgs = as_messages(messages)
    if not msgs or msgs[-1].role != "user":
        raise KaikaError("the last message must come from the user (role 'user')")
    system = "\n\n".join(m.content for m in msgs if m.role in ("system", "developer"))
    turns = [m for m in msgs[:-1] if m.role in ("user", "assistant")]
    history = []
    pending_user: str | None = None
    for m in turns:
        if m.role == "user":
            if pending_user is not None:  # two user turns in a row: the first had no answer
                history.append(template.format(pending_user) + "\n\n")
            pending_user = m.content
        else:
            history.append(template.format(pending_user or "") + m.content + "\n\n")
            pending_user = None
    if pending_user is not None:
        history.append(template.format(pending_user) + "\n\n")
    return "".join(history) + template.format(msgs[-1].content, system)


def jinja_chat_template(template: PromptTemplate) -> str:
    """A Hugging Face ``chat_template`` (Jinja) that renders exactly what ``chat_prompt`` does.

    Written into a merged model's tokenizer so that vLLM, TGI or ``apply_chat_template`` prompt
    it the way kaika does. ``add_generation_prompt`` is implied: the prompt always ends with the
    response header.
    """

    def lit(s: str) -> str:  # a Jinja string literal (JSON escaping is valid Jinja)
        return json.dumps(s, ensure_ascii=False)

    def fmt(instr: str, inp: str | None = None) -> str:
        # PromptTemplate.format: instruction replaced first, then input; input only when non-empty.
        no_input = f"{lit(template.prompt_no_input)}.replace('{{instruction}}', {instr})"
        if inp is None:
            return no_input
        with_input = (
            f"{lit(template.prompt_input)}.replace('{{instruction}}', {instr}).replace('{{input}}', {inp})"
        )
        return f"(({with_input}) if {inp} else ({no_input}))"

    pending = fmt("ns.pending")
    answered = fmt("(ns.pending or '')")
    last = fmt("last['content']", "ns.system")
    return (
        "{%- set ns = namespace(system='', history='', pending=none, first=true) -%}"
        "{%- for m in messages[:-1] -%}"
        "{%- if m['role'] in ['system', 'developer'] -%}"
        "{%- set ns.system = ns.system + ('' if ns.first else '\\n\\n') + m['content'] -%}"
        "{%- set ns.first = false -%}"
        "{%- elif m['role'] == 'user' -%}"
        "{%- if ns.pending is not none -%}"
        "{%- set ns.history = ns.history + " + pending + " + '\\n\\n' -%}"
        "{%- endif -%}"
        "{%- set ns.pending = m['content'] -%}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{%- set ns.history = ns.history + " + answered + " + m['content'] + '\\n\\n' -%}"
        "{%- set ns.pending = none -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.pending is not none -%}"
        "{%- set ns.history = ns.history + " + pending + " + '\\n\\n' -%}"
        "{%- endif -%}"
        "{%- set last = messages[-1] -%}"
        "{%- if last['role'] != 'user' -%}"
        "{{- raise_exception('the last message must come from the user') -}}"
        "{%- endif -%}"
        "{{- ns.history + " + last + " -}}"
    )
