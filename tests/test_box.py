"""worktreebox/box.py's names: a task name becomes a slug, the slug and 8 random hex digits the box
id, and every external name is derived from the id. Pure functions: no process, no disk."""
from __future__ import annotations

import random
import re

import pytest

from worktreebox.box import MAX_SLUG, branch_name, hex_of, is_box_id, new_id, pg_name, slugify
from worktreebox.errors import UsageError

SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")


@pytest.mark.parametrize(("task", "slug"), [
    ("fix-login", "fix-login"),
    ("Fix Login", "fix-login"),
    ("  fix   login  ", "fix-login"),
    ("fix_login/v2", "fix-login-v2"),
    ("JIRA-1234: the login page 500s", "jira-1234-the-login-page-500s"),
    ("a--b", "a-b"),
    ("x" * 60, "x" * MAX_SLUG),
    ("word " * 20, ("word-" * 8).rstrip("-")),  # cut at 40, never ending in "-"
    ("café", "cafe"),  # accents fold to their letter
    ("42", "42"),
])
def test_slugify(task, slug):
    assert slugify(task) == slug


@pytest.mark.parametrize(("task", "says"), [
    ("", "The task name is empty"),
    ("   ", "The task name is empty"),
    ("-rf", "starts with '-'; pass a name, not an option"),
    ("--json", "starts with '-'"),
    ("!!!", "has no letters or digits"),
    ("x" * 201, "is 201 characters long; keep it under 200"),
])
def test_slugify_refuses_with_one_sentence(task, says):
    with pytest.raises(UsageError) as e:
        slugify(task)
    assert says in str(e.value) and "\n" not in str(e.value)


# Names in other scripts (issue 31, item 8: today 日本 is refused and some letters are dropped). What
# must hold whatever the rule becomes: a slug is a valid id part, or the refusal is one sentence.
UNICODE = ["日本", "ünïcödé-ταsk-日本", "задача", "fix 🐛 login", "e\u0301", "ﬁx", "Ⅻ", "\u200bzero-width",
           "tab\tand\nnewline", "\x00nul"]


@pytest.mark.parametrize("task", UNICODE)
def test_any_unicode_name_gives_a_valid_slug_or_one_sentence(task):
    try:
        slug = slugify(task)
    except UsageError as e:
        assert "\n" not in str(e) and str(e).endswith(".")
    else:
        assert SLUG.match(slug) and len(slug) <= MAX_SLUG


def test_random_names_never_raise_anything_but_a_usage_error():
    rng = random.Random(31)
    alphabet = "aZ9 -_./\\'\"\t\n\x7féßΣж日🐛\u0301\u200b"
    for _ in range(3000):
        task = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 50)))
        try:
            slug = slugify(task)
        except UsageError:
            continue
        assert SLUG.match(slug) and len(slug) <= MAX_SLUG, (task, slug)
        assert slugify(task) == slug  # the same name, the same slug


def test_new_ids_are_the_slug_and_eight_random_hex_digits():
    ids = {new_id("Fix Login") for _ in range(200)}
    assert len(ids) == 200
    for box_id in ids:
        assert is_box_id(box_id) and box_id.startswith("fix-login-")
        assert re.fullmatch(r"[0-9a-f]{8}", hex_of(box_id))


@pytest.mark.parametrize(("text", "is_id"), [
    ("fix-login-0a1b2c3d", True),
    ("x-00000000", True),
    ("pool-0a1b2c3d", True),
    ("fix-login", False),
    ("fix-login-0A1B2C3D", False),  # the hex is lower case
    ("fix-login-0a1b2c3", False),
    ("-fix-0a1b2c3d", False),
    ("../x-0a1b2c3d", False),
    (f"{'a' * 42}-0a1b2c3d", False),  # longer than any slug
])
def test_is_box_id(text, is_id):
    assert is_box_id(text) is is_id


def test_every_external_name_comes_from_the_id():
    box_id = "fix-login-0a1b2c3d"
    assert hex_of(box_id) == "0a1b2c3d"
    assert pg_name(box_id) == "wt_0a1b2c3d"  # role, schema, database: the hex only (63-byte limit)
    assert branch_name(box_id) == "wtbox/fix-login-0a1b2c3d"
    # a claimed pool box changes its task part, never its hex: the same PostgreSQL names
    assert pg_name("pool-0a1b2c3d") == pg_name(box_id)


def test_a_claimed_pool_box_answers_to_its_pool_name_too(tmp_path):
    from worktreebox.box import Box

    boxes = tmp_path / "boxes"
    claimed = Box(id="fix-login-0a1b2c3d", task="fix-login", repo="/r", branch=branch_name("fix-login-0a1b2c3d"),
                  dir=boxes / "fix-login-0a1b2c3d", data={"pool_id": "pool-0a1b2c3d"})
    assert claimed.alias == "pool-0a1b2c3d"
    alias = claimed.under_alias()
    assert (alias.id, alias.branch, alias.dir) == ("pool-0a1b2c3d", "wtbox/pool-0a1b2c3d", boxes / "pool-0a1b2c3d")
    assert alias.data is claimed.data and alias.pg_name == claimed.pg_name
    for never_pooled in ({}, {"pool_id": "fix-login-0a1b2c3d"}, {"pool_id": None}):
        box = Box(id="fix-login-0a1b2c3d", task="t", repo="/r", branch="b", dir=boxes / "x", data=never_pooled)
        assert box.alias is None and box.under_alias() is None
