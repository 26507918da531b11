"""What the operator sees: vLLM's output untouched, supervisor events on stderr, a live
status line on a TTY, plain timestamped lines elsewhere (journald, containers).

Nothing here writes to fd 1 or 2 itself: host.output's writer threads do, so a stalled
reader, a full disk or a hung-up terminal never blocks the loop or the pumps; what they
cannot write is counted (output_lost) and warned of once per destination and cause."""

from __future__ import annotations

import os
import threading
import time

from vllm_supervisor.host.logs import LOG_DEST, LogFile
from vllm_supervisor.host.output import FULL, Losses, Output, OutputLoss

DRAIN_S = 2.0  # at the end, wait at most this long for a slow reader of stdout/stderr


def use_color(fd: int) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return os.isatty(fd) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class Ui:
    """Writes events, passes vLLM output through, and keeps a status line on a TTY."""

    def __init__(self, log_file: LogFile | None = None, live: bool | None = None, quiet=False,
                 output: Output | None = None):
        self.log_file = log_file
        self.color = use_color(2)
        self.live = os.isatty(2) if live is None else live
        self.quiet = quiet
        self.out = output if output is not None else Output(Losses())
        self._losses = [self.out.losses] + ([log_file.losses] if log_file is not None else [])
        self._lock = threading.Lock()
        self._status = ""
        self._status_shown = False
        self._last_draw = 0.0

    # -- vLLM's output -------------------------------------------------------------
    def passthrough(self, stream: str, data: bytes) -> None:
        """Copy a chunk of vLLM output to our own stdout or stderr, byte for byte."""
        if not self._status_shown:
            self.out.put(stream, data)
        else:
            with self._lock:
                self._clear()
                self.out.put(stream, data)
                if data.endswith(b"\n"):
                    self._draw()
        if self._losses[0].pending or self._losses[-1].pending:
            self.warn_losses()

    # -- supervisor events ---------------------------------------------------------
    def event(self, msg: str, style: str = "", skip: str = "") -> None:
        """One lifecycle line: timestamped when plain, coloured on a terminal (not to SKIP,
        the destination a warning is about)."""
        if self.log_file is not None and skip != LOG_DEST:
            self.log_file.event(msg)
        if not self.quiet and skip != "stderr":
            if self.color:
                code = {"ok": "32", "warn": "33", "bad": "31", "": "36"}.get(style, "36")
                line = f"\x1b[1;{code}m[vllm-supervise]\x1b[0m {msg}\n"
            else:
                line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} vllm-supervise: {msg}\n"
            with self._lock:
                self._clear()
                self.out.put("stderr", line.encode())
                self._draw()
        if self._losses[0].pending or self._losses[-1].pending:
            self.warn_losses()

    def warn_losses(self) -> None:
        """One warning for each destination and cause of lost output not warned of yet,
        on the destinations that still work (called holding no lock)."""
        for losses in self._losses:
            for dest, why in losses.take_warnings():
                what = ("output is dropped while it stays so" if why == FULL
                        else "nothing more is written to it")
                self.event(f"warning: {dest}: {why}; {what}, counted in the stop report",
                           "warn", skip=dest)

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
            self.out.put("stderr", text.encode())

    def output_lost(self) -> dict[str, OutputLoss]:
        """What never reached stdout, stderr or the log file so far, per destination."""
        lost: dict[str, OutputLoss] = {}
        for losses in self._losses:
            lost |= losses.snapshot()
        return lost

    def drain(self, timeout: float = DRAIN_S) -> bool:
        """Give pending warnings, then wait up to TIMEOUT s for stdout and stderr to be
        written; False when a reader is stalled (what is left is abandoned at exit)."""
        self.warn_losses()
        return self.out.drain(timeout)

    def _clear(self) -> None:
        if self._status_shown:
            self.out.put("stderr", b"\r\x1b[2K")
            self._status_shown = False

    def _draw(self) -> None:
        if self._status and self.live:
            try:
                cols = os.get_terminal_size(2).columns
            except OSError:  # not a terminal, or one that hung up
                cols = 120
            text = self._status[: cols - 1]
            self.out.put("stderr", (f"\x1b[2m{text}\x1b[0m" if self.color else text).encode())
            self._status_shown = True
            self._last_draw = time.monotonic()
