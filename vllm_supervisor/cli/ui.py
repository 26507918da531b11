"""What the operator sees: vLLM's output untouched, supervisor events on stderr, a live
status line on a TTY, plain timestamped lines elsewhere (journald, containers)."""

from __future__ import annotations

import os
import sys
import threading
import time

from vllm_supervisor.host.logs import LogFile, write_all


def use_color(stream) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class Ui:
    """Writes events, passes vLLM output through, and keeps a status line on a TTY."""

    def __init__(self, log_file: LogFile | None = None, live: bool | None = None, quiet=False):
        self.log_file = log_file
        self.live = sys.stderr.isatty() if live is None else live
        self.color = use_color(sys.stderr)
        self.quiet = quiet
        self._lock = threading.Lock()
        self._status = ""
        self._status_shown = False
        self._last_draw = 0.0

    # -- vLLM's output -------------------------------------------------------------
    def passthrough(self, stream: str, data: bytes) -> None:
        """Copy a chunk of vLLM output to our own stdout or stderr, byte for byte."""
        fd = 1 if stream == "stdout" else 2
        if not self._status_shown:
            write_all(fd, data)
            return
        with self._lock:
            self._clear()
            write_all(fd, data)
            if data.endswith(b"\n"):
                self._draw()

    # -- supervisor events ---------------------------------------------------------
    def event(self, msg: str, style: str = "") -> None:
        """One lifecycle line: timestamped when plain, coloured on a terminal."""
        if self.log_file is not None:
            self.log_file.event(msg)
        if self.quiet:
            return
        if self.color:
            code = {"ok": "32", "warn": "33", "bad": "31", "": "36"}.get(style, "36")
            line = f"\x1b[1;{code}m[vllm-supervise]\x1b[0m {msg}\n"
        else:
            line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} vllm-supervise: {msg}\n"
        with self._lock:
            self._clear()
            write_all(2, line.encode())
            self._draw()

    def status(self, text: str) -> None:
        """Replace the live status line (TTY only; at most 10 redraws a second)."""
        if not self.live or self.quiet:
            return
        now = time.monotonic()
        with self._lock:
            self._status = text
            if now - self._last_draw >= 0.1:
                self._clear()
                self._draw()

    def clear_status(self) -> None:
        """Remove the status line for good."""
        with self._lock:
            self._clear()
            self._status = ""

    def block(self, text: str) -> None:
        """A multi-line block (the stop report) on stderr."""
        with self._lock:
            self._clear()
            write_all(2, text.encode())

    def _clear(self) -> None:
        if self._status_shown:
            write_all(2, b"\r\x1b[2K")
            self._status_shown = False

    def _draw(self) -> None:
        if self._status and self.live:
            cols = os.get_terminal_size(2).columns if sys.stderr.isatty() else 120
            text = self._status[: cols - 1]
            write_all(2, (f"\x1b[2m{text}\x1b[0m" if self.color else text).encode())
            self._status_shown = True
            self._last_draw = time.monotonic()
