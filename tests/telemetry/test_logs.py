"""Captured logs: records, levels, tracebacks, redaction, rotation, and a fast reader."""
from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from worktreebox.errors import UsageError
from worktreebox.secrets import Redactor
from worktreebox.telemetry.logs.reader import follow, parse_time, read_records
from worktreebox.telemetry.logs.run import run_logged
from worktreebox.telemetry.logs.writer import LogWriter, parse_level

TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "app.py", line 3, in <module>',
    "    main()",
    '  File "app.py", line 2, in main',
    "    raise ValueError('boom')",
    "ValueError: boom",
]


def lines_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("line, level", [
    ("plain output", "info"),
    ("ERROR could not connect", "error"),
    ("WARNING: disk almost full", "warning"),
    ("[WARN] slow query", "warning"),
    ("DEBUG x=1", "debug"),
    ("CRITICAL meltdown", "critical"),
    ("FATAL: out of memory", "critical"),
    ("ERROR:root:python logging default format", "error"),
    ("INFO:     Uvicorn running on http://127.0.0.1:8000", "info"),
    ("2024-05-01 12:00:00,123 WARNING app: careful", "warning"),
    ("2024-05-01T12:00:00.123Z ERROR boom", "error"),
    ("2024-05-01 12:00:00,123 - app.db - ERROR - lost connection", "error"),
    ("time=2024-05-01T12:00:00Z level=warn msg=retrying", "warning"),
    ('{"level": "error", "msg": "json log"}', "error"),
    ('{"severity": "WARNING", "message": "gcp style"}', "warning"),
    ('{"levelname": "DEBUG", "message": "python-json-logger"}', "debug"),
    ('{"level": 40, "msg": "python numeric"}', "error"),
    ('{"msg": "json without level"}', "info"),
    ("an ERROR in the middle is not a level", "info"),
    ("INFORMATIONAL is not INFO", "info"),
])
def test_levels(line, level):
    assert parse_level(line) == level


def test_record_shape_redaction_and_traceback_is_one_error_record(tmp_path):
    w = LogWriter(tmp_path, "web", Redactor(["hunter2-secret"]))
    w.line("stdout", "starting with password hunter2-secret")
    for line in TRACEBACK:
        w.line("stderr", line)
    w.line("stderr", "after the traceback")
    w.close()
    recs = lines_of(tmp_path / "web.jsonl")
    assert [list(r) for r in recs] == [["ts", "service", "stream", "level", "msg"]] * 3
    assert recs[0]["msg"] == "starting with password ***"
    assert "hunter2" not in (tmp_path / "web.jsonl").read_text()
    assert recs[1] == {**recs[1], "service": "web", "stream": "stderr", "level": "error",
                       "msg": "\n".join(TRACEBACK)}
    assert recs[2]["msg"] == "after the traceback" and recs[2]["level"] == "info"
    # RFC 3339, UTC, milliseconds
    assert len(recs[0]["ts"]) == 24 and recs[0]["ts"].endswith("Z") and recs[0]["ts"][19] == "."


def test_chained_traceback_stays_one_record_and_stdout_is_not_mixed_in(tmp_path):
    w = LogWriter(tmp_path, "app")
    chained = [*TRACEBACK, "", "During handling of the above exception, another exception occurred:", "",
               "Traceback (most recent call last):", '  File "app.py", line 9, in <module>', "KeyError: 'x'"]
    for i, line in enumerate(chained):
        w.line("stderr", line)
        if i == 2:
            w.line("stdout", "interleaved stdout line")
    w.flush()  # what the pump does after a quiet moment
    recs = lines_of(tmp_path / "app.jsonl")
    assert [r["msg"] for r in recs] == ["interleaved stdout line", "\n".join(chained)]
    assert recs[1]["level"] == "error"


def test_rotation_keeps_a_few_files_and_reader_spans_them(tmp_path):
    w = LogWriter(tmp_path, "svc", max_bytes=2000, keep=2)
    for i in range(100):
        w.line("stdout", f"line {i:03d} " + "x" * 40)
    w.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["svc.jsonl", "svc.jsonl.1", "svc.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    msgs = [r["msg"][:8] for r in read_records(tmp_path)]
    assert msgs == sorted(msgs) and msgs[-1] == "line 099" and len(msgs) < 100  # oldest rotated away
    assert [r["msg"][:8] for r in read_records(tmp_path, tail=3)] == ["line 097", "line 098", "line 099"]


def _write(path, records):
    with open(path, "w") as f:
        for ts, level, msg in records:
            f.write(json.dumps({"ts": ts, "service": path.stem, "stream": "stdout", "level": level,
                                "msg": msg}, ensure_ascii=False) + "\n")


def test_reader_filters_and_merges_services_in_time_order(tmp_path):
    _write(tmp_path / "web.jsonl", [
        ("2026-01-01T10:00:00.000Z", "info", "GET / 200"),
        ("2026-01-01T10:00:02.000Z", "error", 'db "timeout" \\ here'),
        ("2026-01-01T10:00:04.000Z", "warning", "slow GET /items"),
    ])
    _write(tmp_path / "worker.jsonl", [
        ("2026-01-01T10:00:01.000Z", "debug", "tick"),
        ("2026-01-01T10:00:03.000Z", "critical", "worker died: ünïcode"),
    ])
    ts = lambda recs: [r["ts"][17:19] for r in recs]
    assert ts(read_records(tmp_path)) == ["00", "01", "02", "03", "04"]
    assert ts(read_records(tmp_path, services=["worker"])) == ["01", "03"]
    assert ts(read_records(tmp_path, min_level="warning")) == ["02", "03", "04"]
    assert ts(read_records(tmp_path, min_level="ERROR")) == ["02", "03"]
    assert ts(read_records(tmp_path, grep="GET")) == ["00", "04"]
    assert ts(read_records(tmp_path, grep=r'"timeout" \\')) == ["02"]  # escapes in the raw line
    assert ts(read_records(tmp_path, grep="^slow")) == ["04"]  # anchored: on the message, not the line
    assert ts(read_records(tmp_path, grep="ünï")) == ["03"]
    assert ts(read_records(tmp_path, grep="service")) == []  # keys of the record are not the message
    assert ts(read_records(tmp_path, since="2026-01-01T10:00:02.000Z", until="2026-01-01T10:00:03.500Z")) == \
        ["02", "03"]
    assert ts(read_records(tmp_path, tail=2)) == ["03", "04"]
    assert ts(read_records(tmp_path, tail=2, grep="GET|tick")) == ["01", "04"]
    assert ts(read_records(tmp_path, tail=10, since="2026-01-01T10:00:03.000Z")) == ["03", "04"]
    with pytest.raises(UsageError):
        read_records(tmp_path, grep="(")
    with pytest.raises(UsageError):
        read_records(tmp_path, min_level="loud")


def test_parse_time():
    assert parse_time("5m", now=1_700_000_300.0) == "2023-11-14T22:13:20.000Z"
    assert parse_time("2026-01-01T10:00:00Z") == "2026-01-01T10:00:00.000Z"
    assert parse_time("2026-01-01T12:00:00+02:00") == "2026-01-01T10:00:00.000Z"
    with pytest.raises(UsageError):
        parse_time("yesterday-ish")


@pytest.mark.serial  # a time limit
def test_tail_of_a_200_mb_log_is_fast(tmp_path):
    """The last 100 matching records of a 200 MB log in well under a second (read from the end)."""
    path = tmp_path / "web.jsonl"
    lines = []
    for i in range(5000):
        level = "error" if i % 500 == 7 else "info"
        lines.append(json.dumps({"ts": "TS", "service": "web", "stream": "stdout", "level": level,
                                 "msg": f"GET /api/items/{i} 200 in {i % 50}ms user=u{i % 1000}"}))
    block = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        n = 0
        while f.tell() < 200 * 1024 * 1024:
            f.write(block.replace('"TS"', f'"2026-01-01T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}.000Z"'))
            n += 1
    for kwargs in ({"tail": 100}, {"tail": 100, "grep": "items/4"}, {"tail": 100, "min_level": "error"}):
        t0 = time.perf_counter()
        recs = read_records(tmp_path, **kwargs)
        took = time.perf_counter() - t0
        assert len(recs) == 100, kwargs
        assert took < 1.0, (kwargs, took)
    assert all(r["level"] == "error" for r in read_records(tmp_path, tail=100, min_level="error"))


def test_run_logged_captures_redacts_and_times_out(tmp_path):
    code = "import sys; print('hello s3cr3t-value'); print('oops', file=sys.stderr); sys.exit(3)"
    rc, last = run_logged(f"{sys.executable} -c \"{code}\"", tmp_path, {"PATH": "/usr/bin:/bin"}, tmp_path / "logs",
                          "setup", Redactor(["s3cr3t-value"]), timeout=30)
    assert rc == 3
    assert sorted(last) == ["hello ***", "oops"]
    recs = read_records(tmp_path / "logs", services=["setup"])
    assert {(r["stream"], r["msg"]) for r in recs} == {("stdout", "hello ***"), ("stderr", "oops")}
    t0 = time.perf_counter()
    rc, last = run_logged("echo started; sleep 30", tmp_path, {"PATH": "/usr/bin:/bin"}, tmp_path / "logs", "slow",
                          timeout=0.5)
    assert rc == 124 and time.perf_counter() - t0 < 5
    assert last[0] == "started" and "timed out" in last[-1]


def test_follow_sees_records_written_after_it_started(tmp_path):
    w = LogWriter(tmp_path, "web")
    w.line("stdout", "old line")
    stop = threading.Event()
    stream = follow(tmp_path, poll=0.02, stop=stop.is_set)

    def later():
        time.sleep(0.2)
        w.line("stdout", "new line")
        LogWriter(tmp_path, "worker").line("stdout", "a service that appeared later")

    threading.Thread(target=later, daemon=True).start()
    got = []
    deadline = time.time() + 10
    for rec in stream:
        got.append(rec["msg"])
        if len(got) == 2 or time.time() > deadline:
            stop.set()
    assert got == ["new line", "a service that appeared later"]


def test_tail_agrees_with_a_full_read_across_block_edges_and_rotation(tmp_path, monkeypatch):
    import random

    import worktreebox.telemetry.logs.reader as L

    rng = random.Random(7)
    a, b = LogWriter(tmp_path, "a", max_bytes=5000, keep=3), LogWriter(tmp_path, "b")
    for i in range(600):
        (a if rng.random() < 0.6 else b).line("stdout", rng.choice(
            ["ERROR x", "INFO y", 'quote " z', "back \\ slash", "ünïcode"]) + f" {i}")
    a.close()
    b.close()
    original = L._blocks_backward
    for block in (7, 100, 1 << 20):  # tiny blocks put every line across a block edge
        monkeypatch.setattr(L, "_blocks_backward", lambda p, block=block: original(p, block))
        for kw in ({}, {"grep": "ERROR"}, {"min_level": "error"}, {"grep": "quote"}, {"grep": r"\\"},
                   {"services": ["a"]}):
            full = [r["msg"] for r in read_records(tmp_path, **kw)]
            assert full
            for n in (1, 5, 50, 1000):
                assert [r["msg"] for r in read_records(tmp_path, tail=n, **kw)] == full[-n:], (block, kw, n)


@pytest.mark.parametrize(("line", "level"), [
    ("\x1b[33mWARNING:\x1b[0m disk almost full", "warning"),
    ("\x1b[1;31mERROR\x1b[0m boom", "error"),
    ("\x1b[2m2024-01-02 03:04:05\x1b[0m \x1b[33mWARN\x1b[0m slow", "warning"),
])
def test_a_coloured_level_is_its_level(line, level):
    """Defect 5: ANSI-coloured `WARNING:` lines were classed info."""
    assert parse_level(line) == level


def test_logs_never_hand_a_services_control_bytes_to_the_terminal(capsys):
    """Defect 5: `wtbox logs` passed raw escape bytes (0x1b) from services to the reader's terminal."""
    from worktreebox.cli.commands.logs import _printer

    for colour in (False, True):
        _printer(False, colour, 6)({"ts": "2026-01-02T03:04:05.678Z", "service": "web", "stream": "stdout",
                                    "level": "info", "msg": "\x1b[2J\x1b]0;owned\x07red \x1b[31mtext\x1b[0m\rbell\x07"})
        out = capsys.readouterr().out
        body = out.split("| ", 1)[1].removeprefix("\x1b[0m")  # the end of our own colour of the prefix
        assert "\x1b" not in body and "\x07" not in body and "\r" not in body and "red text" in body
    _printer(True, False, 6)({"msg": "\x1b[31mraw\x1b[0m"})  # --json keeps the bytes, JSON-escaped
    assert "\\u001b[31mraw" in capsys.readouterr().out
