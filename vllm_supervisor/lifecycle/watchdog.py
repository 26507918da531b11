"""The startup watchdog: a start that makes no progress at all is a hang, not a slow load.

Progress is any of: new log output, growth of the tree's memory (RSS) or of the GPU memory
its processes hold, or CPU use above a floor (a process busy loading counts; a few idle
threads ticking do not)."""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_FLOOR = 0.05  # of one core, averaged since the last progress
GROWTH_BYTES = 1 << 20


class StallWatch:
    """Fed one sample per tick while starting; says when nothing moved for STALL_S."""

    def __init__(self, stall_s: float, now: float):
        self.stall_s = stall_s
        self.last_progress = now
        self._log = 0
        self._rss = 0
        self._vram = 0.0
        self._cpu_at_progress: int | None = None
        self.last_kind = "launch"

    def feed(self, now: float, log_bytes: int, rss: int, vram_mib: float, cpu_ticks: int):
        """Record a sample; returns True when the start has stalled."""
        kind = None
        if log_bytes > self._log:
            kind = "log output"
        elif rss > self._rss + GROWTH_BYTES:
            kind = "memory growth"
        elif vram_mib > self._vram + 1:
            kind = "GPU memory growth"
        elif self._cpu_at_progress is not None and now > self.last_progress:
            busy = (cpu_ticks - self._cpu_at_progress) / CLK_TCK / (now - self.last_progress)
            if busy > CPU_FLOOR:
                kind = "CPU use"
        self._log = max(self._log, log_bytes)
        self._rss = max(self._rss, rss)
        self._vram = max(self._vram, vram_mib)
        if kind is not None or self._cpu_at_progress is None:
            self.last_progress, self.last_kind = now, kind or "launch"
            self._cpu_at_progress = cpu_ticks
            return False
        return now - self.last_progress >= self.stall_s
