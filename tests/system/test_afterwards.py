"""Work a command asks for as it ends (system/afterwards.py): after a served command's reply, else on a
thread that the asking block waits for."""
from __future__ import annotations

import threading

from worktreebox.system import afterwards


def test_outside_a_served_command_the_work_runs_beside_the_block_and_the_block_waits_for_it(monkeypatch):
    monkeypatch.setattr(afterwards, "_served", afterwards._Served())
    began, may_end, done = threading.Event(), threading.Event(), []

    def work() -> None:
        began.set()
        may_end.wait(5)
        done.append(threading.current_thread().name)

    with afterwards.beside(work):
        assert began.wait(5)  # begun at once, on a thread of its own, while the block runs
        assert done == []
        may_end.set()
    assert done == ["wtbox-afterwards"]  # and the block ended only once it was done


def test_in_a_served_command_the_work_waits_for_the_reply(monkeypatch):
    monkeypatch.setattr(afterwards, "_served", afterwards._Served())
    afterwards.serving()
    done = []
    with afterwards.beside(lambda: done.append("first")):
        pass
    with afterwards.beside(lambda: done.append("second")):
        pass
    assert done == []  # the command goes on, and answers, without it
    afterwards.run_after_reply()
    assert done == ["first", "second"]
    afterwards.run_after_reply()
    assert done == ["first", "second"]  # each once
