"""The GPU probe protocol, its readings, and a 'no GPU' probe that says why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment: memory in use and the processes NVML lists on it."""

    index: int
    uuid: str
    used_mib: float | None  # None: N/A (MIG) or the query failed
    total_mib: float | None
    procs: tuple[tuple[int, float | None], ...]  # (pid, MiB or None when N/A)
    error: str | None = None


def unlisted_mib(r: GpuReading) -> float | None:
    """Memory in use on R that no listed process accounts for (driver, stale handles), or
    None when it cannot be told (N/A readings)."""
    if r.used_mib is None or any(mib is None for _, mib in r.procs):
        return None
    return r.used_mib - sum(mib for _, mib in r.procs)


class GpuProbe(Protocol):
    """What the supervisor needs from a GPU backend."""

    name: str

    def available(self) -> str | None:
        """None when usable, else why not (one line)."""

    def read(self) -> list[GpuReading]:
        """Every in-scope GPU now."""


class NoGpuProbe:
    """No GPU to verify: the stop completes and the report says VRAM was not verified."""

    name = "none"

    def __init__(self, why: str):
        self.why = why

    def available(self) -> str | None:
        """Always unavailable, with the reason given."""
        return self.why

    def read(self) -> list[GpuReading]:
        """Nothing to read."""
        return []
