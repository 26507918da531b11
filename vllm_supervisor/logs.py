"""vLLM's stdout and stderr, passed through byte for byte, optionally into a log file."""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 16
TAIL_CHUNKS = 4


class LogFile:
    """Whole lines from both streams (and the supervisor's own events) into one file."""

    def __init__(self, path: Path):
        self._f = open(path, "ab", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._partial: dict[str, bytes] = {}

    def feed(self, stream: str, data: bytes) -> None:
        """Add DATA from STREAM; only complete lines are written, so streams never interleave
        inside a line."""
        buf = self._partial.get(stream, b"") + data
        cut = buf.rfind(b"\n") + 1
        self._partial[stream] = buf[cut:]
        if cut:
            with self._lock:
                self._f.write(buf[:cut])

    def event(self, line: str) -> None:
        """A supervisor event line, timestamped."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with self._lock:
            self._f.write(f"{stamp} vllm-supervise: {line}\n".encode())
            self._f.flush()

    def close(self) -> None:
        """Write what is left of each stream (a last line without newline too) and close."""
        with self._lock:
            for rest in self._partial.values():
                if rest:
                    self._f.write(rest + b"\n")
            self._partial.clear()
            self._f.close()


def write_all(fd: int, data: bytes) -> None:
    """os.write until everything is out (pipes take partial writes)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError:
            return  # our reader went away; vLLM must not die of it
        view = view[n:]


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

    def run(self) -> None:
        """Read until EOF."""
        fd, sink, taps, stream = self._fd, self._sink, self._taps, self.stream
        while True:
            try:
                chunk = os.read(fd, CHUNK)
            except OSError:
                break
            if not chunk:
                break
            sink(stream, chunk)
            for tap in taps:
                tap(stream, chunk)
            self.tail.append(chunk)
            self.bytes += len(chunk)
        os.close(fd)

    def last_lines(self, n: int) -> list[str]:
        """The last N lines this stream carried."""
        text = b"".join(self.tail).decode(errors="replace")
        return text.splitlines()[-n:]
