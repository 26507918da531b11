"""Finding vLLM trees that nobody supervises, exactly.

A process starts a tree when the kernel shows it is vLLM: a VLLM::* process title, vLLM's
real server entry point (host/ownership.is_vllm_server: not words in a command line), or
an instance token whose supervisor is dead. It is supervised - and left alone, however its
supervisor was started or renamed - when its own token names a live supervisor, or when
one of its ancestors is a live supervisor: one
named by the token of a live tree process, or by a record whose supervisor the kernel
shows holding the instance lock. (Ancestry, not the token alone: vLLM's titled processes,
VLLM::EngineCore and the workers, overwrite /proc/PID/environ when they set their title,
and a supervisor is a subreaper, so its whole tree stays below it.) A tree is its topmost
such process and that process's descendants: never the shell that started it, nor other
members of its session or group.
"""

from __future__ import annotations

import os

from vllm_supervisor.host import identity, ownership, takeover
from vllm_supervisor.host.procinfo import ProcId, ProcInfo
from vllm_supervisor.host.proctree import read_proc
from vllm_supervisor.instances.ops import Tree


def find_orphans(all_users: bool, claimed: set[int] | None = None,
                 supervisors: set[ProcId] | None = None) -> list[Tree]:
    """Unsupervised vLLM trees, CLAIMED pids (trees found from records) left out;
    SUPERVISORS are live supervisors known from records (with lock proof)."""
    claimed = claimed or set()
    procs = _processes()
    protected = ownership.protected_pids()
    tokens = {pid: t for pid in procs if (t := _token(pid)) is not None}
    live = set(supervisors or ()) | {o for t in tokens.values()
                                     if (o := ownership.token_supervisor(t))
                                     and identity.alive(o) is not None}
    supervised = {pid for pid, t in tokens.items() if ownership.token_supervisor(t) in live}
    starts = {pid for pid, info in procs.items()
              if pid not in claimed and pid not in protected and pid not in supervised
              and _starts_tree(info, tokens.get(pid), all_users)
              and not _under(info, procs, live)}
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    trees = []
    for root in sorted(p for p in starts if procs[p].ppid not in starts):
        members = [procs[p] for p in _subtree(root, children)
                   if p not in claimed and p not in supervised]
        members = [m for m in members
                   if ownership.refusal(m, protected, all_users) is None]
        if members:
            target = takeover.Target(None, frozenset(m.ident for m in members),
                                     all_users=all_users, protected=protected)
            label = f"unsupervised vLLM tree under pid {root} ({procs[root].title[:40]})"
            trees.append(Tree(label, sorted(members, key=lambda p: p.pid), target,
                              main=root))
    return trees


def _processes() -> dict[int, ProcInfo]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = read_proc(int(name))
            if info is not None and info.state != "Z":
                out[info.pid] = info
    return out


def _token(pid: int) -> str | None:
    token = ownership.environ_token(pid)
    return token if token not in (None, ownership.UNREADABLE) else None


def _starts_tree(info: ProcInfo, token: str | None, all_users: bool) -> bool:
    """Whether INFO is a vLLM process (whoever supervises it: see _under)."""
    if not all_users and ownership.uid_of(info.pid) != os.geteuid():
        return False  # another user's: not ours to judge, let alone stop
    return token is not None or ownership.carries_title(info) \
        or ownership.is_vllm_server(info.pid)


def _under(info: ProcInfo, procs: dict[int, ProcInfo], live: set[ProcId]) -> bool:
    """Whether a live supervisor is among INFO's ancestors."""
    seen = set()
    while info is not None and info.pid not in seen:
        if info.ident in live:
            return True
        seen.add(info.pid)
        info = procs.get(info.ppid)
    return False


def _subtree(root: int, children: dict[int, list[int]]) -> list[int]:
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out
