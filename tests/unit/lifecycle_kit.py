"""Builds a Supervisor over the fake host and clock, and records what it did."""

from __future__ import annotations

from dataclasses import dataclass, field

from fakehost import FakeClock, FakeHost, FakeProbe, Spec

from vllm_supervisor.gpu.probe import NoGpuProbe
from vllm_supervisor.lifecycle.config import Config
from vllm_supervisor.lifecycle.machine import State
from vllm_supervisor.lifecycle.supervisor import Supervisor


class RecordingUi:
    """The event sink: keeps every event line."""

    color = False

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def event(self, msg, style=""):
        self.events.append((msg, style))

    def status(self, text):
        pass

    def clear_status(self):
        pass

    def passthrough(self, stream, data):
        pass

    def output_lost(self):
        return {}

    def text(self) -> str:
        return "\n".join(m for m, _ in self.events)


class Transitions:
    """A lifecycle listener that keeps every edge taken, with the fake time."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.edges: list[tuple[State, State, float]] = []

    def on_transition(self, old, new):
        self.edges.append((old, new, self.clock.t))

    def states(self) -> list[str]:
        return [self.edges[0][0].value] + [new.value for _, new, _ in self.edges]

    def at(self, state: State) -> float:
        return next(t for _, new, t in self.edges if new is state)


class FakeNotifier:
    """sd_notify as data."""

    def __init__(self, watchdog_s=None) -> None:
        self.watchdog_s = watchdog_s
        self.sent: list[tuple[float, str]] = []
        self.clock = None

    def send(self, *fields):
        self.sent.append((self.clock.t if self.clock else 0.0, "\n".join(fields)))

    def extend(self, seconds, status=None):
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")


class FakeRegistry:
    """The instance record as data; STOP_GRACE is what a `stop --grace` left."""

    name = "fake"

    def __init__(self, stop_grace=None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.stop_grace = stop_grace

    def launched(self, **kw):
        self.calls.append(("launched", kw))

    def update(self, **kw):
        self.calls.append(("update", kw))

    def stop_request(self):
        g, self.stop_grace = self.stop_grace, None
        return g

    def states(self) -> list[str]:
        return [kw["state"] for m, kw in self.calls if m == "update" and kw.get("state")]


@dataclass
class Kit:
    """One supervisor wired to fakes, and the fakes to script and inspect it."""

    sup: Supervisor
    host: FakeHost
    clock: FakeClock
    ui: RecordingUi
    edges: Transitions
    cfg: Config
    notifier: FakeNotifier = field(default_factory=FakeNotifier)
    registry: FakeRegistry | None = None

    def run(self):
        """Run to the report."""
        return self.sup.run()

    def sent(self, name: str) -> list[tuple[float, str]]:
        """(time, target) of every signal NAME the supervisor sent."""
        import signal

        sig = signal.Signals[name]
        return [(t, target) for t, target, s in self.host.sent if s == sig]


def kit(spec: Spec | None = None, *, gpus: int = 0, env=None, watchdog_s=None,
        registry: FakeRegistry | None = None, listeners=(), metrics=None, **cfg) -> Kit:
    """A supervisor over a fake tree (SPEC), GPUS fake GPUs (0: no GPU), and Config CFG."""
    clock = FakeClock()
    host = FakeHost(clock, spec, env)
    ui = RecordingUi()
    edges = Transitions(clock)
    notifier = FakeNotifier(watchdog_s)
    notifier.clock = clock
    settings = {"model": "fake/model", "vllm_args": (), "vllm_cmd": ("vllm",),
                "grace_s": 5.0, **cfg}
    c = Config(**settings)
    probe = FakeProbe(host, gpus) if gpus else NoGpuProbe("no GPU in this test")
    sup = Supervisor(c, host, probe, ui, clock, registry=registry,
                     listeners=(edges, *listeners), notifier=notifier, metrics=metrics)
    return Kit(sup, host, clock, ui, edges, c, notifier, registry)
