"""Plain frozen records: what was launched, what the tree looked like, how it ended."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class State(enum.Enum):
    """Lifecycle states (docs/architecture.md has the diagram)."""

    LAUNCHING = "launching"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    KILLING = "killing"
    AWAITING_VRAM = "awaiting-vram"
    DONE = "done"


@dataclass(frozen=True)
class ProcId:
    """A process identity that survives PID reuse: (pid, create_time)."""

    pid: int
    create_time: float


@dataclass(frozen=True)
class ProcInfo:
    """One process as read from /proc at one moment."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    create_time: float
    name: str
    cmdline: str
    state: str
    rss_bytes: int
    cpu_ticks: int = 0  # utime + stime, in clock ticks

    @property
    def ident(self) -> ProcId:
        """The (pid, create_time) identity."""
        return ProcId(self.pid, self.create_time)

    @property
    def title(self) -> str:
        """The process title as `ps -o args` shows it, else its comm."""
        return self.cmdline or self.name


@dataclass(frozen=True)
class LaunchRecord:
    """What was started: argv, pid/pgid/sid and the wall/monotonic start times."""

    argv: tuple[str, ...]
    pid: int
    pgid: int
    sid: int
    create_time: float
    started_wall: float


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
class GpuUse:
    """Memory one process holds on one GPU, as the probe saw it."""

    gpu: int
    uuid: str
    pid: int | None
    used_mib: float | None
    ours: bool
    name: str = ""
    user: str = ""


@dataclass(frozen=True)
class VramVerdict:
    """The GPU outcome of a stop: released, held, unattributable or unavailable."""

    status: str
    detail: str
    waited_s: float = 0.0
    holders: tuple[GpuUse, ...] = ()
    per_gpu: tuple[dict[str, Any], ...] = ()
    peak_by_process: tuple[dict[str, Any], ...] = ()
    timed_out: bool = False
    released_t: float | None = None  # seconds after launch when seen released


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
    diagnosis: tuple[str, ...] = ()
    env_removed: tuple[str, ...] = ()
    restarts: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)
