"""--restart: the policy, the backoff (1, 2, 4 ... 60 s) and a stop during it, with a fake
host and clock."""

from __future__ import annotations

import itertools
import signal

from fakehost import FakeClock, FakeHost
from lifecycle_kit import RecordingUi, kit

from vllm_supervisor.lifecycle.config import Config
from vllm_supervisor.lifecycle.restart import backoff, run_with_restarts, why_not_restart


def _cfg(**kw) -> Config:
    return Config(model="m", vllm_args=(), vllm_cmd=("vllm",), grace_s=5.0, **kw)


def _crashing_run(code=1):
    k = kit()
    k.host.exit_at(2.0, 100, code=code)
    return k.run()


def test_backoff_doubles_and_is_capped():
    assert [backoff(n) for n in (1, 2, 3, 4, 7, 8, 20)] == [1, 2, 4, 8, 60, 60, 60]


def test_on_failure_restarts_with_backoff_until_max_restarts():
    clock, ui = FakeClock(), RecordingUi()
    host = FakeHost(clock)
    runs = []

    def once():
        runs.append(clock.t)
        return _crashing_run()

    report = run_with_restarts(_cfg(restart="on-failure", max_restarts=3), once, ui, host, clock)
    assert len(runs) == 4 and [r["backoff_s"] for r in report.restarts] == [1, 2, 4]
    assert [round(b - a, 3) for a, b in itertools.pairwise(runs)] == [1, 2, 4]
    assert "--max-restarts 3 reached" in ui.text()


def test_a_stop_signal_during_the_backoff_ends_at_once():
    clock, ui = FakeClock(), RecordingUi()
    host = FakeHost(clock)
    host.send_supervisor(30.5, signal.SIGTERM)
    runs = []

    def once():
        runs.append(clock.t)
        return _crashing_run()

    run_with_restarts(_cfg(restart="always", max_restarts=10), once, ui, host, clock)
    # runs at +0, +1, +3, +7, +15 s; the fifth backoff (16 s) is cut at +30.5 s
    assert clock.t == 1030.5 and len(runs) == 5
    assert "during the restart backoff: stopping" in ui.text()


def test_no_restart_after_a_requested_stop_or_a_clean_exit_under_on_failure():
    k = kit()
    k.host.send_supervisor(2.0)
    requested = k.run()
    assert why_not_restart("always", requested, 0, 5) == "the stop was requested"
    clean = _crashing_run(code=0)
    assert "on-failure" in why_not_restart("on-failure", clean, 0, 5)
    assert why_not_restart("always", clean, 0, 5) is None


def test_no_restart_into_unreleased_vram_or_after_a_survivor():
    import dataclasses

    base = _crashing_run()
    for code in (5, 6):
        bad = dataclasses.replace(base, exit_code=code)
        assert why_not_restart("always", bad, 0, 5).startswith(f"exit {code}")


def test_a_port_still_held_after_the_backoff_ends_the_restarts():
    clock, ui = FakeClock(), RecordingUi()
    host = FakeHost(clock)
    host.port_busy = True
    runs = []

    def once():
        runs.append(clock.t)
        return _crashing_run()

    run_with_restarts(_cfg(restart="always"), once, ui, host, clock)
    assert len(runs) == 1 and "not restarting: port" in ui.text()
