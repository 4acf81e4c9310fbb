"""The value parsers of both config files and of flags (worktreebox/config/values.py): what each
takes, what it returns, and what it says when it refuses. Pure functions, in process."""
from __future__ import annotations

import math

import pytest

from worktreebox.config import values as v
from worktreebox.errors import ConfigError

DURATION = "a duration such as '30s', '10m' or '72h'"


def complaint(parse, value) -> str:
    with pytest.raises(v.Invalid) as e:
        parse(value)
    return e.value.error_msg


@pytest.mark.parametrize(("value", "seconds"), [
    ("90s", 90.0), ("10m", 600.0), ("72h", 259200.0), ("2d", 172800.0), ("1w", 604800.0), (" 1.5h ", 5400.0),
    ("30", 30.0), (45, 45.0), (2.5, 2.5), (0, 0.0), ("0s", 0.0), (v.MAX_DURATION, v.MAX_DURATION),
])
def test_durations(value, seconds):
    assert v.duration(value) == seconds


@pytest.mark.parametrize(("value", "positive", "got"), [
    ("forever", False, f"expected {DURATION}, got 'forever'"),
    ("-5h", False, f"expected {DURATION}, got '-5h'"),
    ("1e999h", False, f"expected {DURATION}, got '1e999h'"),
    (True, False, f"expected {DURATION}, got True"),
    ([], False, f"expected {DURATION}, got []"),
    (-1, False, f"expected {DURATION}, 0 or more and at most ten years, got -1"),
    (math.nan, False, f"expected {DURATION}, 0 or more and at most ten years, got nan"),
    (math.inf, False, f"expected {DURATION}, 0 or more and at most ten years, got inf"),
    (1e300, False, f"expected {DURATION}, 0 or more and at most ten years, got 1e+300"),
    ("3651d", False, f"expected {DURATION}, 0 or more and at most ten years, got '3651d'"),
    (0, True, f"expected {DURATION}, more than 0 and at most ten years, got 0"),
    ("0s", True, f"expected {DURATION}, more than 0 and at most ten years, got '0s'"),
])
def test_bad_durations(value, positive, got):
    assert complaint(lambda x: v.duration(x, positive=positive), value) == got


@pytest.mark.parametrize(("where", "value", "sentence"), [
    ("--older-than", "soon", f"--older-than: expected {DURATION}, got 'soon'."),
    ("WTBOX_LAYER_TTL", "-1", f"WTBOX_LAYER_TTL: expected {DURATION}, got '-1'."),
])
def test_a_flag_or_variable_is_named(where, value, sentence):
    with pytest.raises(ConfigError) as e:
        v.parse_duration(value, where=where)
    assert str(e.value) == sentence


@pytest.mark.parametrize(("value", "size"), [
    (8388608, 8 << 20), ("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", int(1.5 * (1 << 30))), ("4096k", 4 << 20),
    ("1t", 1 << 40), ("10", 10), ("MAX", v.UNLIMITED), (" max ", v.UNLIMITED),
])
def test_sizes(value, size):
    assert v.size(value) == size


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "lots", "5ib", "0M", "", "2 G B"])
def test_bad_sizes(value):
    assert complaint(v.size, value) == f'expected a size such as "512M" or "2G", or "max", got {value!r}'


@pytest.mark.parametrize("value", ["99999999999999999999999G", "9000000T", 1 << 70])
def test_a_memory_limit_the_kernel_cannot_hold_is_refused_not_taken_as_no_limit(value):
    """Defect 3: "99999999999999999999999G" was accepted and meant no limit."""
    assert complaint(v.memory_max, value).startswith("expected a size below 8 exabytes")


@pytest.mark.parametrize(("value", "parsed"), [("20000-29999", (20000, 29999)), (" 1024 - 65535 ", (1024, 65535))])
def test_port_ranges(value, parsed):
    assert v.port_range(value) == parsed


@pytest.mark.parametrize(("value", "got"), [
    (5, 'expected a range such as "20000-29999", got 5'),
    ("20000", "expected a range such as '20000-29999', got '20000'"),
    ("20000-20000", "the range '20000-20000' must lie between 1024 and 65535, low to high"),
    ("1000-70000", "the range '1000-70000' must lie between 1024 and 65535, low to high"),
])
def test_bad_port_ranges(value, got):
    assert complaint(v.port_range, value) == got


@pytest.mark.parametrize("value", ["http://127.0.0.1:8000/", "https://h/x", "{{ anything }}"])
def test_urls(value):
    assert v.url(value) == value


@pytest.mark.parametrize("value", ["nope", "ftp://x", "http://", "http://a b/", "http://127.0.0.1:99999/",
                                   "http://[::1/", "http://x\x1b"])
def test_bad_urls(value):
    assert complaint(v.url, value) == (f"expected an http:// or https:// URL such as 'http://127.0.0.1:8000/', "
                                       f"got {value!r}")


@pytest.mark.parametrize("value", ["tcp:80", "tcp:localhost:80", "tcp:{{ ports.web }}", "http://h:1/", "true",
                                   "pg_isready -h {{ db.host }}"])
def test_ready_checks(value):
    assert v.ready(value) == value


@pytest.mark.parametrize("value", ["tcp:", "tcp:0", "tcp:65536", "tcp:abc", "tcp:a b:80"])
def test_bad_tcp_ready_checks(value):
    assert complaint(v.ready, value) == (f"expected tcp:PORT or tcp:HOST:PORT with a port from 1 to 65535, "
                                         f"got {value!r}")


@pytest.mark.parametrize(("value", "ok"), [
    ("postgresql://u:p@h:5432/db", True), ("postgres://h/db", True), ("postgresql://a b@h/db", False),
    ("mysql://root:hunter2@x/db", False), ("", False), ("postgresql://h/\x00", False),
])
def test_postgres_urls_are_never_shown_back(value, ok):
    if ok:
        assert v.postgres_url(value) == value
    else:
        assert complaint(v.postgres_url, value) == ("expected a postgresql://USER:PASSWORD@HOST:PORT/DB URL, "
                                                    "got a value that is not one")


@pytest.mark.parametrize(("value", "got"), [
    (5, "expected an image name, got 5"), ("", "expected an image name such as 'postgres:15', got ''"),
    ("a b", "expected an image name such as 'postgres:15', got 'a b'"),
    ("\x1b[31m", "expected an image name such as 'postgres:15', got '\\x1b[31m'"),
])
def test_bad_images(value, got):
    assert complaint(v.image, value) == got


@pytest.mark.parametrize(("value", "got"), [
    ("..", "'..'"), ("a/../../b", "'a/../../b'"), ("/tmp", "'/tmp'"), ("~/x", "'~/x'"), ("", "''"),
    ("a\x00", "'a\\x00'"),
])
def test_paths_stay_inside_as_written(value, got):
    assert complaint(lambda x: v.inside("a path inside", x), value) == f"expected a path inside, got {got}"


def test_paths_stay_inside_after_symlinks(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "out").symlink_to(tmp_path)
    assert v.path_inside(tmp_path / "root", "a/b", "w") == tmp_path / "root" / "a" / "b"
    with pytest.raises(ConfigError) as e:
        v.path_inside(tmp_path / "root", "out/x", "wtbox.toml: [box] copy")
    assert str(e.value) == (f"wtbox.toml: [box] copy: 'out/x' leads outside {tmp_path / 'root'} "
                            f"(to {tmp_path / 'x'}); keep it inside.")


@pytest.mark.parametrize(("value", "rel"), [(".", ""), ("./", ""), ("./a/", "a"), ("a/b", "a/b"), ("/a", None),
                                             ("a/../b", None)])
def test_repo_relative_paths_are_normalised(value, rel):
    parse = v.repo_relative("a path")
    if rel is None:
        assert complaint(parse, value) == f"expected a path, got {value!r}"
    else:
        assert parse(value) == rel


@pytest.mark.parametrize(("parse", "value", "got"), [
    (v.choice("a", "b"), 5, "expected one of a, b, got 5"),
    (v.choice("a", "b"), "c", "expected one of 'a', 'b', got 'c'"),
    (v.boolean, 1, "expected true or false, got 1"),
    (v.whole("a number", 1, 3, range_what="a number from 1 to 3"), 4, "expected a number from 1 to 3, got 4"),
    (v.whole("a number", 1, 3, range_what="a number from 1 to 3"), True, "expected a number, got True"),
    (v.whole("a number", 1, 3, range_what="a number from 1 to 3"), 2.0, "expected a number, got 2.0"),
    (v.above_zero("a load"), 0, "expected a load, got 0"),
    (v.command, "  ", "expected a shell command string, got '  '"),
    (v.command, "{{ x", "bad template '{{ x': unexpected end of template, expected 'end of print statement'."),
    (v.str_list, ["a", 1], "expected a list of strings without control characters, got ['a', 1]"),
    (v.env_names, ["DB_PASSWORD"], ("expected names of variables that are not secrets (pass those with --secret), "
                                    "got 'DB_PASSWORD'")),
])
def test_small_parsers(parse, value, got):
    assert complaint(parse, value) == got


@pytest.mark.parametrize(("value", "part", "got"), [
    ({"1X": "a"}, "1X", "expected an environment variable name, got '1X'"),
    ({"X": None.__class__}, "X", "expected a string, got <class 'NoneType'>"),
    ({"X": "{{ x"}, "X", "bad template '{{ x': unexpected end of template, expected 'end of print statement'."),
])
def test_env_tables_name_the_entry_at_fault(value, part, got):
    with pytest.raises(v.Invalid) as e:
        v.env_map()(value)
    assert (e.value.part, e.value.error_msg) == (part, got)
