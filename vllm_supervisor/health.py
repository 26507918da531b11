"""Readiness: poll vLLM's GET /health in a thread and wake the loop when it answers 200."""

from __future__ import annotations

import http.client
import os
import ssl
import threading

from vllm_supervisor.signals import WAKE_SIGNAL


def probe_once(scheme: str, host: str, port: int, timeout: float) -> int | None:
    """GET /health once: the HTTP status, or None when nothing answers."""
    if scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ctx
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class ReadinessProbe(threading.Thread):
    """Polls /health every INTERVAL seconds until it answers 200 or stop() is called."""

    def __init__(self, scheme: str, host: str, port: int, interval: float, clock):
        super().__init__(name="readiness", daemon=True)
        self.scheme, self.host, self.port = scheme, host, port
        self.interval = interval
        self._clock = clock
        self._halt = threading.Event()
        self.ready_at: float | None = None
        self.last_status: int | None = None
        self.attempts = 0

    @property
    def url(self) -> str:
        """The server's base URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def run(self) -> None:
        """Poll until ready or stopped."""
        while not self._halt.is_set():
            self.attempts += 1
            status = probe_once(self.scheme, self.host, self.port, timeout=2.0)
            self.last_status = status
            if status == 200 and not self._halt.is_set():
                self.ready_at = self._clock.monotonic()
                os.kill(os.getpid(), WAKE_SIGNAL)  # the loop waits in sigtimedwait
                return
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Stop polling."""
        self._halt.set()
