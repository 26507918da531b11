"""The threads that talk to a serving vLLM: the progress probe (a /metrics look every
interval, a canary when the counters did not move) and the drain watch (/metrics while a
requested stop lets vLLM finish its requests). They do the I/O; the judgement is the
injected judge's (lifecycle/progress.py). A verdict wakes the supervisor's loop."""

from __future__ import annotations

import os
import threading

from vllm_supervisor.host import vllm_http
from vllm_supervisor.host.signals import WAKE_SIGNAL

METRICS_TIMEOUT_S = 5.0
DRAIN_POLL_S = 0.5


def _wake() -> None:
    os.kill(os.getpid(), WAKE_SIGNAL)  # the loop waits in sigtimedwait


class ProgressWatch(threading.Thread):
    """Every INTERVAL seconds after the previous round: /metrics, then a canary when the
    judge wants one. Ends at the verdict (and wakes the loop) or at stop()."""

    def __init__(self, ep: vllm_http.Endpoint, judge, kind: str, interval_s: float,
                 timeout_s: float, clock, model_hint: str):
        super().__init__(name="progress", daemon=True)
        self.ep, self.judge, self.kind = ep, judge, kind
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.clock = clock
        self.model: str | None = None
        self.model_hint = model_hint
        self._halt = threading.Event()

    def run(self) -> None:
        """Probe until the verdict or stop()."""
        while not self._halt.wait(self.interval_s):
            sample = vllm_http.fetch_metrics(self.ep, min(METRICS_TIMEOUT_S, self.timeout_s))
            if self._halt.is_set():
                return
            if self.judge.on_metrics(self.clock.monotonic(), sample):
                continue
            if not self.judge.wants_canary():
                continue
            if self.model is None:
                self.model = vllm_http.served_model(self.ep, self.timeout_s)
            ans = vllm_http.canary(self.ep, self.kind, self.model or self.model_hint,
                                   self.timeout_s)
            if self._halt.is_set():
                return
            suspected = self.judge.suspect
            self.judge.on_canary(self.clock.monotonic(), ans.status, ans.latency_s, ans.error)
            if self.judge.hung or self.judge.suspect != suspected:
                _wake()
            if self.judge.hung:
                return

    def stop(self) -> None:
        """Stop probing (a round in flight finishes its request first)."""
        self._halt.set()


class DrainWatch(threading.Thread):
    """/metrics every DRAIN_POLL_S while vLLM drains after the stop signal: the first
    and the last answer, and whether it stopped answering."""

    def __init__(self, ep: vllm_http.Endpoint, first):
        super().__init__(name="drain", daemon=True)
        self.ep = ep
        self.first = first  # the sample taken just before the stop signal
        self.last = first
        self.answered_to_end = True
        self._halt = threading.Event()

    def run(self) -> None:
        """Poll until stop() or until vLLM no longer answers."""
        while not self._halt.wait(DRAIN_POLL_S):
            sample = vllm_http.fetch_metrics(self.ep, 1.0)
            if sample is None:
                self.answered_to_end = False
                return
            self.last = sample

    def stop(self) -> None:
        """Stop polling."""
        self._halt.set()
