"""The one place that knows vLLM's shutdown and crash log lines.

A requested stop makes real vLLM print alarming lines (EngineDeadError from the output
handler, "Parent process exited", nanobind and resource_tracker leak warnings, "died
unexpectedly", "destroy_process_group() was not called"). The same engine-death lines
with no stop requested mean a crash. The classifier counts each marker, split by whether
a stop had been requested when the line arrived. Patterns are checked against captured
output of the real vLLM CPU build (tests/data/).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

# (name, regex, means engine death when no stop was requested)
MARKERS: tuple[tuple[str, bytes, bool], ...] = (
    ("engine core died unexpectedly",
     rb"Engine core proc \S+ died unexpectedly|engine core exited unexpectedly", True),
    ("EngineDeadError", rb"EngineDeadError", True),
    ("output handler failed", rb"AsyncLLM output_handler failed", True),
    ("worker saw its parent exit", rb"Parent process exited, terminating worker queues", True),
    ("destroy_process_group() not called", rb"destroy_process_group\(\) was not called", False),
    ("nanobind leak report", rb"nanobind: leaked \d+ \w+", False),
    ("resource_tracker leak warning", rb"resource_tracker: There appear to be \d+ leaked", False),
    ("force-killed its own children", rb"force killing (?:remaining process|sub process)", False),
)
_RX = re.compile(b"|".join(b"(?P<m%d>%s)" % (i, rx) for i, (_, rx, _) in enumerate(MARKERS)))
# Every match of a marker contains one of these literals ("process": three markers,
# "leaked": two), so a line without any cannot hold a marker. Each is one pass of
# bytes.find over a chunk, the pre-filter's whole cost: keep them few.
TOKENS = (b"unexpectedly", b"EngineDeadError", b"output_handler", b"process", b"leaked")
# Only the first LINE_SCAN bytes of a line are classified: vLLM puts a marker near the start
# of its line, and a longer line (a dumped request, a huge repr) is skipped past this point,
# so a stream costs at most this much memory and a long line stays linear in time.
LINE_SCAN = 8192


@dataclass(frozen=True)
class LogVerdict:
    """What vLLM's log said, for the report."""

    crash: bool
    summary: str
    during_stop: dict[str, int]
    unrequested: dict[str, int]


class _Line:
    """What a stream's current, unfinished line has shown the classifier so far."""

    __slots__ = ("head", "skip")

    def __init__(self) -> None:
        self.head = b""  # its first bytes, at most LINE_SCAN
        self.skip = False  # it is longer than LINE_SCAN: its start was classified already


class LogClassifier:
    """Fed a pump's chunks as they come; knows when the stop was requested.

    A chunk is never split into lines in Python: a few bytes.find calls look for the
    markers' literals over the whole chunk, and only a line holding one goes to the regex.
    Markers never span lines, so this counts exactly what the regex over the first
    LINE_SCAN bytes of every line would.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: dict[str, _Line] = {}
        self.stop_requested = False
        self.during_stop: dict[str, int] = {}
        self.unrequested: dict[str, int] = {}

    def feed(self, stream: str, data: bytes) -> None:
        """Classify the lines DATA (a pump's chunk) completes; keep the start of its last."""
        line = self._lines.get(stream) or self._lines.setdefault(stream, _Line())
        first = data.find(b"\n")
        if first < 0:
            self._extend(line, data, 0, len(data))
            return
        self._extend(line, data, 0, first)
        self._end_line(line)
        last = data.rfind(b"\n")
        if last > first:
            self._scan_lines(data, first + 1, last)
        self._extend(line, data, last + 1, len(data))

    def flush(self) -> None:
        """Classify what is left of each stream (a last line without newline)."""
        for line in list(self._lines.values()):
            self._end_line(line)

    def _extend(self, line: _Line, data: bytes, start: int, end: int) -> None:
        if line.skip or start == end:
            return
        room = LINE_SCAN - len(line.head)
        line.head += data[start:min(end, start + room)]
        if end - start > room:  # longer than we look at: classify its start now, drop it
            self._scan(line.head)
            line.head, line.skip = b"", True

    def _end_line(self, line: _Line) -> None:
        if line.head:
            self._scan(line.head)
        line.head, line.skip = b"", False

    def _scan(self, text: bytes) -> None:
        if any(token in text for token in TOKENS):
            self._count(_RX.finditer(text))

    def _scan_lines(self, data: bytes, start: int, end: int) -> None:
        """The complete lines in DATA[START:END]: the regex only over lines with a literal."""
        spans: dict[int, int] = {}
        for token in TOKENS:
            hit = data.find(token, start, end)
            while hit >= 0:
                begin = max(start, data.rfind(b"\n", start, hit) + 1)
                stop = data.find(b"\n", hit, end)
                stop = end if stop < 0 else stop
                spans[begin] = min(stop, begin + LINE_SCAN)
                hit = data.find(token, stop, end)
        for begin in sorted(spans):
            self._count(_RX.finditer(data, begin, spans[begin]))

    def _count(self, matches) -> None:
        names = [MARKERS[int(m.lastgroup[1:])][0] for m in matches]
        if not names:
            return
        with self._lock:
            into = self.during_stop if self.stop_requested else self.unrequested
            for name in names:
                into[name] = into.get(name, 0) + 1

    def engine_death_seen(self) -> bool:
        """An engine-death marker arrived while no stop was requested."""
        deadly = {name for name, _, d in MARKERS if d}
        return any(n in deadly for n in self.unrequested)

    def verdict(self, requested: bool) -> LogVerdict:
        """Noise of a requested stop, or a crash, in one line."""
        crash = self.engine_death_seen()
        if crash:
            summary = "crash: " + _fmt(self.unrequested) + " with no stop requested"
        elif self.during_stop and requested:
            summary = ("noise of a requested stop, not a crash: " + _fmt(self.during_stop))
        elif self.during_stop:
            summary = "shutdown lines after vLLM began to stop: " + _fmt(self.during_stop)
        else:
            summary = "no crash or shutdown markers"
        return LogVerdict(crash, summary, dict(self.during_stop), dict(self.unrequested))


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items())
