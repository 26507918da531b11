"""The stop sequence without a live supervisor: what the death guard runs when the
supervisor died, and what `stop` and `cleanup` run from an instance record.

Which processes it may touch follows the ownership rule (host/ownership.py): a process
counts only with proof (an identity the supervisor saw, or the instance token in its
environment) and never when it is PID 1, the caller or an ancestor of the caller, or
another user's. A process group is signalled as a whole only while its leader is still
the very process that was launched: once the leader is gone its PID, and with it the
group id, may belong to somebody else.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass, field

from vllm_supervisor.host import identity, ownership
from vllm_supervisor.host.procinfo import ProcId
from vllm_supervisor.host.proctree import read_proc, signal_group

POLL_S = 0.05
KILL_POLL_S = 0.02


@dataclass(frozen=True)
class Target:
    """A tree to stop, as far as it can be proven ours."""

    leader: ProcId | None  # the launched vLLM process (its pid is the group and session id)
    tracked: frozenset[ProcId] = frozenset()  # identities seen in the tree
    token_owner: ProcId | None = None  # processes whose token names this supervisor count
    all_users: bool = False
    protected: frozenset[int] = field(default_factory=ownership.protected_pids)


def group_trusted(target: Target) -> bool:
    """Whether the leader's group (and session) id still means our tree: only while the
    leader itself is that very, live process."""
    return target.leader is not None and identity.alive(target.leader) is not None


def left_of_tree(target: Target) -> list[ProcId]:
    """What is still alive of the tree, with proof: tracked identities, processes carrying
    the instance token, and (while the leader lives) members of its group or session."""
    found: dict[ProcId, None] = {}
    for ident in target.tracked:
        if identity.alive(ident) is not None:
            found[ident] = None
    grouped = group_trusted(target)
    lead = target.leader.pid if target.leader else 0
    if target.token_owner is not None or grouped:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            info = read_proc(int(name), cmdline=False)
            if info is None or info.state == "Z" or info.ident in found:
                continue
            if (grouped and lead in (info.pgid, info.sid)) or _carries(info.pid, target,
                                                                   info.start_ticks):
                found[info.ident] = None
    return [i for i in found if _may_signal(i, target)]


def _carries(pid: int, target: Target, start_ticks: int) -> bool:
    # A process older than the supervisor cannot carry its token: skip reading its environ.
    if target.token_owner is None or start_ticks < target.token_owner.start_ticks:
        return False
    return ownership.carries_token(pid, target.token_owner)


def _may_signal(ident: ProcId, target: Target) -> bool:
    info = identity.alive(ident)
    return info is not None and ownership.refusal(info, target.protected,
                                                  target.all_users) is None


def finish_stop(target: Target, grace_s: float, kill_s: float,
                term: int | None = None) -> bool:
    """Grace for vLLM's own shutdown (with TERM: that pid, or every process when it is
    gone, gets SIGTERM here first), then SIGKILL of everything left, until nothing is left
    or KILL_S is over. True when nothing is left."""
    if term is not None:
        left = left_of_tree(target)
        main = [i for i in left if i.pid == term]
        for ident in main or left:
            identity.signal_process(ident, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and left_of_tree(target):
        time.sleep(POLL_S)
    deadline = time.monotonic() + kill_s
    while time.monotonic() < deadline:
        left = left_of_tree(target)
        if not left:
            return True
        if group_trusted(target):
            signal_group(target.leader.pid, signal.SIGKILL)
        for ident in left:
            identity.signal_process(ident, signal.SIGKILL)
        time.sleep(KILL_POLL_S)
    return not left_of_tree(target)


def remove_files(files: list[str]) -> None:
    """The tree is gone: remove what it left in its private TMPDIR and /dev/shm (paths the
    supervisor itself made or attributed, never paths read from a file)."""
    for path in files:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
