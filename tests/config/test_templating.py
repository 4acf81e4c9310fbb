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
