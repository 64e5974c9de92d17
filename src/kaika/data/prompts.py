"""Prompt templates as data, of two kinds.

* kaika's own (:class:`PromptTemplate`): JSON files with ``prompt_input``, ``prompt_no_input``,
  ``response_split`` and, for the later turns of a conversation, ``prompt_turn``
  (builtin: ``alpaca_ja``, ``alpaca``);
* a chat template (:class:`ChatTemplate`): Jinja as in a Hugging Face tokenizer's
  ``chat_template``: ``chat`` takes the base model's own, a ``.jinja`` file a user's.

``auto`` (the default) is ``chat`` when the data holds conversations and the base model's tokenizer
has a chat template, else ``alpaca_ja``. The template used for training is saved with the run
(``template.json``, see :mod:`kaika.rundir`) and read back by every command that prompts the
model, so it is always prompted as it was trained.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from kaika.errors import KaikaError


@dataclass(frozen=True)
class PromptTemplate:
    prompt_input: str
    prompt_no_input: str
    response_split: str
    description: str = ""
    name: str = ""
    prompt_turn: str = ""  # a later user turn, after the previous answer's EOS; "" → prompt_no_input

    kind = "alpaca"

    def format(self, instruction: str, input: str | None = None) -> str:
        """The prompt up to (and including) the response header; the response follows it."""
        # str.replace, not str.format: user text and templates may contain literal braces.
        if input:
            return self.prompt_input.replace("{instruction}", instruction).replace("{input}", input)
        return self.prompt_no_input.replace("{instruction}", instruction)

    def format_turn(self, instruction: str) -> str:
        """The prompt of a user turn after the first (the previous answer ended with EOS)."""
        return (self.prompt_turn or self.prompt_no_input).replace("{instruction}", instruction)

    def split_response(self, text: str) -> str:
        """The response part of a full prompt+response text."""
        return text.split(self.response_split, 1)[-1].strip()

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n"


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template (``messages``, ``add_generation_prompt``, the tokenizer's special tokens),
    rendered by the tokenizer's own ``apply_chat_template``; see :mod:`kaika.data.segments`."""

    source: str
    name: str = "chat"
    description: str = ""

    kind = "chat"

    def to_json(self) -> str:
        data = {
            "kind": "chat",
            "name": self.name,
            "description": self.description,
            "chat_template": self.source,
        }
        return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


Template = PromptTemplate | ChatTemplate
AUTO, CHAT, DEFAULT = "auto", "chat", "alpaca_ja"


def resolve_template(name: str, tokenizer=None, conversations: bool = False) -> Template:
    """The template ``name`` means for this base model and data (``auto``, ``chat``, a builtin, a
    file). ``tokenizer`` is needed only for ``auto`` and ``chat``."""
    if name == AUTO:
        has_own = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        name = CHAT if conversations and has_own else DEFAULT
    if name == CHAT:
        source = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(source, dict):  # several named templates: the default one is what chat means
            source = source.get("default")
        if not isinstance(source, str) or not source.strip():
            raise KaikaError(
                "--template chat: the base model's tokenizer has no chat template; choose one of "
                f"{', '.join(builtin_templates())}, or give a Jinja file (--template my_template.jinja)"
            )
        return ChatTemplate(source, CHAT, "the base model's own chat template")
    return load_template(name)


PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def builtin_templates() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("kaika.data.templates").iterdir() if p.name.endswith(".json")
    )


def load_template(name_or_path: str | Path) -> PromptTemplate:
    """A builtin template by name (``alpaca_ja``), a template JSON file or a Jinja file by path."""
    path = Path(name_or_path)
    if str(name_or_path) in (AUTO, CHAT) and not path.exists():
        raise KaikaError(f"the template {name_or_path!r} depends on the base model: use resolve_template")
    if path.suffix in (".jinja", ".j2"):
        if not path.is_file():
            raise KaikaError(f"template file {path} does not exist")
        return check_chat_template(
            ChatTemplate(path.read_text(encoding="utf-8"), path.stem, f"from {path.name}")
        )
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise KaikaError(f"template file {path} does not exist")
        text, name = path.read_text(encoding="utf-8"), path.stem
    else:
        res = resources.files("kaika.data.templates") / f"{name_or_path}.json"
        if not res.is_file():
            raise KaikaError(
                f"unknown template {name_or_path!r}; builtin: {', '.join(builtin_templates())}, "
                "or give the path of a template JSON file"
            )
        text, name = res.read_text(encoding="utf-8"), str(name_or_path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KaikaError(f"template {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(data, dict) and data.get("kind") == "chat":  # a saved ChatTemplate (template.json)
        if not isinstance(data.get("chat_template"), str):
            raise KaikaError(f"template {name_or_path}: kind chat needs the string field chat_template")
        return check_chat_template(
            ChatTemplate(data["chat_template"], data.get("name") or name, data.get("description", ""))
        )
    if not isinstance(data, dict):
        raise KaikaError(f"template {name_or_path}: expected a JSON object")
    missing = [
        k for k in ("prompt_input", "prompt_no_input", "response_split") if not isinstance(data.get(k), str)
    ]
    if missing:
        raise KaikaError(f"template {name_or_path}: missing string field(s) {', '.join(missing)}")
    if "prompt_turn" in data and not isinstance(data["prompt_turn"], str):
        raise KaikaError(f"template {name_or_path}: prompt_turn must be a string")
    for key, needed in (
        ("prompt_input", ("{instruction}", "{input}")),
        ("prompt_no_input", ("{instruction}",)),
        ("prompt_turn", ("{instruction}",)),
    ):
        if key not in data:
            continue
        for placeholder in needed:
            if placeholder not in data[key]:
                raise KaikaError(f"template {name_or_path}: {key} lacks the placeholder {placeholder}")
        # A placeholder kaika does not fill would reach the model as literal text ("{output}" trained
        # as part of every prompt), so any other {name} is refused.
        for stray in dict.fromkeys(PLACEHOLDER.findall(data[key])):
            if "{" + stray + "}" not in needed:
                raise KaikaError(
                    f"template {name_or_path}: {key} has the placeholder {{{stray}}}, which kaika does not "
                    f"fill (it would be trained as literal text); {key} may use only {', '.join(needed)}"
                )
    split = data["response_split"]
    if not split.strip() or any(split not in data[k] for k in ("prompt_input", "prompt_no_input")):
        raise KaikaError(
            f"template {name_or_path}: response_split {split!r} must be non-empty text found in both "
            "prompts (generate cuts the answer after it)"
        )
    return PromptTemplate(
        prompt_input=data["prompt_input"],
        prompt_no_input=data["prompt_no_input"],
        response_split=data["response_split"],
        description=data.get("description", ""),
        name=data.get("name") or name,
        prompt_turn=data.get("prompt_turn", ""),
    )


def check_chat_template(template: ChatTemplate) -> ChatTemplate:
    """Refuse Jinja that does not compile, with the line, before any data or model is read."""
    from jinja2 import TemplateSyntaxError

    from kaika.data.jinja import compile_chat_template

    try:
        compile_chat_template(template.source)
    except TemplateSyntaxError as e:
        raise KaikaError(
            f"chat template {template.name}: invalid Jinja at line {e.lineno}: {e.message}"
        ) from None
    return template
