"""The chat template's bounded sandbox (fastllm/loading/chat_template.py): ordinary templates render exactly as
transformers renders them (ChatML, Llama-3, Mistral-style and one using most of jinja2's features; SmolLM2's own
template is compared in tests/test_gguf.py), and hostile templates (huge repetitions, powers, ranges, doubling
loops, amplifying filters and methods, unbounded output) are refused at once with a ValueError naming the chat
template, before they build the value."""
import time

import pytest

from fastllm.loading import chat_template
from fastllm.loading.chat_template import MAX_CHARS, compile_template, render

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
          " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0"
          " == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if"
          " add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role']"
           " == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}")
FEATURES = """{%- macro header(role) -%}<{{ role | upper }}>{%- endmacro -%}
{%- set ns = namespace(system='', count=0) -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}{%- set ns.system = ns.system ~ m.content.strip() -%}{%- endif -%}
  {%- set ns.count = ns.count + 1 -%}
{%- endfor -%}
{%- set info -%}{{ '%s has %d messages' % ('this chat', ns.count) }} {{ '{:>6}|{}'.format('x', 2 ** 5) }}{%- endset -%}
{{ bos_token }}{{ info }}
{% filter upper %}{{ ns.system | replace('helpful', 'useful') }}{% endfilter %}
{{ {'tools': ['search', 'calc'] * 2, 'n': range(3) | list, 't': (1, 'a')} | tojson(indent=2) }}
{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=True, separators=(',', ':')) }}{{ ['é'] | tojson(ensure_ascii=True) }}
{% for m in messages | selectattr('role', 'equalto', 'user') %}{{ header(m.role) }}{{ m.content.split() | join('_') }}
{{ '-' * 10 }}{{ m.content | center(20) }}|{{ m.content.ljust(8) }}|{{ m.content | indent(2, first=True) }}
{% endfor %}{% if add_generation_prompt %}{{ header('assistant') }}{% endif %}"""

MESSAGES = [{"role": "system", "content": " You are a helpful bot. "}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?\nThanks"}]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.mark.parametrize("name, template, messages", [
    ("chatml", CHATML, MESSAGES), ("llama3", LLAMA3, MESSAGES), ("mistral", MISTRAL, MESSAGES[1:]),
    ("features", FEATURES, MESSAGES)])
def test_ordinary_templates_render_as_transformers(name, template, messages):
    from transformers.utils.chat_template_utils import render_jinja_template

    ours = render(compile_template(template), messages=messages, add_generation_prompt=True, tools=None, **SPECIALS)
    theirs = render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **SPECIALS)[0][0]
    assert ours == theirs
    assert len(ours) > 40


def test_template_refusal_is_kept():
    with pytest.raises(ValueError, match="chat template refused the messages: Conversation roles must alternate"):
        render(compile_template(MISTRAL), messages=MESSAGES, **SPECIALS)


DOUBLING = "{% set ns = namespace(s=VALUE) %}{% for i in range(60) %}{% set ns.s = STEP %}{% endfor %}{{ ns.s }}"
BIG = f"{{% set s = 'x' * {MAX_CHARS // 2} %}}"
LINES = "{% set s = 'x\n' * 100000 %}"
NESTED = "{% for i in range(10000) %}{% for j in range(10000) %}xxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}"
HOSTILE = {
    "repeat-string": ("{{ 'x' * 10**10 }}", "repeating a value of size 1 10000000000 times"),
    "repeat-string-2": ("{{ 'ab' * 999999999 }}", "repeating a value of size 2 999999999 times"),
    "repeat-list": ("{{ 3 * [1, 2] * 10**8 }}", "repeating a value of size"),
    "power": ("{{ 10 ** (10 ** 10) }}", r"10 \*\* 10000000000 makes an integer of more than 4096 bits"),
    "product": ("{% set n = 2 ** 4000 %}{{ n * n }}", r"the \* operator makes an integer"),
    "range": ("{% for i in range(10**9) %}x{% endfor %}", r"range\(1000000000,\) has 1000000000 numbers"),
    "concat-doubling": (DOUBLING.replace("VALUE", "'x'").replace("STEP", "ns.s ~ ns.s"), "the ~ operator"),
    "plus-doubling": (DOUBLING.replace("VALUE", "'x'").replace("STEP", "ns.s + ns.s"), r"the \+ operator"),
    "list-doubling": (DOUBLING.replace("VALUE", "[1]").replace("STEP", "[ns.s, ns.s]"), "a literal"),
    "replace-filter": (BIG + "{{ s | replace('x', 'yy') }}", "the filter replace would make"),
    "replace-method": (BIG + "{{ s.replace('x', 'yy') }}", "str.replace would make"),
    "join": (BIG + "{{ ([1] * 3) | join(s) }}", "the filter join would make"),
    "join-method": (BIG + "{{ s.join(['a', 'b', 'c']) }}", "str.join would make"),
    "indent": (LINES + "{{ s | indent(1000) }}", "the filter indent would make"),
    "wordwrap": (BIG + "{{ s | wordwrap(5, wrapstring='\n\n\n') }}", "the filter wordwrap would make"),
    "expandtabs": ("{{ ('\t' * 100000).expandtabs(1000) }}", "str.expandtabs would make"),
    "center": ("{{ 'x' | center(10**10) }}", "the filter center is given 10000000000"),
    "ljust": ("{{ 'x'.ljust(10**10) }}", "str.ljust is given 10000000000"),
    "batch": ("{{ [1] | batch(10**9, 0) | list }}", "the filter batch is given 1000000000"),
    "percent-width": ("{{ '%099999999999d' % 1 }}", "the % operator's format string has a width"),
    "percent-star": ("{{ '%*d' % (10**10, 1) }}", "the % operator is given"),
    "format-width": ("{{ '{:>99999999999}'.format(1) }}", "str.format's format string has a width"),
    "format-filter": ("{{ '%099999999999d' | format(1) }}", "the filter format's format string"),
    "tojson": ("{{ ([[1] * 1000] * 1000) | tojson(indent=1000) }}", "the filter tojson would write"),
    "tojson-indent": ("{{ [1] | tojson(indent=10**9) }}", "the filter tojson is given an indent of 1000000000"),
    "output": (NESTED, "the rendered prompt reaches more than"),
    "macro": ("{% macro f() %}" + NESTED + "{% endmacro %}{{ f() | length }}", "the output of a macro or block"),
    "set-block": ("{% set x %}" + NESTED + "{% endset %}{{ x | length }}", "the output of a macro or block"),
    "center-huge": ("{{ 'x' | center(10**400) }}", "the filter center is given a number of 401 digits"),
    "format-repeats": ("{% set s = 'x' * 1000000 %}{{ ('{0}' * 1000).format(s) }}", "str.format would make more"),
    "percent-repeats": ("{% set s = 'x' * 1000000 %}{{ ('%(a)s' * 1000) % {'a': s} }}", "the % operator would make"),
    "map-center": ("{{ range(10000) | map('center', 16000000) | list | length }}", "the filter map makes items"),
    "namespace": ("{% set s = 'x' * 16000000 %}{% set ns = namespace(a=s) %}{{ ([ns] * 1000) | string | length }}",
                  "repeating a value of size"),
    "dict-items": ("{% set d = {'a': 'x' * 16000000} %}{{ ([d.items()] * 1000) | string | length }}",
                   "repeating a value of size"),
    "translate-list": ("{% set b = 'y' * 100000 %}{{ ('a' * 100000).translate([b] * 98) }}", "str.translate would"),
    "sum-lists": ("{{ ('x' * 100000) | batch(1) | sum(start=[]) | length }}", "the filter sum adds numbers only"),
    "float-overflow": ("{{ 2.0 ** 10000 }}", "rendering the chat template fails: OverflowError"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "rendering the chat template fails: Recursion"),
    "loops-without-output": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                             "rendering the chat template takes more than"),
    "kept-alive": ("{% macro f(n) %}{% set s = 'y' * 16000000 %}{% if n %}{{ f(n - 1) }}{% endif %}"
                   "{{ s | length }}{% endmacro %}{{ f(100) | length }}", "rendering the chat template builds more"),
    "many-variables": ("".join(f"{{% set a{i} = 'y' * 16000000 %}}" for i in range(20)),
                       "rendering the chat template builds more than"),
    "round": ("{{ 1 | round(-30000000) }}", "the filter round is given a precision beyond 1000"),
    "striptags": ("{{ ('<>' * 8000000) | striptags | length }}", "the filter striptags is given more than"),
    "huge-int": ("{% set a = ('f' * 4000000) | int(base=16) %}{{ a > 0 }}", "the filter int makes an integer of"),
    "map-select": ("{{ ('x' * 16000000) | map('lower') | map('upper') | select('none') | list | length }}",
                   "rendering the chat template takes more than"),
    "nested-blocks": ("{% for i in [1] %}" * 25 + "{% endfor %}" * 25, "compiling the chat template fails"),
    "exponential-macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
                          "rendering the chat template takes more than"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_templates_are_refused(case, monkeypatch):
    template, words = HOSTILE[case]
    # the time limit's cases quickly; the others get their own refusal first even on a slow machine
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.5 if "takes more than" in words else 60.0)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"chat template exceeds its sandbox's limits: {words}"):
        render(compile_template(template), messages=MESSAGES, **SPECIALS)
    assert time.perf_counter() - start < 30   # a refusal, not a hang (each takes well under a second here)


def test_lipsum_is_not_offered():
    from jinja2 import UndefinedError

    with pytest.raises(UndefinedError, match="lipsum"):
        render(compile_template("{{ lipsum(10**9) }}"), messages=MESSAGES)


def test_values_within_the_limits_render():
    """Large but bounded values pass: the limits are on size, not on the operators."""
    template = BIG + "{{ (s + s) | length }} {{ ('x' * 5) ~ ([0] * 3) | string }} {{ 2 ** 4000 > 0 }}"
    assert render(compile_template(template), messages=MESSAGES) == f"{MAX_CHARS} xxxxx[0, 0, 0] True"
    big = 10 ** 12   # numbers as values, not widths, may be of any size
    template = ("{{ '%d' % n }} {{ n | string }} {{ '{}'.format(n) }} {{ '%s!' | format(n) }} {{ n | round(2) }} "
                "{{ x | default(n) }} {{ [n] | select('equalto', n) | list }} {{ '1,2'.split(',', n) }}")
    assert render(compile_template(template), n=big) == f"{big} {big} {big} {big}! {big} {big} [{big}] ['1', '2']"


def test_constant_expressions_do_not_run_while_compiling():
    """jinja2 would fold constant expressions (filters included) into the compiled code, before any limit ran: 40
    strings of 16M characters while compiling. Nothing runs then; rendering builds them one at a time, within
    MAX_BUILT in all."""
    for statement in ("{% set a = 'x' | center(16000000) %}{{ a | length }}", "{{ 'x' | center(16000000) | length }}"):
        template = compile_template(statement * 40)   # (a value built here would count against the compile)
        with pytest.raises(ValueError, match="rendering the chat template builds more than"):
            render(template)
        assert render(compile_template(statement * 2)) == "16000000" * 2


def test_bytes_are_not_offered():
    from jinja2.exceptions import SecurityError

    for source in ("{{ ('x'.encode() * 10**10) | length }}", "{{ (1).to_bytes(10**10, 'big') | length }}"):
        with pytest.raises(SecurityError):
            render(compile_template(source))


def test_numbers_in_format_strings_and_fill_values_render():
    """Digits in a format string's text and batch's fill value are not widths."""
    source = "{{ 'ts 1700000000 %s' % 'x' }} {{ '{0} 12345678901'.format('y') }} {{ [1] | batch(2, 10**9) | list }}"
    assert render(compile_template(source)) == "ts 1700000000 x y 12345678901 [[1, 1000000000]]"


def test_positional_percent_formats_count_each_argument_once():
    """'%s ... %s' % (a, b) makes about len(a) + len(b): a 10M-character message in a ChatML-style format renders."""
    source = "{{ '<|im_start|>%s\\n%s<|im_end|>' % (m.role, m.content) }}"
    m = {"role": "user", "content": "x" * 10_000_000}
    assert len(render(compile_template(source), m=m)) == len("<|im_start|>user\n<|im_end|>") + 10_000_000


def test_format_keys_are_scanned_in_linear_time():
    """100000 unterminated '%(' keys: Python's own ValueError, not a quadratic scan by the format check first."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match="incomplete format key"):
        render(compile_template("{{ ('%(' * 100000) % {} }}"))
    assert time.perf_counter() - start < 30   # (the unbounded key pattern took 22 s)
