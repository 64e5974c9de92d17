"""Chat messages in kaika's own templates: the multi-turn form of an Alpaca-style template.

An Alpaca-style template has one instruction, an optional input and a response; a conversation
has turns. kaika maps one onto the other the same way in training (conversation data) and
everywhere it prompts (``kaika chat``, ``serve``'s ``/v1/chat/completions``, and the
``chat_template`` that ``kaika merge`` writes into the merged tokenizer, so other servers prompt
the merged model the same way):

* **system** (or ``developer``) messages, joined by blank lines, are the first prompt's
  ``{input}`` (the template's "additional context" slot); without any the no-input wording is used;
* the **first user** turn is that prompt's ``{instruction}``; each **assistant** turn is an answer
  followed by EOS; each **later user** turn is the template's short ``prompt_turn``.

An Alpaca record ``{instruction, input, output}`` is thus exactly the conversation
``[system: input, user: instruction, assistant: output]``.
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


def kaika_turns(messages: Sequence[dict | Message]) -> tuple[str, list[tuple[str, str]]]:
    """The system text (non-empty system turns joined by blank lines) and the other turns, a run of
    turns of one role joined into one turn by blank lines."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for m in as_messages(messages):
        if m.role in ("system", "developer"):
            if m.content:
                system.append(m.content)
        elif turns and turns[-1][0] == m.role:
            turns[-1] = (m.role, turns[-1][1] + "\n\n" + m.content)
        else:
            turns.append((m.role, m.content))
    return "\n\n".join(system), turns


def kaika_pieces(template: PromptTemplate, messages: Sequence[dict | Message]) -> list[tuple[str, str]]:
    """A conversation in kaika's multi-turn form, as ``("prompt", text)`` and ``("answer", text)``
    pieces; every answer is followed by EOS (a token, not text: see :mod:`kaika.data.segments`).

    The first user turn is the template's prompt, with the system text as its input; each later
    user turn is ``prompt_turn``. A conversation that ends with a user turn ends with its prompt,
    up to the response header: the generation prompt. An answer with no question before it (a
    conversation opened by the assistant) follows a prompt with an empty instruction.
    """
    system, turns = kaika_turns(messages)
    pieces: list[tuple[str, str]] = []
    for i, (role, content) in enumerate(turns):
        if role == "user" or i == 0:
            question = content if role == "user" else ""
            pieces.append(
                ("prompt", template.format(question, system) if i == 0 else template.format_turn(question))
            )
        if role == "assistant":
            pieces.append(("answer", content))
    return pieces


def jinja_chat_template(template: PromptTemplate) -> str:
    """A Hugging Face ``chat_template`` (Jinja) that renders exactly what :func:`kaika_pieces` does,
    each answer followed by ``eos_token``.

    Written into a merged model's tokenizer so that vLLM, TGI, llama.cpp or ``apply_chat_template``
    prompt it the way kaika does. ``add_generation_prompt`` is implied: a conversation that ends
    with a user turn always ends with the response header.
    """

    def lit(s: str) -> str:  # a Jinja string literal (JSON escaping is valid Jinja)
        return json.dumps(s, ensure_ascii=False)

    # PromptTemplate.format: instruction replaced first, then input; the input form only with a system text.
    first = (
        f"(({lit(template.prompt_input)}.replace('{{instruction}}', q).replace('{{input}}', ns.system)) "
        f"if ns.system else ({lit(template.prompt_no_input)}.replace('{{instruction}}', q)))"
    )
    later = f"{lit(template.prompt_turn or template.prompt_no_input)}.replace('{{instruction}}', q)"
    return (
        "{%- set ns = namespace(system='', turns=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] in ['system', 'developer'] -%}"
        "{%- if m['content'] -%}"
        "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}"
        "{%- endif -%}"
        "{%- elif m['role'] in ['user', 'assistant'] -%}"
        "{%- if ns.turns and ns.turns[-1][0] == m['role'] -%}"
        "{%- set ns.turns = ns.turns[:-1] + [[m['role'], ns.turns[-1][1] + '\\n\\n' + m['content']]] -%}"
        "{%- else -%}"
        "{%- set ns.turns = ns.turns + [[m['role'], m['content']]] -%}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- for t in ns.turns -%}"
        "{%- set q = t[1] if t[0] == 'user' else '' -%}"
        "{%- if loop.first -%}{{- " + first + " -}}"
        "{%- elif t[0] == 'user' -%}{{- " + later + " -}}"
        "{%- endif -%}"
        "{%- if t[0] == 'assistant' -%}{{- t[1] + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )
