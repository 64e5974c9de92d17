"""Chat templates run in a sandbox with a time and a size limit, and render what the tokenizer renders.

* For arbitrary conversations, kaika's rendering equals ``tokenizer.apply_chat_template`` on real
  models' templates (Gemma 3's, SmolLM2's ChatML) and on a template using every extra
  ``transformers`` gives templates (``tojson``, ``namespace``, ``raise_exception``, ``{% generation %}``).
* A template that loops for ever, grows a value without end or reaches into Python is stopped
  with a message that names the template and the limit, in about the time limit.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaika.data import jinja
from kaika.data.prompts import ChatTemplate
from kaika.data.segments import render
from kaika.errors import KaikaError

TEXT = st.text(alphabet="あいう漢字 ab.\n{}%<>|\"'\\", min_size=0, max_size=20)

EXTRAS = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- set ns.n = ns.n + 1 -%}
<{{ m.role }} {{ ns.n }}>{{ m.content | tojson }}{{ dict(a=1) | tojson }}
{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{% endif %}
{% endfor -%}
{%- if add_generation_prompt %}<assistant>{% endif -%}
{%- if messages | length > 50 %}{{ raise_exception('too long') }}{% endif -%}"""


@st.composite
def conversations(draw):
    msgs = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": draw(TEXT)}]
    return msgs[: len(msgs) - draw(st.integers(0, 1))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    msgs=conversations(),
    generation_prompt=st.booleans(),
    which=st.sampled_from(["gemma", "smollm2", "extras"]),
)
def test_renders_what_the_tokenizer_renders(
    gemma_tokenizer, smollm2_tokenizer, ja_tokenizer, msgs, generation_prompt, which
):
    tok, source = {
        "gemma": (gemma_tokenizer, gemma_tokenizer.chat_template),
        "smollm2": (smollm2_tokenizer, smollm2_tokenizer.chat_template),
        "extras": (ja_tokenizer, EXTRAS),
    }[which]
    template = ChatTemplate(source, which)
    try:
        expected = tok.apply_chat_template(
            msgs, chat_template=source, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # the template's own refusal (Gemma: roles must alternate)
        with pytest.raises(KaikaError, match=str(e)[:40].replace("(", r"\(").replace(")", r"\)")):
            render(template, tok, msgs, generation_prompt)
        return
    assert render(template, tok, msgs, generation_prompt) == expected


HOSTILE = {
    "a loop for ever": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "an empty loop nest without range": "{% for i in 'x' * 90000 %}{% for j in 'y' * 90000 %}{% endfor %}{% endfor %}",
    "a repeated string": "{{ 'x' * 10 ** 9 }}",
    "a power tower": "{{ 10 ** (10 ** 10) }}",
    "a padded filter": "{{ 'x' | center(10 ** 9) }}",
    "a padded format": "{{ '%0999999999d' % 1 }}",
    "a format method": "{{ '{:>999999999}'.format(1) }}",
    "a doubling namespace": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
        "{{ ns.s | length }}"
    ),
    "a doubling macro": "{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s }}{% endmacro %}{{ d('ab', 60) }}",
    "an exploding macro": "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "a loop writing out": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_template_is_stopped(ja_tokenizer, monkeypatch, name):
    monkeypatch.setattr(jinja, "RENDER_SECONDS", 0.5)
    template = ChatTemplate(HOSTILE[name] + "{% if add_generation_prompt %}A:{% endif %}", "hostile")
    start = time.monotonic()
    with pytest.raises(KaikaError) as e:
        render(template, ja_tokenizer, [{"role": "user", "content": "こんにちは"}], True)
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "chat template hostile" in message, message
    assert any(word in message for word in ("was stopped", "maximum recursion depth", "ran for more")), (
        message
    )


def test_the_sandbox_keeps_python_out(ja_tokenizer):
    template = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "escape")
    with pytest.raises(KaikaError, match="chat template escape cannot render"):
        render(template, ja_tokenizer, [{"role": "user", "content": "a"}], True)
    appended = ChatTemplate("{% set l = [] %}{{ l.append(1) }}", "mutate")
    with pytest.raises(KaikaError, match="chat template mutate cannot render"):
        render(appended, ja_tokenizer, [{"role": "user", "content": "a"}], True)


def test_the_limits_leave_long_conversations_alone(ja_tokenizer):
    """A conversation of 2 MB renders: the size limit grows with the text given to the template."""
    long = "長い文章。" * 400_000
    out = render(ChatTemplate(EXTRAS, "extras"), ja_tokenizer, [{"role": "user", "content": long}], True)
    assert f'<user 1>"{long}"' in out and out.endswith("<assistant>")


def test_a_template_file_with_the_generation_block_loads(tmp_path, ja_tokenizer):
    from kaika.data.prompts import load_template

    path = tmp_path / "extras.jinja"
    path.write_text(EXTRAS, encoding="utf-8")
    template = load_template(path)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert "<assistant 2>" in render(template, ja_tokenizer, msgs, False)
