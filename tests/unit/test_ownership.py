"""The ownership rule's pieces, on this process itself: tokens, the never-signal set, lock
proof through /proc/locks, and when a process group may be signalled as a whole."""

from __future__ import annotations

import fcntl
import os

import pytest

from vllm_supervisor.host import ownership, takeover
from vllm_supervisor.host.procinfo import ProcId
from vllm_supervisor.host.proctree import read_proc

ME = read_proc(os.getpid(), cmdline=False)


def test_a_token_names_its_supervisor_and_is_not_guessable():
    a, b = ownership.new_token(ProcId(42, 7)), ownership.new_token(ProcId(42, 7))
    assert a != b and ownership.token_supervisor(a) == ProcId(42, 7)


@pytest.mark.parametrize("bad", ["", "x", "1:2", "a:2:c", "1:b:c", "1:2:3:4", "-1:2:c"])
def test_a_malformed_token_names_nobody(bad):
    assert ownership.token_supervisor(bad) is None


def test_pid_1_the_caller_and_its_ancestors_are_never_signalled():
    protected = ownership.protected_pids()
    assert {1, os.getpid(), os.getppid()} <= protected
    assert ownership.refusal(read_proc(1, cmdline=False), protected) is not None
    assert ownership.refusal(ME, protected) is not None
    assert ownership.refusal(ME, frozenset()) is None  # ours, when not protected


def test_the_kernel_shows_who_holds_an_instance_lock(tmp_path):
    path = tmp_path / "x.lock"
    with open(path, "w") as f:
        assert ownership.lock_holders(str(path)) == set()
        fcntl.flock(f, fcntl.LOCK_EX)
        assert ownership.lock_holders(str(path)) == {os.getpid()}
        fcntl.flock(f, fcntl.LOCK_UN)
        assert ownership.lock_holders(str(path)) == set()
    assert ownership.lock_holders(str(tmp_path / "missing.lock")) == set()


def test_a_group_is_trusted_only_while_its_leader_is_that_very_process():
    assert takeover.group_trusted(takeover.Target(ME.ident))
    assert not takeover.group_trusted(takeover.Target(ProcId(ME.pid, ME.start_ticks + 1)))
    assert not takeover.group_trusted(takeover.Target(None))


def test_a_target_never_includes_protected_processes():
    target = takeover.Target(None, frozenset({ME.ident, read_proc(1, cmdline=False).ident}))
    assert takeover.left_of_tree(target) == []


def test_no_such_process_has_no_token():
    assert ownership.environ_token(10**7) is None
