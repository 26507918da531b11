"""What every collaborator of one supervised run shares: settings, clock, host, the event
sink, the lifecycle, the tree tracker, the VRAM ledger, the launch and its time zero, the
log of signals, the systemd notifier, the instance record and the metrics. Built once after launch."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_supervisor.clock import Clock
from vllm_supervisor.deploy.sdnotify import Notifier
from vllm_supervisor.gpu.ledger import VramLedger
from vllm_supervisor.host.procinfo import LaunchRecord
from vllm_supervisor.host.proctree import signal_name
from vllm_supervisor.lifecycle.config import Config
from vllm_supervisor.lifecycle.machine import Lifecycle
from vllm_supervisor.lifecycle.metrics import RunMetrics
from vllm_supervisor.lifecycle.ports import EventSink, Host
from vllm_supervisor.lifecycle.publisher import Publisher
from vllm_supervisor.lifecycle.records import SignalEvent
from vllm_supervisor.lifecycle.tracker import TreeTracker


class SignalLog:
    """Every signal received by the supervisor or sent to the tree, in order."""

    def __init__(self) -> None:
        self.events: list[SignalEvent] = []

    def received(self, t: float, name: str, sender_pid: int | None, sender: str | None) -> None:
        """A stop signal that reached the supervisor."""
        self.events.append(SignalEvent(round(t, 4), name, "received", "supervisor",
                                       sender_pid, sender))

    def sent(self, t: float, sig: int, target: str, result: str) -> None:
        """A signal sent to the tree: RESULT is 'sent', 'gone' or 'eperm'."""
        self.events.append(SignalEvent(round(t, 4), signal_name(sig), "sent", target,
                                       note=None if result == "sent" else result))


@dataclass(frozen=True)
class RunContext:
    """The shared references of one run (the objects themselves own their state)."""

    cfg: Config
    clock: Clock
    host: Host
    ui: EventSink
    machine: Lifecycle
    tracker: TreeTracker
    ledger: VramLedger
    launch: LaunchRecord
    t0: float
    signals: SignalLog
    notify: Notifier
    publisher: Publisher
    metrics: RunMetrics

    def now(self) -> float:
        """Seconds since launch."""
        return self.clock.monotonic() - self.t0
