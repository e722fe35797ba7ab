"""Chat templates from a model's files are outside input: whatever they do ends in one line naming the file,
and a template that would loop for minutes or build gigabytes stops at once."""

import json

import pytest

import helpers
from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
NESTED = "{% set l = [1] %}" + "{% set l = [l] * 1000 %}" * 5  # a tiny object; printed, 10**15 characters

HOSTILE = {
    "nested-loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    "exponential-macro": (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        "steps",
    ),
    "string-repeat": ("{{ 'x' * 10**10 }}", "a '*' repetition would hold 10000000000"),
    "doubling-concat": ("{% set s = 'x' * 1000 %}" + "{% set s = s ~ s %}" * 40 + "{{ s }}", "'~' concatenation"),
    "doubling-plus": ("{% set s = 'x' * 1000 %}" + "{% set s = s + s %}" * 40 + "{{ s }}", "'+' concatenation"),
    "percent-width": ("{{ '%0999999999d' % 1 }}", "asks for a width of 0999999999"),
    "format-width": ("{{ '{:>999999999}'.format(1) }}", "asks for a width of 999999999"),
    "center": ("{{ 'x'.center(999999999) }}", "'center' was given 999999999"),
    "replace": ("{% set s = 'x' * 100000 %}{{ s.replace('', s) }}", "'replace' would hold"),
    "join-filter": ("{{ range(100000)|join('x' * 100000) }}", "filter 'join' would hold"),
    "indent": ("{{ ('x\n' * 100000)|indent(' ' * 100000) }}", "filter 'indent' would hold"),
    "power": ("{{ 2 ** 100000000 }}", "larger than 4096 bits"),
    "nested-print": (NESTED + "{{ l }}", "a printed value would hold"),
    "nested-json": (NESTED + "{{ l|tojson }}", "given to filter 'tojson'"),
    "json-indent": ("{{ range(100000)|list|tojson(indent=100000) }}", "filter 'tojson' would hold"),
    "long-output": ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "rendered conversation"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    "sandbox": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "the sandbox forbids"),
    "lipsum": ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
    "raise": ("{{ raise_exception('roles must alternate') }}", "refuses this conversation: roles must alternate"),
    "type-error": ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    "undefined": ("{{ messages[5]['content'] }}", "UndefinedError"),
    "syntax": ("{% for %}", "syntax error on line 1"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_template_is_one_line_naming_its_file(tmp_path, name):
    template, message = HOSTILE[name]
    helpers.write_tokenizer(tmp_path, chat_template=template)
    tokenizer = load_tokenizer(tmp_path)
    with pytest.raises(NibbleError) as exc:  # without the bounds: a hang, or memory exhausted
        tokenizer.apply_chat_template(MESSAGES)
    text = str(exc.value)
    assert text.startswith(f"{tmp_path / 'tokenizer_config.json'}: ") and "\n" not in text, text
    assert message in text, text


def test_the_file_named_is_the_one_the_template_came_from(tmp_path):
    helpers.write_tokenizer(tmp_path, chat_template="{{ messages[0]['content'] }}")
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('from the jinja file') }}")
    with pytest.raises(NibbleError, match=r"chat_template.jinja: the chat template refuses this conversation"):
        load_tokenizer(tmp_path).apply_chat_template(MESSAGES)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 1 / 0 }}"}))
    with pytest.raises(NibbleError, match=r"chat_template.json: the chat template failed \(ZeroDivisionError"):
        load_tokenizer(tmp_path).apply_chat_template(MESSAGES)


def test_an_oversized_template_is_refused(tmp_path):
    helpers.write_tokenizer(tmp_path, chat_template="x" * (1 << 20) + "{{ 1 }}")
    with pytest.raises(NibbleError, match=r"tokenizer_config.json: the chat template has \d+ characters, more than"):
        load_tokenizer(tmp_path).apply_chat_template(MESSAGES)


def test_real_templates_render_as_before(tmp_path):
    # What the bounds must not touch: loops over messages, string methods, filters, tojson, macros, namespaces.
    template = (
        "{% macro role(m) %}<|{{ m['role'] }}|>{% endmacro %}{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ role(m) }}{{ m['content'].strip()|trim }}"
        "{{ '%s' % loop.index }}{{ m|tojson }}{{ '{}-{}'.format(ns.n, m['role']|upper) }}"
        "{{ (m['content'] * 2)|replace('h', 'H')|center(12) }}{{ [m['role'], 'x']|join(',') }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    from transformers import AutoTokenizer

    helpers.write_tokenizer(tmp_path, chat_template=template)
    text = load_tokenizer(tmp_path).apply_chat_template(MESSAGES, add_generation_prompt=True)
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert text == theirs and "HelloHello" in text


def test_the_bound_grows_with_the_conversation(tmp_path):
    # A long conversation renders: the size bound is 1 MiB plus 8 times the messages' text.
    helpers.write_tokenizer(
        tmp_path, chat_template="{% for m in messages %}{{ m['content'] ~ m['content'] }}{% endfor %}"
    )
    long = [{"role": "user", "content": "y" * (2 << 20)}]
    assert len(load_tokenizer(tmp_path).apply_chat_template(long)) == 4 << 20
