"""Command-line options made from the config dataclasses, and the options several commands share.

Each field of a section becomes ``--name`` (and ``--section.name``); sections listed in
``kaika.config.FLAG_PREFIX`` put a prefix on the short flag (``lora.r`` → ``--lora-r``), so that the flags users
of the alpaca-lora recipe know keep their names. ``Literal`` fields become ``choices``. Options the
user does not give stay absent from the namespace, so a YAML file's values are not overridden by
defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from kaika.config import (
    GenerateArgs,
    InferenceArgs,
    check_value,
    choices,
    coerce,
    flag_of,
    from_dict,
    section_defaults,
)
from kaika.errors import KaikaError

ADAPTER_HELP = "Output directory of kaika train (or any PEFT adapter directory)"


def _flags(section: str | None, f: dataclasses.Field) -> list[str]:
    short = flag_of(section, f)
    return [short] if section is None else [short, f"--{section}.{f.name}"]


def checked_type(cls: type, name: str):
    """An argparse ``type`` for field ``name`` of dataclass ``cls``: the value converted and checked
    against the field's choices and bounds, so a command that borrows one field (``--cutoff-len`` of
    ``eval loss`` and ``data check``) states its limit once, where the field is declared."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    tp = typing.get_type_hints(cls)[name]

    def convert(text: str) -> Any:
        try:
            value = coerce(text, tp, name)
            check_value(value, f, tp, name)
        except KaikaError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{name}: ")) from None
        return value

    convert.__name__ = (
        typing.get_args(tp)[0].__name__ if typing.get_args(tp) else getattr(tp, "__name__", name)
    )
    return convert


def add_field_arg(
    parser: argparse.ArgumentParser, cls: type, name: str, help: str, default: Any = argparse.SUPPRESS
) -> None:
    """One field of a config dataclass as an option of another command, with that field's check."""
    parser.add_argument("--" + name.replace("_", "-"), dest=name, type=checked_type(cls, name), default=default,
                        metavar=name.upper(), help=help)  # fmt: skip


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    section: str | None = None,
    defaults: Any = None,
    keep_defaults: bool = False,
    skip: tuple[str, ...] = (),
) -> None:
    """Add one option per field of ``cls``; unset options stay absent from the namespace (a YAML
    file's values are not overridden), or, with ``keep_defaults``, hold the field's default (a
    command's own options, which no file sets). ``defaults``: the section's default object, when it is
    not ``cls()`` (shown in the help). A field that is itself a dataclass is a section of its own,
    added by its command."""
    hints = typing.get_type_hints(cls)
    doc = (cls.__doc__ or cls.__name__).strip()
    group = parser.add_argument_group(section, doc) if section else parser.add_argument_group(doc)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        required = bool(f.metadata.get("required"))
        shown = "" if required or default in (None, "", [], {}) else f" (default: {default!r})"
        help_ = f"{f.metadata.get('help', '')}{shown}".replace("%", "%%")
        dest = f"{section}.{f.name}" if section else f.name
        kept = default if keep_defaults else argparse.SUPPRESS
        kw: dict[str, Any] = {"dest": dest, "default": kept, "help": help_, "required": required}
        if tp is bool or (choices(tp) is None and set(typing.get_args(tp)) == {bool, type(None)}):
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, dict):
            kw["nargs"] = "+"
            kw["metavar"] = f.metadata.get("metavar") or (
                "KEY=VALUE" if typing.get_origin(tp) is dict else "VALUE"
            )
            if typing.get_origin(tp) is dict:
                kw["type"] = str
        elif choices(tp):
            kw["choices"] = choices(tp)
        else:
            kw["metavar"] = f.metadata.get("metavar") or f.name.upper()
            kw["type"] = checked_type(cls, f.name)  # the bounds at parse time: argparse's usage error
        if f.name in skip:
            continue
        group.add_argument(*_flags(section, f), *f.metadata.get("aliases", ()), **kw)


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add the options of every section (a dataclass-typed field) of ``cls``."""
    defaults = section_defaults(cls)
    for f in dataclasses.fields(cls):
        add_dataclass_args(parser, typing.get_type_hints(cls)[f.name], f.name, defaults.get(f.name))


def options_from(cls: type, ns: argparse.Namespace, **sections: Any) -> Any:
    """Dataclass ``cls`` from the options :func:`add_dataclass_args` added unsectioned (those the user
    gave; the others keep their defaults), with ``sections`` for its dataclass-typed fields."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    built = from_dict(cls, given, "options")  # converted (KEY=VALUE lists to mappings) and checked
    return dataclasses.replace(built, **sections) if sections else built


def namespace_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """Nested dict of the dotted options the user actually gave."""
    out: dict[str, Any] = {}
    for key, value in vars(ns).items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, GenerateArgs, "generate")


def generate_args(ns: argparse.Namespace) -> GenerateArgs:
    """The decoding options given on the command line, over GenerateArgs' defaults."""
    return from_dict(GenerateArgs, namespace_overrides(ns).get("generate", {}), "generate options")


def add_inference_args(p: argparse.ArgumentParser, template: bool = False) -> None:
    """--base-model, --dtype (and --template): what overrides a run directory's saved choices
    (:class:`kaika.rundir.RunDir` applies them)."""
    add_dataclass_args(p, InferenceArgs, keep_defaults=True, skip=() if template else ("template",))
