"""The config check's fast path: templates made only of `{{ name.name }}` substitutions are
accepted without Jinja2; everything else is compiled by Jinja2, as before."""
import random

import jinja2
import pytest

from worktreebox.config import templating
from worktreebox.errors import ConfigError


@pytest.mark.parametrize("text", ["{{ ports.web }}", "http://127.0.0.1:{{ports.web}}/x", "{ a } }",
                                  "{{ db.url }} and {{ box.dir }}", "a{b}c"])
def test_plain_substitutions_pass_without_jinja(text):
    assert templating._PLAIN.fullmatch(text)
    templating.check(text, "wtbox.toml: x")


@pytest.mark.parametrize("text", ["{{ ports.web | upper }}", "{% if x %}y{% endif %}", "{# note #}",
                                  "{{ ports['web'] }}", "{{ }}", "{{ a. }}", "{{ 1x }}"])
def test_anything_else_goes_to_jinja(text):
    assert not templating._PLAIN.fullmatch(text)


@pytest.mark.parametrize("text", ["{{ }}", "{{ a. }}", "{% if %}", "{{ x | nosuchfilter }}"])
def test_broken_templates_are_still_refused(text):
    with pytest.raises(ConfigError):
        templating.check(text, "wtbox.toml: x")


def test_fast_path_never_accepts_what_jinja_refuses():
    """Random strings over the characters that matter: whatever the fast path accepts compiles."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    pieces = ["{", "}", "{{", "}}", "{%", "%}", "{#", "#}", " ", "a", "b.c", ".", "_x", "1", "|", "(", "'"]
    rng = random.Random(15)
    accepted = 0
    for _ in range(50_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        if "{{" in text and templating._PLAIN.fullmatch(text):
            accepted += 1
            env.compile(text)  # raises on a template the fast path should not have passed
    assert accepted > 30  # the property was exercised (60 of these 50,000 strings)


FACTS = {"ports": {"web": 8000}, "box": {"id": "fix-login-0a1b2c3d", "dir": "/w/boxes/fix-login-0a1b2c3d"},
         "db": {"url": "postgresql://wt_0a1b2c3d@127.0.0.1:5432/wtbox"}}
WHERE = "wtbox.toml: [services.web] cmd"


@pytest.mark.parametrize(("template", "text"), [
    ("plain text, no braces", "plain text, no braces"),
    ("serve --port {{ ports.web }}", "serve --port 8000"),
    ("{{ db.url }}?app={{ box.id }}", "postgresql://wt_0a1b2c3d@127.0.0.1:5432/wtbox?app=fix-login-0a1b2c3d"),
    ("{{ ports.web + 1 }}", "8001"),
    ("{% if ports.web %}on{% endif %}\n", "on\n"),  # the trailing newline is kept
    ("{{ '{{' }} ports.web }}", "{{ ports.web }}"),  # a literal brace pair is not rendered twice
])
def test_render_substitutes_box_facts(template, text):
    assert templating.render(template, FACTS, WHERE) == text


@pytest.mark.parametrize(("template", "says"), [
    ("{{ ports.api }}", "'dict object' has no attribute 'api'"),
    ("{{ nosuch }}", "'nosuch' is undefined"),
    ("{{ nosuch.x }}", "'nosuch' is undefined"),
])
def test_a_missing_fact_names_where_and_what_there_is(template, says):
    with pytest.raises(ConfigError) as e:
        templating.render(template, FACTS, WHERE)
    assert str(e.value) == f"{WHERE}: {says} (available: box, db, ports)."


# Templates come from a repo's wtbox.toml: whatever one does when it is rendered is a config
# error of one line naming the file and key, never an internal error with a traceback.
HOSTILE = [
    "{{ 1 / 0 }}",
    "{{ ports.web | int / 0 }}",
    "{{ 'a' + 1 }}",
    "{{ ports.web(1) }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",  # unbounded recursion
    '{% include "/etc/passwd" %}',
    '{% extends "base.html" %}',
    '{% import "x" as y %}',
    "{{ ports.web.nosuch() }}",
    "{{ box['id'][99] }}",
    "{% for x in 5 %}{% endfor %}",
    "{{ 'x' | nosuchfilter }}",
    "{% if %}",
    "{{ }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_a_hostile_template_is_one_config_error(template):
    with pytest.raises(ConfigError) as e:
        templating.render(template, FACTS, WHERE)
    message = str(e.value)
    assert message.startswith(f"{WHERE}: ") and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("template", ["{{ box.__class__ }}", "{{ lipsum.__globals__['os'].popen('id').read() }}"])
def test_what_reaches_for_pythons_insides_is_refused(template):
    """Templates render in Jinja2's sandbox: a wtbox.toml's commands run in the box, its
    templates ran in wtbox itself, on the host."""
    with pytest.raises(ConfigError, match="may not"):
        templating.render(template, FACTS, WHERE)


@pytest.mark.parametrize("template", ["{{ ports.web.bit_length() }}", "{{ lipsum(1)[:0] }}"])
def test_what_jinja_allows_renders_without_harm(template):
    """Plain methods of plain values still render to text."""
    assert isinstance(templating.render(template, FACTS, WHERE), str)
