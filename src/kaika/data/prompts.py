"""Prompt templates as data: JSON files with ``prompt_input``, ``prompt_no_input`` and ``response_split``.

The template used for training is saved with the run (``template.json``, see :mod:`kaika.rundir`)
and read back by every command that prompts the model, so it is always prompted as it was trained.
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

    def format(self, instruction: str, input: str | None = None) -> str:
        """The prompt up to (and including) the response header; the response follows it."""
        # str.replace, not str.format: user text and templates may contain literal braces.
        if input:
            return self.prompt_input.replace("{instruction}", instruction).replace("{input}", input)
        return self.prompt_no_input.replace("{instruction}", instruction)

    def split_response(self, text: str) -> str:
        """The response part of a full prompt+response text."""
        return text.split(self.response_split, 1)[-1].strip()

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n"


PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def builtin_templates() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("kaika.data.templates").iterdir() if p.name.endswith(".json")
    )


def load_template(name_or_path: str | Path) -> PromptTemplate:
    """A builtin template by name (``alpaca_ja``) or a template JSON file by path."""
    path = Path(name_or_path)
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
    missing = [
        k for k in ("prompt_input", "prompt_no_input", "response_split") if not isinstance(data.get(k), str)
    ]
    if missing:
        raise KaikaError(f"template {name_or_path}: missing string field(s) {', '.join(missing)}")
    for key, needed in (
        ("prompt_input", ("{instruction}", "{input}")),
        ("prompt_no_input", ("{instruction}",)),
    ):
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
    )
