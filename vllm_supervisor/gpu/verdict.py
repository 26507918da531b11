"""Plain frozen records of the GPU outcome: who holds memory, and the verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    released_wall: float | None = None  # the same moment, as wall-clock time
    verdict_wall: float | None = None  # when this verdict was reached (tree gone, checked)
