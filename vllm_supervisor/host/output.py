"""Our stdout and stderr, written by threads of their own: whoever produces output (the
pumps passing vLLM's output on, the loop's events) only queues it, so a stalled reader, a
full disk or a terminal that hung up never blocks them. What cannot be written is dropped
and counted, per destination, with why."""

from __future__ import annotations

import errno
import os
import select
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

BUFFER_LIMIT = 4 << 20  # bytes queued or being written, per writer thread
IOV_MAX = 1024  # buffers per writev (Linux's UIO_MAXIOV)
FULL = "reader too slow: 4 MiB buffered"
WHY = {errno.EIO: "terminal gone", errno.EPIPE: "reader gone", errno.ENOSPC: "no space left",
       errno.EBADF: "closed", errno.EDQUOT: "quota exceeded", errno.EFBIG: "file too large"}


@dataclass(frozen=True)
class OutputLoss:
    """What never reached one destination (stdout, stderr, the log file), and why."""

    bytes: int
    lines: int
    why: str


def describe(exc: OSError) -> str:
    """A write error as 'EIO: terminal gone'."""
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name}: {WHY.get(exc.errno, exc.strerror or str(exc))}"


class Losses:
    """Bytes and lines lost per destination; each new (destination, why) is a warning to
    give once, by whoever next holds no lock (taken with take_warnings)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lost: dict[str, list] = {}  # destination -> [bytes, lines, whys]
        self._warnings: list[tuple[str, str]] = []
        self.pending = False  # a cheap check before take_warnings

    def add(self, dest: str, data, why: str) -> None:
        """DATA (bytes-like) did not reach DEST because of WHY."""
        lines = bytes(data).count(b"\n") if isinstance(data, memoryview) else data.count(b"\n")
        with self._lock:
            entry = self._lost.setdefault(dest, [0, 0, []])
            entry[0] += len(data)
            entry[1] += lines
            if why not in entry[2]:
                entry[2].append(why)
                self._warnings.append((dest, why))
                self.pending = True

    def take_warnings(self) -> list[tuple[str, str]]:
        """The (destination, why) pairs not warned of yet."""
        with self._lock:
            taken, self._warnings, self.pending = self._warnings, [], False
        return taken

    def snapshot(self) -> dict[str, OutputLoss]:
        """What was lost so far, per destination."""
        with self._lock:
            return {d: OutputLoss(b, n, "; ".join(w)) for d, (b, n, w) in self._lost.items()}


class FdWriter(threading.Thread):
    """Writes queued chunks to its fds (several when they are one destination, e.g. a
    terminal: their order is kept) in one thread; the callers never wait."""

    def __init__(self, fds: dict[str, int], losses: Losses, limit: int = BUFFER_LIMIT):
        super().__init__(name="writer-" + "+".join(fds), daemon=True)
        self.fds = fds
        self._losses = losses
        self._limit = limit
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queued = 0  # bytes queued or in the batch being written
        self._busy = False
        self._cond = threading.Condition(threading.Lock())
        self._failed: dict[str, str] = {}  # name -> why: nothing more is written to it

    def put(self, name: str, data: bytes) -> bool:
        """Queue DATA for fd NAME; False when it was dropped (and counted) instead."""
        with self._cond:
            why = self._failed.get(name)
            if why is None and self._queued and self._queued + len(data) > self._limit:
                why = FULL
            if why is None:
                self._queue.append((name, data))
                self._queued += len(data)
                self._cond.notify()
                return True
        self._losses.add(name, data, why)
        return False

    def drain(self, timeout: float) -> bool:
        """Wait up to TIMEOUT s for everything queued to be written (or dropped)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queued, timeout)

    def run(self) -> None:
        """Write batches until the process ends."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue)
                batch = list(self._queue)
                self._queue.clear()
            start = 0
            while start < len(batch):  # runs of one fd, one writev each
                name, end = batch[start][0], start + 1
                while end < len(batch) and batch[end][0] == name and end - start < IOV_MAX:
                    end += 1
                self._write(name, [memoryview(d) for _, d in batch[start:end]])
                start = end
            with self._cond:
                self._queued -= sum(len(d) for _, d in batch)
                self._cond.notify_all()

    def _write(self, name: str, views: list[memoryview]) -> None:
        fd = self.fds[name]
        while views:
            why = self._failed.get(name)
            if why is not None:
                for v in views:
                    self._losses.add(name, v, why)
                return
            try:
                n = os.writev(fd, views)
            except BlockingIOError:  # somebody made the shared file description non-blocking
                select.select([], [fd], [], 1.0)
                continue
            except OSError as e:
                with self._cond:
                    self._failed[name] = describe(e)
                continue
            done = 0  # whole views written; then trim the first partial one
            while done < len(views) and n >= len(views[done]):
                n -= len(views[done])
                done += 1
            del views[:done]
            if n:
                views[0] = views[0][n:]


def same_destination(fd_a: int, fd_b: int) -> bool:
    """Whether two fds write to one file, pipe or terminal."""
    try:
        a, b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Output:
    """Our stdout and stderr: one writer thread each, or one for both when they are the
    same destination (a terminal, `2>&1`), so that their order is kept."""

    def __init__(self, losses: Losses, limit: int = BUFFER_LIMIT,
                 fds: dict[str, int] | None = None):
        fds = fds or {"stdout": 1, "stderr": 2}
        self.losses = losses
        if same_destination(fds["stdout"], fds["stderr"]):
            shared = FdWriter(fds, losses, limit)
            self._writers = {"stdout": shared, "stderr": shared}
        else:
            self._writers = {n: FdWriter({n: fd}, losses, limit) for n, fd in fds.items()}
        # Started with every signal blocked, which they keep: the loop takes the stop
        # signals with sigtimedwait, and a thread that could take one would die of it.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            for w in set(self._writers.values()):
                w.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def put(self, stream: str, data: bytes) -> bool:
        """Queue DATA for STREAM ("stdout" or "stderr"); never blocks."""
        return self._writers[stream].put(stream, data)

    def drain(self, timeout: float) -> bool:
        """Wait up to TIMEOUT s in all for both streams to be written out."""
        deadline = time.monotonic() + timeout
        return all(w.drain(max(0.0, deadline - time.monotonic()))
                   for w in set(self._writers.values()))
