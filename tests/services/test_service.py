"""Fast unit tests of the supervisor's restart and readiness logic.

A fake clock (waits advance it instead of sleeping) and a fake process factory stand in
for time and real processes; test_services.py runs the same supervisor with real ones.
Events are read back from the real events log the supervisor writes.
"""
from __future__ import annotations

import socket
import threading

import pytest

from worktreebox.services import control
from worktreebox.services.control import (
    EXITED,
    FAILED,
    READY,
    STOPPED,
    Request,
    Response,
    ServiceState,
    SupervisorState,
)
from worktreebox.services.spec import ServiceSpec, SupervisorPayload
from worktreebox.services.supervisor import BACKOFF_CAP, Clock, Supervisor
from worktreebox.telemetry.logs.reader import read_records


class FakeClock(Clock):
    def __init__(self) -> None:
        self.t = 1000.0
        self._lock = threading.Lock()

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        self.advance(timeout)
        return event.is_set()

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)


class FakeProcess:
    """Runs for `runs_for` seconds of the fake clock, then exits with `code`."""

    stdout = stderr = None

    def __init__(self, clock: FakeClock, pid: int, code: int, runs_for: float) -> None:
        self.clock, self.pid, self.code = clock, pid, code
        self.ends_at = clock.now() + runs_for

    def poll(self) -> int | None:
        return self.code if self.clock.now() >= self.ends_at else None

    def wait(self, timeout: float | None = None) -> int:
        if self.clock.now() < self.ends_at:
            self.clock.advance(self.ends_at - self.clock.now())
        return self.code


class FakeProcesses:
    """Starts the scripted runs in order; at the `stop_after`-th start it asks the service to stop
    afterwards (as `down` would), so a restart loop ends after that run."""

    def __init__(self, clock: FakeClock, runs: list[tuple[int, float]], stop_after: int) -> None:
        self.clock, self.runs, self.stop_after = clock, runs, stop_after
        self.started: list[FakeProcess] = []
        self.stopped: list[FakeProcess] = []
        self.sup: Supervisor | None = None

    def start(self, cmd: str, cwd: str, env: dict[str, str], leaf: str | None = None) -> FakeProcess:
        n = len(self.started)
        code, runs_for = self.runs[min(n, len(self.runs) - 1)]
        # Pids far above any pid_max: nothing real can ever be signalled through them.
        proc = FakeProcess(self.clock, 10**9 + n, code, runs_for)
        self.started.append(proc)
        if len(self.started) >= self.stop_after:
            for svc in self.sup.services.values():
                svc.wanted = False
        return proc

    def stop(self, processes, wait: float, leaves=()) -> None:
        self.stopped.extend(processes)


def make(tmp_path, runs, stop_after, check=None, **spec):
    clock = FakeClock()
    fake = FakeProcesses(clock, runs, stop_after)
    payload = SupervisorPayload(services=[ServiceSpec(name="app", cmd="serve", **spec)], workdir=str(tmp_path))
    sup = Supervisor(tmp_path, "app-0123abcd", payload, clock=clock, processes=fake, check=check)
    fake.sup = sup
    return sup, fake, sup.services["app"]


def run_life(svc) -> None:
    """The service's life in this thread (what Service.up starts in a thread of its own)."""
    svc.wanted = True
    svc._run()


def events(sup, kind: str) -> list[dict]:
    return [r for r in read_records(sup.logs_dir, services=["app"]) if r.get("event") == kind]


def test_backoff_doubles_up_to_the_cap(tmp_path):
    sup, fake, svc = make(tmp_path, runs=[(1, 0.0)], stop_after=10, restart="on-failure")
    run_life(svc)
    delays = [e["delay"] for e in events(sup, "restart")]
    assert delays == [0.5, 1, 2, 4, 8, 16, BACKOFF_CAP, BACKOFF_CAP, BACKOFF_CAP]
    assert svc.restarts == 9 and len(fake.started) == 10
    assert svc.state == STOPPED  # asked to stop, not failed


def test_backoff_starts_over_after_a_stable_run(tmp_path):
    # Three quick crashes, one run that stays up 31 s (ready after the no-check grace), then crashes again.
    runs = [(1, 0.0), (1, 0.0), (1, 0.0), (1, 31.0), (1, 0.0)]
    sup, _fake, svc = make(tmp_path, runs=runs, stop_after=6)
    run_life(svc)
    assert [e["delay"] for e in events(sup, "restart")] == [0.5, 1, 2, 0.5, 1]
    assert len(events(sup, "ready")) == 1


def test_a_run_shorter_than_stable_keeps_the_backoff_growing(tmp_path):
    runs = [(1, 0.0), (1, 0.0), (1, 20.0), (1, 0.0)]
    sup, _fake, svc = make(tmp_path, runs=runs, stop_after=5)
    run_life(svc)
    assert [e["delay"] for e in events(sup, "restart")] == [0.5, 1, 2, 4]


def test_ready_timeout_marks_the_service_failed(tmp_path):
    calls = []

    def never_ready(check, svc, timeout):
        calls.append(sup.clock.now())
        return False

    sup, _fake, svc = make(tmp_path, runs=[(0, 5.0)], stop_after=99, check=never_ready, ready="tcp:1",
                          ready_timeout=2, restart="no")
    run_life(svc)
    assert calls, "the ready check was never asked"
    assert svc.ready_at is None and svc.error == "not ready after 2s"
    assert [e["msg"] for e in events(sup, "unready")] == ["app not ready after 2s"]
    state = svc.info()
    assert state.state == EXITED and state.failed and not state.done  # what `wait_ready` reports as a failure


def test_restarts_do_not_buy_more_ready_time(tmp_path):
    _sup, _fake, svc = make(tmp_path, runs=[(1, 1.0)], stop_after=4, check=lambda c, s, t: False, ready="tcp:1",
                          ready_timeout=2.5, restart="always")
    run_life(svc)
    assert svc.error is not None and svc.error.startswith("not ready after 2.5s")
    assert svc.info().failed


def test_ready_check_passing_makes_the_service_ready(tmp_path):
    answers = iter([False, False, True])
    sup, _fake, svc = make(tmp_path, runs=[(0, 10.0)], stop_after=99, check=lambda c, s, t: next(answers),
                          ready="tcp:1", restart="no")
    run_life(svc)
    ready = events(sup, "ready")
    assert len(ready) == 1 and ready[0]["ready_seconds"] > 0 and svc.error is None
    assert svc.info().done  # a one-shot that became ready and exited cleanly


@pytest.mark.parametrize("policy, code, restarts", [
    ("no", 0, False), ("no", 1, False),
    ("on-failure", 0, False), ("on-failure", 1, True),
    ("always", 0, True), ("always", 1, True),
])
def test_restart_policy(tmp_path, policy, code, restarts):
    _sup, fake, svc = make(tmp_path, runs=[(code, 0.0)], stop_after=2, restart=policy)
    run_life(svc)
    assert len(fake.started) == (2 if restarts else 1)
    assert svc.restarts == (1 if restarts else 0)
    if not restarts:
        assert svc.state == (EXITED if code == 0 else FAILED)
        assert svc.error == (None if code == 0 else f"exited with code {code}")


def test_stop_all_stops_every_group_once_and_nothing_restarts(tmp_path):
    sup, fake, svc = make(tmp_path, runs=[(0, 1e9)], stop_after=99)
    run_life_thread = threading.Thread(target=run_life, args=(svc,), daemon=True)
    run_life_thread.start()
    while not fake.started:
        pass
    sup.stop_all()
    assert fake.stopped == fake.started[:1]
    assert svc.state == STOPPED and sup.stopping


def test_handle_names_the_services_when_one_is_unknown(tmp_path):
    sup, _fake, _svc = make(tmp_path, runs=[(0, 0.0)], stop_after=99)
    resp = sup.handle(Request("up", "nope"))
    assert not resp.ok and resp.error == "the box has no service 'nope'; it has: app"
    assert sup.handle(Request("dance")).error == "unknown command 'dance'"
    assert sup.handle(Request.from_json(["not", "an", "object"])).ok is False


def test_control_messages_round_trip_over_a_socket(tmp_path):
    a, b = socket.socketpair()
    with a, b:
        control.write_message(a, Request("restart", "web"))
        assert control.read_request(b) == Request("restart", "web")
        resp = Response(ok=True, services={"web": ServiceState(state=READY, pid=7, restarts=2)})
        control.write_message(b, resp)
        assert control.read_response(a) == resp


def test_state_file_round_trip(tmp_path):
    state = SupervisorState(box_id="x-0123abcd", pid=5, services={"web": ServiceState(state=READY, ready_at=1.0)})
    control.write_state(tmp_path, state)
    assert control.read_state(tmp_path) == state
    (tmp_path / control.STATE_FILE).write_text("{half")
    assert control.read_state(tmp_path) is None


def test_service_spec_from_the_wire_ignores_unknown_keys():
    spec = ServiceSpec.from_json({"name": "web", "cmd": "serve", "colour": "red", "restart": None, "env": None})
    assert spec == ServiceSpec(name="web", cmd="serve")
    assert ServiceSpec.from_json(spec.to_json()) == spec


def test_exits_in_a_row_before_ready_are_an_error_naming_the_code_and_ready_clears_it(tmp_path):
    runs = [(3, 0.0), (3, 0.0), (3, 0.0), (3, 0.0), (0, 40.0)]
    sup, _, svc = make(tmp_path, runs=runs, stop_after=99, ready="tcp:1", ready_timeout=3600,
                       check=lambda c, s, t: s.proc.pid == 10**9 + 4)
    run_life(svc)
    # what new/up see at once (no 60 s wait): the error with the exit code
    said = "app exited with code 3 before it was ready, 3 times in a row"
    assert [e["msg"] for e in events(sup, "unready_exits")] == [said]
    assert svc.restarts == 4 and len(events(sup, "ready")) == 1 and svc.error is None  # it came up after all
