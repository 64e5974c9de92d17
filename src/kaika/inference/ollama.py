"""An Ollama ``Modelfile`` for an exported GGUF file: the run's prompt format as Ollama's TEMPLATE.

Ollama renders prompts with Go's ``text/template`` over the request's ``.Messages`` (each with
``.Role`` and ``.Content``; ``.System`` holds the system messages joined), and llama.cpp then
tokenizes the text with special tokens parsed and BOS added when the GGUF file says so. So the
TEMPLATE must produce, as text, what kaika's prompt is:

* **kaika's templates** (``alpaca_ja``…): the multi-turn form of :mod:`kaika.data.messages`: the
  system text is the first prompt's input, each answer is followed by EOS, later user turns use
  ``prompt_turn``. The template's literal pieces are written as Go string literals.
* **a chat template**: Ollama cannot run Jinja. Formats whose Go form kaika knows (Gemma 3's turns,
  ChatML) are recognised by rendering probe conversations with the run's template and comparing
  with each format's definition; another chat template gets no TEMPLATE (Ollama then guesses one
  from the GGUF file's chat template) and a warning says so.

``PARAMETER stop`` lists the end-of-turn texts; the decoding defaults are ``kaika generate``'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from kaika.config import GenerateArgs
from kaika.data.prompts import ChatTemplate, PromptTemplate, Template

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


def go(text: str) -> str:
    """``text`` as a Go template action that prints it (a JSON string is a valid Go string literal)."""
    return "{{- " + json.dumps(text, ensure_ascii=False) + " -}}"


def kaika_go_template(template: PromptTemplate, eos: str) -> str:
    """Go template rendering :func:`kaika.data.messages.kaika_pieces` with EOS after each answer.

    It rebuilds kaika's turns from ``.Messages`` as :func:`~kaika.data.messages.kaika_turns` does, not
    from Ollama's ``.System``: the system text is the non-empty system (and developer) messages joined
    by blank lines, wherever they stand, and a run of turns of one role (system messages between them
    left out) is one turn joined by blank lines. A prompt is written in two halves around its
    instruction, opened when a user turn starts and closed when the turn ends; an answer is closed
    by EOS."""

    def fill(text: str) -> str:
        """``text`` (no ``{instruction}`` in it) as Go actions, its ``{input}`` the system text."""
        first, *rest = text.split("{input}")
        return (go(first) if first else "") + "".join("{{- $sys -}}" + (go(p) if p else "") for p in rest)

    def halves(text: str) -> tuple[str, str]:
        before, _, after = text.partition("{instruction}")
        return fill(before), fill(after)

    with_input, plain = halves(template.prompt_input), halves(template.prompt_no_input)
    later = halves(template.prompt_turn or template.prompt_no_input)
    first_open = "{{- if $sys -}}" + with_input[0] + "{{- else -}}" + plain[0] + "{{- end -}}"
    first_close = "{{- if $sys -}}" + with_input[1] + "{{- else -}}" + plain[1] + "{{- end -}}"
    close = (  # the open turn ends: a prompt's second half, or an answer's EOS
        '{{- if eq $open "user" -}}{{- if $openFirst -}}'
        + first_close
        + "{{- else -}}"
        + later[1]
        + "{{- end -}}"
        '{{- else if eq $open "assistant" -}}' + go(eos) + "{{- end -}}"
    )
    return (
        '{{- $sys := "" -}}'
        "{{- range .Messages -}}"
        '{{- if and (or (eq .Role "system") (eq .Role "developer")) .Content -}}'
        '{{- if $sys -}}{{- $sys = printf "%s\\n\\n%s" $sys .Content -}}{{- else -}}{{- $sys = .Content -}}{{- end -}}'
        "{{- end -}}"
        "{{- end -}}"
        '{{- $open := "" -}}{{- $openFirst := false -}}{{- $first := true -}}'
        "{{- range .Messages -}}"
        '{{- if or (eq .Role "user") (eq .Role "assistant") -}}'
        "{{- if eq .Role $open -}}" + go("\n\n") + "{{- else -}}" + close + '{{- if eq .Role "user" -}}'
        "{{- if $first -}}" + first_open + "{{- else -}}" + later[0] + "{{- end -}}"
        "{{- $openFirst = $first -}}"
        "{{- else if $first -}}" + first_open + first_close + "{{- $openFirst = false -}}"
        "{{- end -}}"
        "{{- $open = .Role -}}{{- $first = false -}}"
        "{{- end -}}"
        "{{- .Content -}}"
        "{{- end -}}"
        "{{- end -}}" + close
    )


# --------------------------------------------------------------------------- chat formats kaika knows


@dataclass(frozen=True)
class ChatFormat:
    """A chat format: its Go template, and its definition in Python (to recognise a Jinja template)."""

    name: str
    go_template: str
    render: Callable[[Messages, str], str]  # (messages, bos text) → the prompt with the generation header


def gemma3_render(messages: Messages, bos: str) -> str:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = bos
    for m in messages:
        if m["role"] == "system":
            continue
        role = "model" if m["role"] == "assistant" else "user"
        prefix = system + "\n\n" if role == "user" and system else ""
        system = "" if role == "user" else system
        out += f"<start_of_turn>{role}\n{prefix}{m['content']}<end_of_turn>\n"
    return out + "<start_of_turn>model\n"


GEMMA3_GO = (
    "{{- $system := .System -}}"
    "{{- range .Messages -}}"
    '{{- if eq .Role "user" -}}'
    '{{- "<start_of_turn>user\\n" -}}{{- if $system -}}{{- $system -}}{{- "\\n\\n" -}}{{- $system = "" -}}{{- end -}}'
    '{{- .Content -}}{{- "<end_of_turn>\\n" -}}'
    '{{- else if eq .Role "assistant" -}}'
    '{{- "<start_of_turn>model\\n" -}}{{- .Content -}}{{- "<end_of_turn>\\n" -}}'
    "{{- end -}}"
    "{{- end -}}"
    '{{- "<start_of_turn>model\\n" -}}'
)


def chatml_render(messages: Messages, bos: str) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


CHATML_GO = (
    '{{- range .Messages -}}{{- "<|im_start|>" -}}{{- .Role -}}{{- "\\n" -}}{{- .Content -}}'
    '{{- "<|im_end|>\\n" -}}{{- end -}}{{- "<|im_start|>assistant\\n" -}}'
)

CHAT_FORMATS = (
    ChatFormat("gemma3", GEMMA3_GO, gemma3_render),
    ChatFormat("chatml", CHATML_GO, chatml_render),
)

PROBES: list[Messages] = [
    [{"role": "user", "content": "日本の首都は？"}],
    [
        {"role": "system", "content": "丁寧に答えてください。"},
        {"role": "user", "content": "猫の名前は？"},
        {"role": "assistant", "content": "まだ無いです。"},
        {"role": "user", "content": "どこで生まれましたか？"},
    ],
]


def chat_format(template: ChatTemplate, tokenizer) -> tuple[ChatFormat, bool] | None:
    """The known format that renders every probe conversation exactly as the run's chat template
    does, and whether the template writes BOS as text."""
    bos = tokenizer.bos_token or ""
    for fmt in CHAT_FORMATS:
        for with_bos in (True, False) if bos else (False,):
            try:
                if all(
                    tokenizer.apply_chat_template(
                        p, chat_template=template.source, tokenize=False, add_generation_prompt=True
                    )
                    == fmt.render(p, bos if with_bos else "")
                    for p in PROBES
                ):
                    return fmt, with_bos
            except Exception:  # a template that refuses a probe (roles, system) is not this format
                break
    return None


# --------------------------------------------------------------------------- the Modelfile


def go_template(template: Template, tokenizer) -> str | None:
    """The TEMPLATE for ``template``, or None when kaika knows no Go form of it."""
    if isinstance(template, PromptTemplate):  # BOS, where the tokenizer adds one, llama.cpp adds too
        return kaika_go_template(template, tokenizer.eos_token)
    found = chat_format(template, tokenizer)
    if found is None:
        return None
    # BOS, where the template writes it as text, is the one llama.cpp adds (the file says so: export)
    return found[0].go_template


def modelfile(
    gguf_file: str,
    template: Template,
    tokenizer,
    stops: list[str],
    licence: str | None = None,
    decoding: GenerateArgs | None = None,
) -> str:
    d = decoding or GenerateArgs()
    lines = [
        "# Ollama: ollama create NAME -f Modelfile   (written by kaika export)",
        f"FROM ./{gguf_file}",
        "",
    ]
    tmpl = go_template(template, tokenizer)
    if tmpl is None:
        log.warning(
            "the run's chat template is not one kaika can write as an Ollama TEMPLATE (kaika's templates, "
            "Gemma 3, ChatML): the Modelfile has none, and Ollama picks one by comparing the GGUF file's chat "
            "template with the ones it knows. Check the prompt with `ollama run NAME --verbose`"
        )
        lines += ["# No TEMPLATE: Ollama chooses one from the chat template in the GGUF file.", ""]
    else:
        lines += [f'TEMPLATE """{tmpl}"""', ""]
    # Ollama strips a value's quotes and does not unescape it: a stop with a quote or a line break in
    # it cannot be written (kaika's stops are tokens such as <eos>, </s>, <end_of_turn>).
    unwritable = [s for s in stops if set(s) & set('"\\\n')]
    if unwritable:
        log.warning(
            "Modelfile: stop texts %s cannot be written for Ollama (a quote, backslash or line break); left out",
            unwritable,
        )
    lines += [f'PARAMETER stop "{s}"' for s in stops if s not in unwritable]
    # kaika generate's defaults (greedy decoding; Ollama's temperature 0 is greedy too)
    lines += [
        f"PARAMETER temperature {d.temperature:g}",
        f"PARAMETER top_p {d.top_p:g}",
        f"PARAMETER top_k {d.top_k}",
        f"PARAMETER repeat_penalty {d.repetition_penalty:g}",
        f"PARAMETER num_predict {d.max_new_tokens}",
    ]
    if licence:
        lines += ["", f'LICENSE """{licence}"""']
    return "\n".join(lines) + "\n"
