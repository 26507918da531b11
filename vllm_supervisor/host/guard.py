"""The death guard: a forked sentinel that finishes the stop if the supervisor is killed.

A parent-death signal reaches only the API server, and real vLLM ignores SIGTERM while it
starts; its engine does not watch its parent at all. So a tiny process forked before launch
holds the read end of a pipe. It leaves the supervisor's process group and session at once
(setsid), so that what kills the supervisor's group (`kill -9 -PGID`, `timeout -k`,
supervisord's killasgroup, a CI runner) does not kill the guard with it. The supervisor
tells it the tree (leader identity, instance token) and every process it tracks; the guard
also walks the supervisor's descendants itself every WATCH_S, so a process forked just
before the supervisor dies is known too. On EOF without a "done" line (the supervisor
died) it waits the grace in force, then SIGKILLs what it can prove is the tree
(host/takeover.py) until none is left, and removes the tree's leftover files.
"""

from __future__ import annotations

import os
import select
import time

from vllm_supervisor.host import identity, takeover
from vllm_supervisor.host.procinfo import ProcId
from vllm_supervisor.host.proctree import descendants, read_proc

WATCH_S = 0.25  # how soon the guard knows of a new process of the tree


class DeathGuard:
    """The supervisor's side of the guard."""

    def __init__(self, grace_s: float, kill_wait_s: float):
        self.grace_s = grace_s
        self.kill_wait_s = kill_wait_s
        self.pid: int | None = None
        self._w: int | None = None
        self._sent: set[ProcId] = set()
        self._sent_paths: set[str] = set()

    def start(self) -> int:
        """Fork the guard (call before any thread starts); return its pid."""
        r, w = os.pipe()
        parent = read_proc(os.getpid(), cmdline=False).ident
        pid = os.fork()
        if pid == 0:  # the guard
            os.close(w)
            code = 0
            try:
                os.setsid()  # out of the supervisor's group and session
                _close_sockets()
                _guard_main(r, parent, self.grace_s, self.kill_wait_s)
            except BaseException:  # noqa: BLE001 - a guard must never raise into a fork
                code = 1
            os._exit(code)
        os.close(r)
        self.pid, self._w = pid, w
        return pid

    def _send(self, line: str) -> None:
        if self._w is None:
            return
        try:
            os.write(self._w, line.encode())
        except OSError:
            self._w = None  # the guard is gone; nothing more to tell it

    def tell_tree(self, leader: ProcId, token: str) -> None:
        """The launched process (its pid is the group and session id) and the token."""
        self._send(f"tree {leader.pid} {leader.start_ticks} {token}\n")

    def track(self, idents) -> None:
        """Processes of the tree not yet told (new ones only)."""
        for i in idents:
            if i not in self._sent:
                self._sent.add(i)
                self._send(f"track {i.pid} {i.start_ticks}\n")

    def grace(self, seconds: float) -> None:
        """The grace of the stop now under way (a `stop --grace` may differ from ours)."""
        self._send(f"grace {seconds!r}\n")

    def leftovers(self, tmpdir, shm_paths) -> None:
        """Files to remove once the tree is gone, should the guard have to finish the stop."""
        if tmpdir is not None:
            self._send(f"tmp {tmpdir}\n")
        for p in shm_paths:
            if p not in self._sent_paths:
                self._sent_paths.add(p)
                self._send(f"shm {p}\n")

    def done(self) -> None:
        """The supervisor finished its own stop: the guard exits without acting."""
        self._send("done\n")
        self.close()

    def close(self) -> None:
        """Close the pipe without 'done' (the stop is not complete): the guard takes over."""
        if self._w is not None:
            os.close(self._w)
            self._w = None


class _Orders:
    """What the guard has been told."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.leader: ProcId | None = None
        self.token_owner: ProcId | None = None
        self.tracked: set[ProcId] = set()
        self.files: list[str] = []
        self.done = False

    def take(self, line: bytes) -> None:
        """One order line."""
        word, _, rest = line.decode(errors="replace").partition(" ")
        args = rest.split()
        if word == "done":
            self.done = True
        elif word == "tree":
            from vllm_supervisor.host.ownership import token_supervisor

            self.leader = ProcId(int(args[0]), int(args[1]))
            self.token_owner = token_supervisor(args[2]) or self.token_owner
        elif word == "track":
            self.tracked.add(ProcId(int(args[0]), int(args[1])))
        elif word == "grace":
            self.grace_s = float(args[0])
        elif word in ("tmp", "shm"):
            self.files.append(rest)


def _close_sockets() -> None:
    """Close the sockets the fork copied: a listening one (the metrics endpoint) held by a
    guard that outlives the supervisor would keep the port taken, and its clients waiting
    on a server that never answers. Lock files and the order pipe are kept."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                os.close(int(name))
        except OSError:
            continue  # the listing's own fd, gone by now


def _guard_main(r: int, supervisor: ProcId, grace_s: float, kill_wait_s: float) -> None:
    """Read orders until EOF; act only if the supervisor died without saying 'done'."""
    try:
        from setproctitle import setproctitle

        setproctitle("vllm-supervise: death guard")
    except ImportError:
        pass
    orders, buf, me = _Orders(grace_s), b"", os.getpid()
    orders.token_owner = supervisor  # tokens name the supervisor: known before any order
    next_walk = time.monotonic() + WATCH_S
    while not orders.done:
        readable, _, _ = select.select([r], [], [], max(0.0, next_walk - time.monotonic()))
        if time.monotonic() >= next_walk:  # on time, however busy the pipe is
            next_walk += WATCH_S
            if identity.alive(supervisor) is not None:  # never a reused PID's children
                orders.tracked.update(i.ident for i in descendants(supervisor.pid, (me,),
                                                                    cmdline=False))
        if not readable:
            continue
        chunk = os.read(r, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            orders.take(line)
    if orders.done:
        return
    target = takeover.Target(orders.leader, frozenset(orders.tracked), orders.token_owner)
    if takeover.finish_stop(target, orders.grace_s, kill_wait_s):
        takeover.remove_files(orders.files)
