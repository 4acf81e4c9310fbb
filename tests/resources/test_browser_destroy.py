"""Removing a box looks for its Chromium only when one was ever started: a sandboxed box has an
(empty) browser/ dir from its start (bound into its sandbox), and rm --all of 300 boxes spent
two scans of every process per box looking for a Chromium none of them had."""
from __future__ import annotations

import types

from worktreebox.resources.browser import Browser
from worktreebox.telemetry import browser as chromium


def _box(tmp_path):
    d = tmp_path / "boxes" / "b-0000cafe"
    (d / "run").mkdir(parents=True)
    return types.SimpleNamespace(id="b-0000cafe", dir=d, run_dir=d / "run")


def test_an_empty_browser_dir_is_no_reason_to_look_for_chromium(tmp_path, monkeypatch):
    stopped = []
    monkeypatch.setattr(chromium, "stop", lambda box_id, box_dir, wait=None: stopped.append(box_id) or [])
    box = _box(tmp_path)
    chromium.browser_dir(box.dir).mkdir()  # as the sandbox makes it
    Browser().destroy(None, box)
    assert stopped == []
    assert not chromium.browser_dir(box.dir).exists()


def test_a_started_chromium_is_stopped(tmp_path, monkeypatch):
    stopped = []
    monkeypatch.setattr(chromium, "stop", lambda box_id, box_dir, wait=None: stopped.append(box_id) or [])
    box = _box(tmp_path)
    chromium.profile_dir(box.dir).mkdir(parents=True)  # made right before Chromium starts
    Browser().destroy(None, box)
    assert stopped == [box.id]
    box2 = _box(tmp_path / "other")
    (box2.run_dir / chromium.PID_FILE).write_text("12345\n")
    Browser().destroy(None, box2)
    assert stopped == [box.id, box2.id]
