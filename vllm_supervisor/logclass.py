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


@dataclass(frozen=True)
class LogVerdict:
    """What vLLM's log said, for the report."""

    crash: bool
    summary: str
    during_stop: dict[str, int]
    unrequested: dict[str, int]


class LogClassifier:
    """Fed whole lines by the log pumps; knows when the stop was requested."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partial: dict[str, bytes] = {}
        self.stop_requested = False
        self.during_stop: dict[str, int] = {}
        self.unrequested: dict[str, int] = {}

    def feed(self, stream: str, data: bytes) -> None:
        """Scan the complete lines in DATA (a pump's chunk) for markers."""
        buf = self._partial.get(stream, b"") + data
        cut = buf.rfind(b"\n") + 1
        self._partial[stream] = buf[cut:][-4096:]
        if cut:
            self._scan(buf[:cut])

    def flush(self) -> None:
        """Scan what is left of each stream (a last line without newline)."""
        for stream, rest in list(self._partial.items()):
            self._partial[stream] = b""
            self._scan(rest)

    def _scan(self, text: bytes) -> None:
        for m in _RX.finditer(text):
            name = MARKERS[int(m.lastgroup[1:])][0]
            with self._lock:
                into = self.during_stop if self.stop_requested else self.unrequested
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
