"""vLLM's /metrics and the canary as the fake host scripts them, and the progress and
drain threads run on the fake clock: the real judge (lifecycle/progress.py) is fed what
the script says, at the times the real threads would look."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_supervisor.host.vllm_http import MetricsSample


@dataclass
class FakeServer:
    """What vLLM answers. BUSY: its counters move between looks; HUNG: they stop and the
    canary gets no answer; SLOW_S: a canary takes this long (0: at once)."""

    busy: bool = False
    hung: bool = False
    sleeping: bool = False
    counters: bool = True  # False: --disable-log-stats
    metrics: bool = True   # False: /metrics does not answer
    canary_status: int | None = 200
    running: int = 0
    waiting: int = 0
    finished: float = 0.0
    progress: float = 0.0
    canaries: int = 0

    def sample(self) -> MetricsSample | None:
        if not self.metrics:
            return None
        if self.busy and not self.hung:
            self.progress += 10
        return MetricsSample(self.progress if self.counters else None, self.running,
                             self.waiting, self.finished, self.sleeping)


class FakeProgressWatch:
    """ProgressWatch's rounds, scheduled on the fake host's event queue."""

    def __init__(self, host, judge, interval_s: float, timeout_s: float):
        self.host, self.judge = host, judge
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.stopped = False
        self.rounds = 0
        host.at(interval_s, self._round)

    def _round(self) -> None:
        if self.stopped:
            return
        self.rounds += 1
        server, clock = self.host.server, self.host.clock
        if self.judge.on_metrics(clock.t, server.sample()) or not self.judge.wants_canary():
            self.host.at(self.interval_s, self._round)
            return
        server.canaries += 1
        if server.hung or server.canary_status is None:
            self.host.at(self.timeout_s, self._answer, None, self.timeout_s,
                         f"no answer within {self.timeout_s:g} s")
        else:
            self.host.at(0.01, self._answer, server.canary_status, 0.01, "")

    def _answer(self, status, latency, error) -> None:
        if self.stopped:
            return
        before = self.judge.suspect
        self.judge.on_canary(self.host.clock.t, status, latency, error)
        if self.judge.hung or self.judge.suspect != before:
            self.host._wake()
        if not self.judge.hung:
            self.host.at(self.interval_s, self._round)

    def stop(self) -> None:
        self.stopped = True

    def join(self, timeout=None) -> None:
        pass


class FakeDrainWatch:
    """DrainWatch: the last sample is whatever the script set by the time it is read."""

    def __init__(self, host, first: MetricsSample):
        self.host, self.first = host, first
        self.answered_to_end = True
        self._last = first

    @property
    def last(self) -> MetricsSample:
        s = self.host.server
        return MetricsSample(s.progress, s.running, s.waiting, s.finished, s.sleeping)

    def stop(self) -> None:
        pass


@dataclass(frozen=True)
class FakeDiagnosis:
    pids: tuple[int, ...]
    window_s: float

    def lines(self) -> list[str]:
        return [f"pid {p}: diagnosed" for p in self.pids]

    def to_dict(self) -> dict:
        return {"pids": list(self.pids), "window_s": self.window_s}
