"""Time, injected: monotonic for deadlines, wall time for reports."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """What the supervisor needs of a clock."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The real clock."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)
