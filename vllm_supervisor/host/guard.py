"""The death guard: a forked sentinel that finishes the stop if the supervisor is SIGKILLed.

A parent-death signal reaches only the API server, and real vLLM ignores SIGTERM while it
starts; its engine does not watch its parent at all. So a tiny process forked before launch
holds the read end of a pipe. The supervisor tells it the group and every process it
tracks; on EOF without a "done" line (the supervisor died), the guard waits the grace,
then SIGKILLs the group, the session and every tracked process until none is left.
"""

from __future__ import annotations

import os
import signal
import time

from vllm_supervisor.host.proctree import read_proc, signal_group, signal_process
from vllm_supervisor.host.procinfo import ProcId


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
        pid = os.fork()
        if pid == 0:  # the guard
            os.close(w)
            code = 0
            try:
                _guard_main(r, self.grace_s, self.kill_wait_s)
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

    def tell_tree(self, pgid: int, sid: int) -> None:
        """The launched tree's process group and session."""
        self._send(f"tree {pgid} {sid}\n")

    def track(self, idents) -> None:
        """Processes of the tree not yet told (new ones only)."""
        new = [i for i in idents if i not in self._sent]
        for i in new:
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


def _guard_main(r: int, grace_s: float, kill_wait_s: float) -> None:
    """Read orders until EOF; act only if the supervisor died without saying 'done'."""
    try:
        from setproctitle import setproctitle

        setproctitle("vllm-supervise: death guard")
    except ImportError:
        pass
    pgid = sid = 0
    tracked: set[ProcId] = set()
    files: list[str] = []
    buf = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            word, *rest = line.decode().split()
            if word == "done":
                return
            if word == "tree":
                pgid, sid = int(rest[0]), int(rest[1])
            elif word == "track":
                tracked.add(ProcId(int(rest[0]), int(rest[1])))
            elif word == "grace":
                grace_s = float(rest[0])
            elif word in ("tmp", "shm"):
                files.append(line.decode().split(" ", 1)[1])
    if pgid and finish_stop(pgid, sid, tracked, grace_s, kill_wait_s):
        remove_files(files)


def remove_files(files: list[str]) -> None:
    """The tree is gone: remove what it left in its private TMPDIR and /dev/shm."""
    import shutil

    for path in files:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def left_of_tree(pgid: int, sid: int, tracked: set[ProcId]) -> list[ProcId]:
    """What is still alive of the tree: tracked processes, plus the group and session."""
    alive = []
    for ident in tracked:
        info = read_proc(ident.pid, cmdline=False)
        if info and info.start_ticks == ident.start_ticks and info.state != "Z":
            alive.append(ident)
    for name in os.listdir("/proc"):
        if name.isdigit() and (pgid > 0 or sid > 0):
            info = read_proc(int(name), cmdline=False)
            if info and info.state != "Z" and ((pgid > 0 and info.pgid == pgid)
                                                or (sid > 0 and info.sid == sid)):
                alive.append(info.ident)
    return alive


def finish_stop(pgid: int, sid: int, tracked: set[ProcId], grace_s: float,
                 kill_s: float, term: int | None = None) -> bool:
    """The stop the dead supervisor could not finish: grace for vLLM's own shutdown (the
    API server got its parent-death SIGTERM; with TERM, that pid gets SIGTERM here first,
    or every process when it is gone), then SIGKILL of everything left. True when nothing
    is left."""
    if term is not None:
        main = [i for i in left_of_tree(pgid, sid, tracked) if i.pid == term]
        for ident in main or left_of_tree(pgid, sid, tracked):
            signal_process(ident, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and left_of_tree(pgid, sid, tracked):
        time.sleep(0.05)
    deadline = time.monotonic() + kill_s
    while time.monotonic() < deadline:
        left = left_of_tree(pgid, sid, tracked)
        if not left:
            return True
        if pgid > 0:  # never killpg(0): that is our own group
            signal_group(pgid, signal.SIGKILL)
        for ident in left:
            signal_process(ident, signal.SIGKILL)
        time.sleep(0.02)
    return not left_of_tree(pgid, sid, tracked)
