"""Plain frozen records of processes: identities, /proc readings, what was launched."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProcId:
    """A process identity that survives PID reuse: the PID and the process's start time in
    clock ticks since boot (field 22 of /proc/PID/stat), compared exactly."""

    pid: int
    start_ticks: int


@dataclass(frozen=True)
class ProcInfo:
    """One process as read from /proc at one moment."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    start_ticks: int
    create_time: float  # wall time, for display only: identity is start_ticks
    name: str
    cmdline: str
    state: str
    rss_bytes: int
    cpu_ticks: int = 0  # utime + stime, in clock ticks

    @property
    def ident(self) -> ProcId:
        """The (pid, start_ticks) identity."""
        return ProcId(self.pid, self.start_ticks)

    @property
    def title(self) -> str:
        """The process title as `ps -o args` shows it, else its comm."""
        return self.cmdline or self.name


@dataclass(frozen=True)
class LaunchRecord:
    """What was started: argv, pid/pgid/sid, its identity and the wall start time."""

    argv: tuple[str, ...]
    pid: int
    pgid: int
    sid: int
    start_ticks: int
    create_time: float
    started_wall: float

    @property
    def ident(self) -> ProcId:
        """The launched process's identity."""
        return ProcId(self.pid, self.start_ticks)
