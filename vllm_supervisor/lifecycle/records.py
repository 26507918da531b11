"""Plain frozen records of a run: states, signals, how each process ended, the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_supervisor.gpu.verdict import VramVerdict
from vllm_supervisor.host.output import OutputLoss
from vllm_supervisor.host.procinfo import LaunchRecord


@dataclass(frozen=True)
class SignalEvent:
    """A signal, sent or received, with its time relative to launch."""

    t: float
    signal: str
    direction: str  # "received" or "sent"
    target: str  # e.g. "pid 123", "group 123", "supervisor"
    sender_pid: int | None = None
    sender: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class ProcessEnd:
    """How one process of the tree ended (or did not)."""

    pid: int
    create_time: float
    title: str
    pgid: int
    sid: int
    outcome: str  # "exited", "killed", "gone", "survived"
    code: int | None = None  # exit status, or signal number when killed
    reaped_by: str | None = None  # "supervisor" or "its parent"
    t_end: float | None = None  # seconds after launch; None when it survived
    state: str | None = None  # for survivors: /proc state and wchan
    signals: tuple[str, ...] = ()  # what the supervisor sent it, directly or via its group


@dataclass(frozen=True)
class StopReport:
    """Everything the end-of-run summary and --report-json say."""

    model: str
    argv: tuple[str, ...]
    launch: LaunchRecord
    grace_s: float
    kill_wait_s: float
    vram_timeout_s: float
    reason: str
    requested: bool
    ready: bool
    time_to_ready_s: float | None
    started_wall: float
    t0_monotonic: float
    duration_s: float
    stop_duration_s: float | None
    tree_gone_t: float | None  # seconds after launch when the last process was reaped
    vllm_exit: int | None
    vllm_exit_desc: str
    escalated: bool
    signals: tuple[SignalEvent, ...]
    processes: tuple[ProcessEnd, ...]
    survivors: tuple[ProcessEnd, ...]
    vram: VramVerdict
    exit_code: int
    exit_meaning: str
    log_notes: tuple[str, ...] = field(default=())
    log: Any = None  # logclass.LogVerdict
    leftovers_removed: tuple[str, ...] = ()
    leftovers_unattributed: tuple[str, ...] = ()
    engine_died: str | None = None
    # An unrequested end while serving, by how it was found: exit (vLLM's main process
    # ended by itself), engine-gone, health, hung, log.
    engine_death_reason: str | None = None
    diagnosis: tuple[str, ...] = ()
    hang: dict[str, Any] | None = None  # a hung engine's diagnosis (processes, stacks)
    probe: dict[str, Any] | None = None  # the progress probe's last result
    drain: dict[str, Any] | None = None  # requests in flight at a requested stop
    env_removed: tuple[str, ...] = ()
    restarts: tuple[dict[str, Any], ...] = ()
    # destination ("stdout", "stderr", "log file") -> what never reached it, and why
    output_lost: dict[str, OutputLoss] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

