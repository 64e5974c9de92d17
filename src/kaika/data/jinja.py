"""Chat templates rendered in Jinja's immutable sandbox, with a time and a size limit.

A chat template is code: a user's ``.jinja`` file, or the one a base model ships. Jinja's sandbox
stops it from reaching Python's internals, but not from looping for hours or building a string of
gigabytes, and a template that does either would hang ``kaika train`` or a server with no word. So
every render has a budget:

* **time**: :data:`RENDER_SECONDS` of wall time, checked at every call, attribute or item access,
  filter and every ``range`` step (the points where a template's work can grow);
* **size**: no value the template builds, reads back or writes out may exceed ``max_chars``
  characters (:func:`size_limit`: the conversation's own text several times over, at least 1 Mi):
  ``*``, ``%``, ``**`` and formatting are checked before they compute, every other operation's
  result after.

A template over either is stopped with :class:`TemplateLimit`, which names the limit.

The environment is set up as ``transformers``' ``apply_chat_template`` sets up its own
(``trim_blocks``, ``lstrip_blocks``, loop controls, ``tojson``, ``raise_exception``,
``strftime_now``, ``namespace``, the ``{% generation %}`` block), and gets the same variables
(``messages``, ``add_generation_prompt``, the tokenizer's special tokens), so it renders what the
tokenizer would: tests/data/test_jinja.py checks that on the shipped and the real models' templates.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_SECONDS = 5.0
MIN_CHARS = 1 << 20
TEXT_FACTOR = 8  # a rendering may be this many times the conversation's text (plus MIN_CHARS)
MAX_EXPONENT = 4096
_WIDE = re.compile(r"\d{8,}")  # a width or precision of 8 digits or more in a format string


class TemplateLimit(Exception):
    """A chat template went over its time or size budget."""


@dataclass
class _Budget:
    deadline: float
    max_chars: int

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"it ran for more than {RENDER_SECONDS:g} s")

    def sized(self, value):
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > self.max_chars:
            raise TemplateLimit(f"it built a value of more than {self.max_chars:,} characters or items")
        return value


_BUDGET: ContextVar[_Budget | None] = ContextVar("kaika_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # rendered outside render_chat (a template compiled here, used elsewhere)
        budget = _Budget(time.monotonic() + RENDER_SECONDS, MIN_CHARS)
    budget.check()
    return budget


def _too_big(values, budget: _Budget) -> None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > budget.max_chars:
            raise TemplateLimit(f"it asked for a size of {v:,} (the limit is {budget.max_chars:,})")
        if isinstance(v, str) and _WIDE.search(v) and ("%" in v or "{" in v):
            raise TemplateLimit("it formats with a width or precision of 8 digits or more")


def _limited_range(*args):
    budget = _budget()
    _too_big(args, budget)
    for i, value in enumerate(range(*args)):
        if i % 256 == 0:
            budget.check()
        yield value


def _limited_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def run(*args, **kwargs):
        budget = _budget()
        _too_big(list(args) + list(kwargs.values()), budget)
        return budget.sized(f(*args, **kwargs))

    return run


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with :class:`_Budget` checks at each point where work can grow."""

    intercepted_binops = frozenset(["*", "%", "**", "+"])

    def __init__(self, **options):
        super().__init__(**options)
        self.filters = {name: _limited_filter(f) for name, f in self.filters.items()}
        self.globals["range"] = _limited_range

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(n, int)
                    and len(seq) * n > budget.max_chars
                ):
                    raise TemplateLimit(
                        f"it repeats a value to more than {budget.max_chars:,} characters or items"
                    )
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise TemplateLimit(f"it raises to a power over {MAX_EXPONENT}")
        if operator == "%" and isinstance(left, str):
            _too_big([left], budget)
        return budget.sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        budget = _budget()
        _too_big([*args, *kwargs.values()], budget)
        for value in (*args, *kwargs.values()):  # a macro's arguments (a value doubled at each call)
            budget.sized(value)
        return budget.sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        budget = _budget()
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _too_big([obj], budget)
        return budget.sized(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        return _budget().sized(super().getitem(obj, argument))


class _Generation(Extension):
    """``{% generation %}…{% endgeneration %}``: marks assistant text for ``transformers``' masks;
    kaika finds answers by rendering prefixes, so the block renders its body and nothing more."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` without underscore-prefixed names (no reaching into Python's internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 (jinja's Namespace takes self this way)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _Dict:
    """``dict(…)`` and ``dict.fromkeys(…)``, without the class itself (no type tricks from a template)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    env = LimitedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _limited_filter(_tojson)
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace, dict=_Dict()
    )
    return env.from_string(source)


def size_limit(messages: Sequence[dict], variables: dict) -> int:
    text = sum(len(str(m.get("content") or "")) for m in messages) + sum(
        len(str(v)) for v in variables.values()
    )
    return MIN_CHARS + TEXT_FACTOR * text


def render_chat(source: str, messages: Sequence[dict], **variables) -> str:
    """``source`` rendered for ``messages`` with ``variables`` (``add_generation_prompt``, special
    tokens), within :data:`RENDER_SECONDS` and :func:`size_limit`; raises :class:`TemplateLimit`."""
    template = compile_chat_template(source)
    budget = _Budget(time.monotonic() + RENDER_SECONDS, size_limit(messages, variables))
    token = _BUDGET.set(budget)
    try:
        out, size = [], 0
        for piece in template.generate(messages=[dict(m) for m in messages], **variables):
            size += len(piece)
            if size > budget.max_chars:
                raise TemplateLimit(f"its output went over {budget.max_chars:,} characters")
            budget.check()
            out.append(piece)
        return "".join(out)
    finally:
        _BUDGET.reset(token)
