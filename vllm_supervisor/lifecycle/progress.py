"""The progress probe's judgement: is an engine that still answers /health serving?

Passive first: when vLLM's work counters (tokens, engine steps in /metrics) or the gauges
its engine updates on every step (KV cache use, running and waiting requests) changed since
the last look, the engine is alive and nothing is sent. Otherwise a canary, the smallest real
request the model accepts, with its own timeout. A hang is declared only after FAILURES
canaries in a row failed with no progress seen in between (progress resets the count), so
a busy engine (long prefills, a full queue) whose counters move is never called hung. A
sleeping engine (vLLM's sleep mode) is not probed. A canary the server refuses as a
request (HTTP 4xx: no such endpoint for this model, a wrong API key) cannot judge: the
probe says so and stays passive; it then never declares a hang.

No I/O here: the host's probe thread feeds what it saw, with the time it saw it."""

from __future__ import annotations

from dataclasses import dataclass

POOLING_TASKS = {"embed", "embedding", "classify", "score", "reward", "pooling"}
NOT_FAILURES = {429}  # too many requests: busy, not hung


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe does while serving, resolved from the options and vLLM's args."""

    mode: str  # "completion" (health + progress), "health", "off"
    interval_s: float
    timeout_s: float
    failures: int
    kind: str  # "generate" or "pooling": which canary
    api_key: str | None

    def worst_verdict_s(self) -> float:
        """Longest time from a freeze to the verdict: a look that still sees the last
        work, then FAILURES canaries that time out, a look and an interval apart."""
        return (self.failures + 1) * self.interval_s + self.failures * self.timeout_s


def model_kind(vllm_args: tuple[str, ...]) -> str:
    """'pooling' when vLLM's arguments make it an embedding/classification server
    (--runner pooling, --task embed, --convert embed, ...), else 'generate'."""
    args = list(vllm_args)
    for i, a in enumerate(args):
        name, _, value = a.partition("=")
        if name in ("--runner", "--task", "--convert"):
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value in POOLING_TASKS:
                return "pooling"
    return "generate"


@dataclass(frozen=True)
class ProbeResult:
    """The last thing the probe learned, for STATUS, `status` and the report."""

    result: str  # "progress", "canary ok", "canary failed", "sleeping", "no metrics", ...
    latency_s: float | None
    at: float  # monotonic time
    detail: str = ""

    def text(self) -> str:
        """'canary ok, 12 ms' / 'canary failed, 15000 ms: no answer within 15 s'."""
        latency = f", {self.latency_s * 1e3:.0f} ms" if self.latency_s is not None else ""
        return f"{self.result}{latency}" + (f": {self.detail}" if self.detail else "")


class ProgressJudge:
    """Counts failed canaries between signs of progress and gives the verdict."""

    def __init__(self, settings: ProbeSettings, now: float):
        self.settings = settings
        self.fails = 0
        self.last_value: tuple | None = None
        self.last_progress_at = now
        self.canary_usable = True
        self.unusable_why = ""
        self.hung: str | None = None
        self.last: ProbeResult | None = None

    @property
    def suspect(self) -> str | None:
        """'hang suspected: ...' once a canary failed without progress since; else None."""
        if self.fails == 0 or self.hung:
            return None
        return (f"hang suspected: {self.fails}/{self.settings.failures} canary requests "
                f"failed, no progress for {self.last.at - self.last_progress_at:.0f} s")

    def on_metrics(self, now: float, sample) -> bool:
        """A /metrics look (a MetricsSample, or None when it did not answer). True when
        it shows the engine alive (progress, or asleep): no canary this round."""
        if sample is None or sample.progress is None:
            self.last = ProbeResult("no metrics" if sample is None else "no counters",
                                    None, now)
            return False
        if sample.sleeping:
            self.fails, self.last_progress_at = 0, now
            self.last = ProbeResult("sleeping", None, now)
            return True
        moved = self.last_value is not None and sample.signature != self.last_value
        self.last_value = sample.signature
        if moved:
            self.fails, self.last_progress_at = 0, now
            self.last = ProbeResult("progress", None, now)
        return moved

    def wants_canary(self) -> bool:
        """Whether a canary may be sent now."""
        return self.canary_usable and self.hung is None and self.settings.failures > 0

    def on_canary(self, now: float, status: int | None, latency_s: float, error: str) -> None:
        """The canary's outcome: STATUS (None: no answer, ERROR says why)."""
        if status == 200:
            self.fails, self.last_progress_at = 0, now
            self.last = ProbeResult("canary ok", latency_s, now)
            return
        if status is not None and 400 <= status < 500 and status not in NOT_FAILURES:
            self.canary_usable = False
            self.unusable_why = (f"the canary was refused with HTTP {status}: "
                                 "judging by /health and /metrics only")
            self.last = ProbeResult("canary refused", latency_s, now, self.unusable_why)
            return
        if status in NOT_FAILURES:
            self.last = ProbeResult("canary busy", latency_s, now, f"HTTP {status}")
            return
        self.fails += 1
        what = error if status is None else f"HTTP {status}"
        self.last = ProbeResult("canary failed", latency_s, now, what)
        if self.fails >= self.settings.failures:
            self.hung = (f"{self.fails} canary requests in a row failed ({what}) and "
                         f"vLLM's counters did not move for {now - self.last_progress_at:.0f} s")
