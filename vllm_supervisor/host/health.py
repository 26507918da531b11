"""Readiness and health: poll vLLM's GET /health in a thread; wake the loop on a change."""

from __future__ import annotations

import os
import threading

from vllm_supervisor.host import vllm_http
from vllm_supervisor.host.signals import WAKE_SIGNAL


def poll_timeout(interval: float) -> float:
    """How long one /health poll waits for an answer while serving every INTERVAL s."""
    return min(5.0, 2 + interval)


def probe_once(scheme: str, host: str, port: int, timeout: float) -> int | None:
    """GET /health once: the HTTP status, or None when nothing answers."""
    return vllm_http.request(vllm_http.Endpoint(scheme, host, port), "GET", "/health",
                             timeout=timeout).status


class HealthWatch(threading.Thread):
    """Polls /health every READY_POLL seconds until it answers 200 (ready_at is set), then
    every INTERVAL seconds; FAILURES consecutive non-200 answers set unhealthy."""

    def __init__(self, scheme: str, host: str, port: int, ready_poll: float, clock,
                 interval: float = 5.0, failures: int = 3):
        super().__init__(name="health", daemon=True)
        self.scheme, self.host, self.port = scheme, host, port
        self.ready_poll = ready_poll
        self.interval = interval
        self.failures = failures
        self._clock = clock
        self._halt = threading.Event()
        self.ready_at: float | None = None
        self.unhealthy: str | None = None  # why, once FAILURES probes in a row failed
        self.last_status: int | None = None
        self.attempts = 0

    def run(self) -> None:
        """Poll until stopped."""
        failed = 0
        while not self._halt.is_set():
            self.attempts += 1
            status = probe_once(self.scheme, self.host, self.port, timeout=poll_timeout(self.interval))
            self.last_status = status
            if self._halt.is_set():
                return
            if self.ready_at is None:
                if status == 200:
                    self.ready_at = self._clock.monotonic()
                    self._wake()
            elif status == 200:
                failed = 0
            else:
                failed += 1
                if failed >= self.failures and self.unhealthy is None:
                    what = "no answer" if status is None else f"HTTP {status}"
                    self.unhealthy = f"/health failed {failed} times in a row ({what})"
                    self._wake()
            if self.interval <= 0 and self.ready_at is not None:
                return  # monitoring switched off
            self._halt.wait(self.ready_poll if self.ready_at is None else self.interval)

    def _wake(self) -> None:
        os.kill(os.getpid(), WAKE_SIGNAL)  # the loop waits in sigtimedwait

    def stop(self) -> None:
        """Stop polling."""
        self._halt.set()
