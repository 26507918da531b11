"""Knows every process of the tree for the whole run, by (pid, start_ticks).

The supervisor is a child subreaper, so every process the tree ever makes stays a
descendant of the supervisor until it is reaped: walking our own descendants finds them
all, including those that left the process group or session (setsid, double fork).
"""

from __future__ import annotations

from dataclasses import replace

from vllm_supervisor.host.procinfo import ProcId, ProcInfo
from vllm_supervisor.host.proctree import describe_status
from vllm_supervisor.lifecycle.records import ProcessEnd


class TreeTracker:
    """Snapshots of our descendants, and how each process of the tree ended."""

    def __init__(self, host, clock, t0: float, exclude: set[int]):
        self._host = host
        self._clock = clock
        self._t0 = t0
        self.exclude = exclude
        self.seen: dict[ProcId, ProcInfo] = {}
        self.live: dict[ProcId, ProcInfo] = {}
        self.ends: dict[ProcId, ProcessEnd] = {}
        self.sent: dict[ProcId, list[str]] = {}
        self.unseen_reaped: list[tuple[int, str]] = []

    def _now(self) -> float:
        return round(self._clock.monotonic() - self._t0, 4)

    def snapshot(self, titles: bool = True) -> list[ProcInfo]:
        """Walk the tree now; processes that vanished since the last walk are ended. With
        TITLES false, known processes keep their last title and cmdline is not read (a
        dying process's cmdline read can block until its memory is unmapped)."""
        found = self._host.snapshot(self.exclude, titles)
        infos = [self._keep_title(i) for i in found]
        current = {i.ident: i for i in infos}
        for ident, info in self.live.items():
            if ident not in current and ident not in self.ends:
                self.ends[ident] = self._end(info, "gone", None, "its parent")
        self.seen.update(current)
        self.live = current
        return infos

    def _keep_title(self, info: ProcInfo) -> ProcInfo:
        """A zombie's cmdline reads empty: keep the title it had while alive."""
        old = self.seen.get(info.ident)
        if not info.cmdline and old is not None and old.cmdline:
            return replace(info, cmdline=old.cmdline)
        return info

    def on_reaped(self, pid: int, status: int) -> str:
        """Record a child we reaped; returns a description of how it ended."""
        outcome, code, text = describe_status(status)
        match = [i for i in self.live if i.pid == pid and i not in self.ends]
        if not match:
            self.unseen_reaped.append((pid, text))
            return text
        ident = match[0]
        self.ends[ident] = self._end(self.live.pop(ident), outcome, code, "supervisor")
        return text

    def note_signal(self, infos: list[ProcInfo], signame: str, pgid: int | None = None) -> None:
        """Remember that SIGNAME went to these processes (or to everyone in PGID)."""
        for info in infos:
            if pgid is None or info.pgid == pgid:
                self.sent.setdefault(info.ident, []).append(signame)

    def mark_survivors(self, infos: list[ProcInfo]) -> list[ProcessEnd]:
        """Processes still alive after SIGKILL and the kill wait, with state and wchan."""
        out = []
        for info in infos:
            now = self._host.read_proc(info.pid, cmdline=False) or info
            end = self._end(info, "survived", None, None, t_end=None,
                            state=f"{now.state} (wchan {self._host.wchan(info.pid)})")
            self.ends[info.ident] = end
            out.append(end)
        return out

    def _end(self, info: ProcInfo, outcome: str, code: int | None, by: str | None,
             t_end: float | None | bool = True, state: str | None = None) -> ProcessEnd:
        return ProcessEnd(
            pid=info.pid, create_time=info.create_time, title=info.title, pgid=info.pgid,
            sid=info.sid, outcome=outcome, code=code, reaped_by=by,
            t_end=self._now() if t_end is True else t_end, state=state,
            signals=tuple(self.sent.get(info.ident, ())),
        )

    def titles(self) -> dict[int, str]:
        """pid -> title for every process ever seen in the tree."""
        return {i.pid: info.title for i, info in self.seen.items()}

    def ended(self) -> list[ProcessEnd]:
        """Every ended process, in order of its end."""
        return sorted(self.ends.values(), key=lambda e: (e.t_end is None, e.t_end or 0, e.pid))

    def engine_gone(self) -> ProcessEnd | None:
        """The end of a VLLM::EngineCore process, if one ended ('ps' may truncate the
        title, hence the prefix)."""
        return next((e for e in self.ends.values() if "EngineCor" in e.title), None)
