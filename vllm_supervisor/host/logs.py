"""vLLM's stdout and stderr, passed through byte for byte, optionally into a log file."""

from __future__ import annotations

import collections
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vllm_supervisor.host.output import Losses, describe

# vLLM writes ahead into a pipe this big while a pump passes the last chunk on, and a pump
# reads up to as much at once while a read fills its buffer: a flood costs few reads and
# wake-ups (Linux's default pipe holds 64 KiB). A read of a few lines stays small, as
# allocating a big buffer costs more than the read.
PIPE_SIZE = 1 << 20
CHUNK = 1 << 16
BIG_CHUNK = PIPE_SIZE
TAIL_CHUNKS = 4
TAIL_BYTES = 1 << 16  # of each chunk kept for diagnosis
# A stream's unfinished line is held up to this size; a longer one is written through in
# pieces while the other stream's lines wait for its end, so memory stays bounded.
LINE_HOLD = 1 << 20
_EVENTS = ""  # the supervisor's own event lines, as a stream of whole lines
WRITE_BUF = 1 << 16
LOG_DEST = "log file"


class LogFile:
    """Whole lines from both streams (and the supervisor's own events) into one file.

    Lines of one stream never have another stream's bytes inside them. The one exception
    is bounded: when a line longer than LINE_HOLD is being written through and the
    waiting stream also holds more than LINE_HOLD, the waiting lines go in between.
    """

    def __init__(self, path: Path, losses: Losses | None = None):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self._buf = bytearray()  # small writes gather here; big ones go straight through
        self._why: str | None = None  # the first write error: nothing more is written
        self.losses = losses if losses is not None else Losses()
        self._lock = threading.Lock()
        self._held: dict[str, list[bytes]] = {}  # per stream: what is not written yet
        self._held_n: dict[str, int] = {}
        self._owner: str | None = None  # the stream whose over-long line is half written

    def feed(self, stream: str, data: bytes) -> None:
        """Add DATA from STREAM; only complete lines are written, so streams never interleave
        inside a line."""
        with self._lock:
            self._feed(stream, data)

    def event(self, line: str) -> None:
        """A supervisor event line, timestamped."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with self._lock:
            self._feed(_EVENTS, f"{stamp} vllm-supervise: {line}\n".encode())
            self._flush()

    def close(self) -> None:
        """Write what is left of each stream (a last line without newline too) and close."""
        with self._lock:
            if self._fd < 0:
                return
            order = sorted(self._held, key=lambda s: s != self._owner)
            if self._owner is not None:
                self._write(b"\n")  # end the half-written line
            for stream in order:
                pieces = self._held.pop(stream)
                for piece in pieces:
                    self._write(piece)
                if pieces and not pieces[-1].endswith(b"\n"):
                    self._write(b"\n")
            self._owner = None
            self._flush()
            self._why = self._why or "closed"
            os.close(self._fd)
            self._fd = -1

    def _write(self, data) -> None:
        """Append DATA (bytes or a view) to the file through a 64 KiB buffer."""
        if self._why is not None:
            self.losses.add(LOG_DEST, data, self._why)
        elif len(self._buf) + len(data) <= WRITE_BUF:
            self._buf += data
        elif len(data) >= WRITE_BUF:
            self._flush()
            self._write_through(memoryview(data))
        else:
            self._flush()
            self._buf += data

    def _flush(self) -> None:
        if self._buf:
            data, self._buf = self._buf, bytearray()
            self._write_through(memoryview(data))

    def _write_through(self, view: memoryview) -> None:
        if self._why is not None:
            self.losses.add(LOG_DEST, view, self._why)
            return
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except OSError as e:  # a full disk: the file stops here, the pumps go on
                self._why = describe(e)
                self.losses.add(LOG_DEST, view, self._why)
                return

    def _feed(self, stream: str, data: bytes) -> None:
        if self._owner not in (None, stream):
            self._hold(stream, data)  # another stream is inside a line
            if self._held_n[stream] <= LINE_HOLD:
                return
            self._owner = None  # both over the bound: the waiting lines go in between
            self._release(None)
            return
        self._put(stream, data)

    def _put(self, stream: str, data: bytes) -> None:
        """Write STREAM's held bytes and DATA up to its last newline; hold the rest."""
        cut = data.rfind(b"\n") + 1
        if not cut:
            self._hold(stream, data)
            if self._owner == stream or self._held_n[stream] > LINE_HOLD:
                self._write_held(stream)
                self._owner = stream
            return
        if self._owner == stream:  # our long line ends: the lines that waited for it go next
            end = data.find(b"\n") + 1
            self._write(memoryview(data)[:end])
            self._owner = None
            self._release(stream)
            self._flush()  # events may have waited too
            if end < len(data):
                self._feed(stream, data[end:])
            return
        self._write_held(stream)
        self._write(data if cut == len(data) else memoryview(data)[:cut])
        if cut < len(data):
            self._hold(stream, data[cut:])  # copies only the unfinished line

    def _hold(self, stream: str, data: bytes) -> None:
        self._held.setdefault(stream, []).append(data)
        self._held_n[stream] = self._held_n.get(stream, 0) + len(data)

    def _write_held(self, stream: str) -> None:
        for piece in self._held.get(stream, ()):
            self._write(piece)
        self._held[stream] = []
        self._held_n[stream] = 0

    def _release(self, ended: str | None) -> None:
        """A half-written line ended: what the other streams held while it was written."""
        for stream in list(self._held):
            if stream == ended or not self._held[stream]:
                continue
            if self._owner not in (None, stream):
                return  # a released stream began an over-long line of its own
            pieces, self._held[stream], self._held_n[stream] = self._held[stream], [], 0
            for piece in pieces:
                self._put(stream, piece)


def grow_pipe(fd: int) -> None:
    """Make the pipe behind FD hold PIPE_SIZE bytes, where the system allows it."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # not a pipe, or over the user's pipe quota: the default size still works


class StreamPump(threading.Thread):
    """Copies one pipe to one sink until EOF; keeps the last chunks for diagnosis."""

    def __init__(self, name: str, fd: int, sink: Callable[[str, bytes], None],
                 taps: list[Callable[[str, bytes], None]]):
        super().__init__(name=f"pump-{name}", daemon=True)
        self.stream = name
        self._fd = fd
        self._sink = sink
        self._taps = taps  # the log file, the log classifier
        self.tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_CHUNKS)
        self.bytes = 0
        self.failure: str | None = None  # the first error of a sink or tap (a bug)

    def run(self) -> None:
        """Read until EOF."""
        fd, sink, taps, stream = self._fd, self._sink, self._taps, self.stream
        grow_pipe(fd)
        size = CHUNK
        while True:
            try:
                chunk = os.read(fd, size)
            except OSError:
                break
            if not chunk:
                break
            size = BIG_CHUNK if len(chunk) >= CHUNK else CHUNK
            try:
                sink(stream, chunk)
                for tap in taps:
                    tap(stream, chunk)
            except Exception as e:  # noqa: BLE001 - vLLM must never block on a dead pump
                self.failure = self.failure or f"{type(e).__name__}: {e}"
            self.tail.append(chunk if len(chunk) <= TAIL_BYTES else chunk[-TAIL_BYTES:])
            self.bytes += len(chunk)
        os.close(fd)

    def last_lines(self, n: int) -> list[str]:
        """The last N lines this stream carried."""
        text = b"".join(self.tail).decode(errors="replace")
        return text.splitlines()[-n:]
