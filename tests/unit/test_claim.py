"""Exactly one supervisor per name: claim() takes the name's instance lock and the
Registry holds it for the supervisor's whole life, so two starts of one name, however
close, give one winner."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
from test_records import make_record

from vllm_supervisor.errors import ExitCode, SupervisorError
from vllm_supervisor.gpu.probe import NoGpuProbe
from vllm_supervisor.instances import commands
from vllm_supervisor.instances.records import write_record
from vllm_supervisor.instances.statedir import instance_lock_path, op_locked, try_lock


class _Cfg:
    model, health_port = "m", 8000


class _Ui:
    def event(self, msg: str, style: str = "") -> None:
        pass


def _claim(d: Path, name: str = "alpha"):
    return commands.claim(d, name, _Cfg(), False, NoGpuProbe("t"), _Ui())


def _held(d: Path, name: str = "alpha") -> bool:
    """Whether someone holds NAME's instance lock (a flock of our own, on another open
    file, conflicts with it even in this process)."""
    fd = try_lock(instance_lock_path(d, name))
    if fd is None:
        return True
    os.close(fd)
    return False


def _finish(reg, complete: bool = True) -> None:
    reg.finish({"exit_code": 0, "exit_meaning": "ok"}, "text", complete)


def test_a_second_claim_of_a_running_name_is_refused_in_one_line(tmp_path):
    first = _claim(tmp_path)
    (tmp_path / "bystander.json").write_text("not a record of ours to touch")
    with pytest.raises(SupervisorError) as e:
        _claim(tmp_path)
    assert e.value.exit_code == ExitCode.START_FAILED == 3
    assert e.value.message == "instance 'alpha' is already running"
    assert "\n" not in e.value.one_line()
    assert _held(tmp_path)  # the refused claim did not let the winner's lock go
    _finish(first)
    assert (tmp_path / "bystander.json").read_text() == "not a record of ours to touch"


def test_the_lock_is_held_for_the_supervisors_life_and_released_by_finish(tmp_path):
    reg = _claim(tmp_path)
    lock = instance_lock_path(tmp_path, "alpha")
    fd = reg._lock
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # vLLM never inherits it
    assert _held(tmp_path) and lock.exists()
    _finish(reg)
    assert not lock.exists() and not _held(tmp_path)
    _finish(_claim(tmp_path))  # the name is free again


def test_after_an_incomplete_stop_the_lock_file_stays_but_the_name_is_free(tmp_path):
    reg = _claim(tmp_path)
    _finish(reg, complete=False)
    assert instance_lock_path(tmp_path, "alpha").exists() and not _held(tmp_path)


def test_a_forked_death_guard_keeps_the_name_reserved_until_it_ends(tmp_path):
    reg = _claim(tmp_path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "guard": inherits the fd, waits until told, exits
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        _finish(reg, complete=False)  # the supervisor is done; its guard lives on
        assert _held(tmp_path)
    finally:
        os.close(w)
        os.waitpid(pid, 0)
    assert not _held(tmp_path)


def test_negative_control_a_lock_let_go_after_the_claim_admits_a_second_supervisor(
        tmp_path):
    """What the code did before: the name lock ended with the claim, so a second start
    of the same name went ahead."""
    first = _claim(tmp_path)
    os.close(first._lock)
    first._lock = None
    second = _claim(tmp_path)  # both "run": the bug holding the lock prevents
    _finish(second)


def test_stop_and_cleanup_take_turns_without_waiting_on_the_instance_lock(tmp_path):
    reg = _claim(tmp_path)
    done = threading.Event()

    def op():
        with op_locked(tmp_path, "alpha"):
            done.set()

    t = threading.Thread(target=op, daemon=True)
    t.start()
    assert done.wait(5), "an operation blocked on the live supervisor's lock"
    t.join(5)
    _finish(reg)


def test_a_claim_waits_for_a_running_operation_on_a_dead_predecessor(tmp_path):
    write_record(tmp_path, make_record(boot_id="another-boot"))  # stale: nothing left
    order = []
    with op_locked(tmp_path, "alpha"):
        t = threading.Thread(target=lambda: order.append(_claim(tmp_path)), daemon=True)
        t.start()
        t.join(0.3)  # a bound on how long the claim may run ahead, not a wait for it
        order.append("op done")
    t.join(5)
    assert order[0] == "op done" and len(order) == 2
    _finish(order[1])


def _contender(d: str, barrier: str, results) -> None:
    """One of several processes that claim the same name the moment BARRIER appears,
    report, and hold what they won until BARRIER goes."""
    while not os.path.exists(barrier):
        time.sleep(0.0005)
    try:
        reg = _claim(Path(d))
    except SupervisorError as e:
        results.put(("lost", e.exit_code, e.message))
        return
    results.put(("won", 0, ""))
    while os.path.exists(barrier):
        time.sleep(0.005)
    _finish(reg)


@pytest.mark.parametrize("contenders", [2, 8])
def test_processes_started_together_give_exactly_one_winner(tmp_path, contenders):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    barrier = tmp_path / "go"
    procs = [ctx.Process(target=_contender, args=(str(tmp_path), str(barrier), results))
             for _ in range(contenders)]
    for p in procs:
        p.start()
    try:
        barrier.touch()
        got = [results.get(timeout=30) for _ in procs]
    finally:
        barrier.unlink(missing_ok=True)
        for p in procs:
            p.join(30)
    assert sorted(g[0] for g in got) == ["lost"] * (contenders - 1) + ["won"]
    assert {g[1:] for g in got if g[0] == "lost"} == {
        (3, "instance 'alpha' is already running")}
    assert all(p.exitcode == 0 for p in procs)
    assert not _held(tmp_path)
