"""systemd's notify protocol (sd_notify): datagrams to $NOTIFY_SOCKET.

READY=1 once vLLM answers /health, STATUS= for each phase, STOPPING=1 when the stop
begins, WATCHDOG=1 while vLLM is healthy (when WatchdogSec= set WATCHDOG_USEC), and
EXTEND_TIMEOUT_USEC= during long starts and during the escalation and VRAM wait, so that
systemd does not SIGKILL the supervisor in the middle of its own cleanup."""

from __future__ import annotations

import os
import socket

CHILD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
MIN_WATCHDOG_S = 0.1  # WATCHDOG_USEC below this is floored: pings every 50 ms at most


class Notifier:
    """Sends notifications when $NOTIFY_SOCKET is set; otherwise does nothing."""

    def __init__(self, env: dict[str, str] | None = None):
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()  # the abstract namespace
        elif path.startswith("/"):
            self.address = path
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        if (usec.isascii() and usec.isdigit() and int(usec) > 0
                and (not wd_pid or wd_pid == str(os.getpid()))):
            # A WatchdogSec= of microseconds would mean thousands of pings a second.
            self.watchdog_s = max(int(usec) / 1e6, MIN_WATCHDOG_S)
        self.sent: list[str] = []
        self._sock: socket.socket | None = None

    def send(self, *fields: str) -> None:
        """One datagram with FIELDS, newline-separated; errors are ignored (best effort)."""
        if self.address is None:
            return
        msg = "\n".join(fields)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg.encode(), self.address)
            self.sent.append(msg)
        except OSError:
            pass

    def extend(self, seconds: float, status: str | None = None) -> None:
        """Ask systemd for SECONDS more before its start or stop timeout."""
        fields = [f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}"]
        if status:
            fields.append(f"STATUS={status}")
        self.send(*fields)
