"""A conversation as token segments: the one encoder of training examples and generation prompts.

Training and inference build ids with the same function, so a conversation at inference
tokenizes exactly as in training: the ids of the prompt of assistant turn *k* during training
are the ids :func:`prompt_ids` gives for the turns before *k* (tests/data/test_segments.py
checks that for arbitrary conversations).

A conversation is cut into pieces of text, each an answer (an assistant turn, with the template's
end-of-turn text) or the text between answers (system prompt, user turns, role headers), and
**each piece is tokenized on its own**, the ids concatenated. So no token straddles a role
boundary and the loss mask is exact by construction; where tokenizing the whole text at once
would have merged characters across a boundary, the data report counts it (``boundary_merges``).

* kaika's templates (:mod:`kaika.data.messages`): the pieces are the prompts and answers; every
  answer ends with the EOS id. User text stays text (a literal ``</s>`` is not EOS).
* chat templates: the tokenizer renders the conversation; the answer of assistant turn *k* is what
  rendering the turns up to *k* adds to rendering the turns before it with the generation prompt.
  The template's control tokens are parsed as special tokens, as ``apply_chat_template`` does. A
  template that does not render a conversation prefix by prefix (one that rewrites earlier turns)
  is refused, naming the turn. The end-of-turn token that follows an answer (Gemma's
  ``<end_of_turn>``, ChatML's ``<|im_end|>``) is trained on and is a stop token at generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kaika.data.jinja import TemplateLimit, render_chat
from kaika.data.messages import kaika_pieces
from kaika.data.prompts import ChatTemplate, PromptTemplate, Template
from kaika.data.tokenize import IGNORE_INDEX, encode_text, leading_special_ids
from kaika.errors import KaikaError

TRAIN_ON = ("assistant", "last", "all")
PROBE = "kaika-probe-answer"  # an answer no template contains, to find the end-of-turn text


@dataclass
class Segment:
    text: str
    ids: list[int]
    answer: int | None  # 0, 1, … for the answers in order; None for the text between them


def render(template: ChatTemplate, tokenizer, messages: Sequence[dict], generation_prompt: bool) -> str:
    """The conversation as the tokenizer's ``apply_chat_template`` renders it, in a sandbox with a
    time and size limit (:mod:`kaika.data.jinja`)."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers does
    try:
        return render_chat(
            template.source,
            messages,
            **tokenizer.special_tokens_map,
            add_generation_prompt=generation_prompt,
            tools=None,
            documents=None,
        )
    except TemplateLimit as e:
        raise KaikaError(
            f"the chat template {template.name} was stopped: {e} rendering a conversation of {len(messages)} "
            "messages; a chat template should take milliseconds and write about the conversation's length"
        ) from None
    except Exception as e:  # jinja's TemplateError, raise_exception() of the template itself
        reason = str(e).strip() or f"{type(e).__name__} raised with no message"
        raise KaikaError(
            f"the chat template {template.name} cannot render this conversation: {reason}"
        ) from None


_HAS_GENERATION_PROMPT: dict[tuple[str, int], bool] = {}


def check_generation_prompt(template: ChatTemplate, tokenizer) -> None:
    """A chat template must write something for ``add_generation_prompt`` (the assistant's header): one
    that ignores it leaves the header inside the answer's piece, trained as answer text, and prompts
    generation without it. Checked once per template and tokenizer."""
    key = (template.source, id(tokenizer))
    if key not in _HAS_GENERATION_PROMPT:
        probe = [{"role": "user", "content": "こんにちは"}]
        _HAS_GENERATION_PROMPT[key] = render(template, tokenizer, probe, True) != render(
            template, tokenizer, probe, False
        )
    if not _HAS_GENERATION_PROMPT[key]:
        raise KaikaError(
            f"the chat template {template.name} writes no generation prompt (add_generation_prompt changes "
            "nothing): the assistant's header would be trained as part of every answer. Use a template that "
            "writes it when add_generation_prompt is true (as Hugging Face chat templates do)"
        )


def chat_pieces(template: ChatTemplate, tokenizer, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """``(text, is_answer)`` pieces of ``messages`` rendered by a chat template; the generation
    prompt follows when the last turn is not the assistant's."""
    messages = [
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
        for m in messages
    ]
    check_generation_prompt(template, tokenizer)
    full = render(template, tokenizer, messages, messages[-1]["role"] != "assistant")
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(template, tokenizer, messages[:k], True)
        whole = render(template, tokenizer, messages[: k + 1], False)
        if not (len(head) >= pos and whole.startswith(head) and full.startswith(whole)):
            raise KaikaError(
                f"the chat template {template.name} does not render this conversation turn by turn "
                f"(turn {k}: the text before it changes once it is added), so what is trained cannot be "
                "told apart exactly; use kaika's template (--template alpaca_ja) or a Jinja file of your own"
            )
        pieces += [(full[pos : len(head)], False), (full[len(head) : len(whole)], True)]
        pos = len(whole)
    pieces.append((full[pos:], False))
    return [(text, answer) for text, answer in pieces if text or answer]


def segments(template: Template, tokenizer, messages: Sequence[dict]) -> list[Segment]:
    """The conversation's segments, ids included; ends with the generation prompt when the last
    turn is not the assistant's."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KaikaError("the tokenizer has no EOS token; the model could never learn to stop")
    out: list[Segment] = []
    n = 0
    if isinstance(template, PromptTemplate):
        lead = leading_special_ids(tokenizer)
        for kind, text in kaika_pieces(template, messages):
            if kind == "answer":
                out.append(Segment(text, encode_text(tokenizer, text) + [eos], n))
                n += 1
            else:
                out.append(Segment(text, lead + encode_text(tokenizer, text), None))
            lead = []
        return out
    stops = set(stop_ids(template, tokenizer))
    for text, is_answer in chat_pieces(template, tokenizer, messages):
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template's control tokens parsed
        if is_answer:
            if not stops & set(ids):  # a template with no end-of-turn text: EOS ends the answer
                ids.append(eos)
            out.append(Segment(text, ids, n))
            n += 1
        else:
            out.append(Segment(text, ids, None))
    return out


def prompt_ids(template: Template, tokenizer, messages: Sequence[dict]) -> list[int]:
    """The generation prompt for ``messages`` (ending with a user turn), as training encoded it."""
    if not messages or messages[-1]["role"] == "assistant":
        raise KaikaError("the last message must come from the user (role 'user')")
    return [i for s in segments(template, tokenizer, messages) for i in s.ids]


def end_of_turn(template: ChatTemplate, tokenizer) -> str:
    """The text a chat template puts after an answer (Gemma: ``<end_of_turn>\\n``)."""
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": PROBE}]
    answer = next((t for t, is_answer in chat_pieces(template, tokenizer, probe) if is_answer), "")
    return answer.split(PROBE, 1)[1] if PROBE in answer else ""


def stop_ids(template: Template, tokenizer) -> list[int]:
    """The ids that end an answer: EOS, and a chat template's end-of-turn token when it has one."""
    stops = [tokenizer.eos_token_id]
    if isinstance(template, ChatTemplate):
        marker = tokenizer.encode(end_of_turn(template, tokenizer), add_special_tokens=False)
        special = set(getattr(tokenizer, "all_special_ids", [])) | set(
            getattr(tokenizer, "added_tokens_decoder", {})
        )
        if marker and marker[0] in special:
            stops.append(marker[0])
    return list(dict.fromkeys(s for s in stops if s is not None))


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # the last answer was cut (its end-of-turn tokens kept)
    turns_dropped: int  # oldest whole exchanges left out to fit cutoff_len
    full_length: int  # tokens of the whole conversation before anything was left out
    boundary_merges: int  # boundaries where tokenizing the whole text would have merged across


def labels_for(segs: list[Segment], train_on: str) -> list[int]:
    """-100 except on the tokens ``train_on`` trains: every answer, the last one, or everything."""
    last = max((s.answer for s in segs if s.answer is not None), default=None)
    labels: list[int] = []
    for s in segs:
        trained = train_on == "all" or (
            s.answer is not None and (train_on == "assistant" or s.answer == last)
        )
        labels += s.ids if trained else [IGNORE_INDEX] * len(s.ids)
    return labels


def drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """``messages`` without their first user turn and what answers it (system turns kept); None
    when only one exchange is left."""
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    later = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0 and rest[i - 1]["role"] != "user"]
    return system + rest[later[0] :] if later else None


def count_boundary_merges(tokenizer, segs: list[Segment]) -> int:
    """How many answer boundaries a whole-text tokenization would have crossed with a token."""
    if not getattr(tokenizer, "is_fast", False):
        return 0
    merges = 0
    for i, s in enumerate(segs):
        if s.answer is None or i == 0:
            continue
        before, text = segs[i - 1].text, s.text
        offsets = tokenizer(before + text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        merges += any(a < len(before) < b for a, b in offsets)
    return merges


def encode_conversation(
    template: Template,
    tokenizer,
    messages: list[dict],
    cutoff_len: int,
    train_on: str = "assistant",
    truncation: str = "turns",
) -> Example | None:
    """Ids and labels of a training conversation, fitted into ``cutoff_len``; None when it cannot
    be (``truncation="drop"`` and too long, or even its last exchange's prompt is too long).

    Too long, it keeps its system prompt and leaves out the oldest whole exchanges until it fits;
    if the last exchange alone does not, its answer is cut, the end-of-turn tokens kept (as an
    Alpaca response is cut with its EOS kept).
    """
    if train_on not in TRAIN_ON:
        raise KaikaError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    segs = segments(template, tokenizer, messages)
    full_length = sum(len(s.ids) for s in segs)
    merges = count_boundary_merges(tokenizer, segs)
    dropped = 0
    while sum(len(s.ids) for s in segs) > cutoff_len:
        shorter = None if truncation == "drop" else drop_oldest_exchange(messages)
        if shorter is None:
            break
        messages, dropped = shorter, dropped + 1
        segs = segments(template, tokenizer, messages)
    ids = [i for s in segs for i in s.ids]
    labels = labels_for(segs, train_on)
    truncated = len(ids) > cutoff_len
    if truncated:
        if truncation == "drop":
            return None
        keep = end_ids_count(template, tokenizer, segs[-1])
        room = cutoff_len - (len(ids) - len(segs[-1].ids)) - keep  # answer tokens that fit
        if segs[-1].answer is None or room < 1:
            return None
        cut = len(ids) - len(segs[-1].ids) + room
        ids = ids[:cut] + ids[-keep:]
        labels = labels[:cut] + labels[-keep:]
    return Example(ids, labels, truncated, dropped, full_length, merges)


def end_ids_count(template: Template, tokenizer, answer: Segment) -> int:
    """How many ids at the end of an answer segment are its end of turn (kept when it is cut)."""
    if isinstance(template, PromptTemplate):
        return 1  # EOS
    marker = end_of_turn(template, tokenizer)
    n = len(tokenizer.encode(marker, add_special_tokens=False)) if marker else 0
    if answer.ids and answer.ids[-1] == tokenizer.eos_token_id and not answer.text.endswith(marker or "\0"):
        n += 1  # the EOS appended after a template with no end-of-turn text
    return max(n, 1)


def record_prompt_ids(template: Template, tokenizer, record: dict[str, str]) -> list[int]:
    """The generation prompt of an Alpaca-style record ``{instruction, input?}``: kaika's template
    formats it as training did; a chat template renders it as the user turn of a conversation."""
    if isinstance(template, PromptTemplate):
        from kaika.data.tokenize import encode_prompt

        return encode_prompt(tokenizer, template.format(record["instruction"], record.get("input") or ""))
    from kaika.data.conversations import to_messages

    return prompt_ids(
        template,
        tokenizer,
        to_messages({"instruction": record["instruction"], "input": record.get("input") or ""}),
    )


def answer_ids(
    template: Template, tokenizer, prompt: dict[str, str] | list[dict], answer: str
) -> tuple[list[int], list[int], Segment]:
    """``(prompt ids, answer ids, answer segment)`` of one answer to ``prompt`` (an Alpaca record
    ``{instruction, input}`` or turns ending with the user's), encoded as training encodes the
    answer of a record: the prompt ids are those generation uses (:func:`record_prompt_ids`,
    :func:`prompt_ids`), the answer ids end with the end-of-turn ids."""
    if isinstance(template, PromptTemplate) and isinstance(prompt, dict):  # Alpaca, kaika's template
        ids = encode_text(tokenizer, answer) + [tokenizer.eos_token_id]
        return record_prompt_ids(template, tokenizer, prompt), ids, Segment(answer, ids, 0)
    if isinstance(prompt, dict):
        from kaika.data.conversations import to_messages

        prompt = to_messages(prompt)
    segs = segments(template, tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    last = max(i for i, s in enumerate(segs) if s.answer is not None)
    # Text a chat template puts after the last answer (a newline) is neither prompt nor answer.
    return [i for s in segs[:last] for i in s.ids], segs[last].ids, segs[last]
