"""The supervisor's side of its instance record: written at launch, updated as the run goes,
finished after the stop; and the two files beside it that `vllm-supervise stop` exchanges
with a live supervisor (the stop request in, the stop report out)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from vllm_supervisor.host import identity
from vllm_supervisor.host.procinfo import LaunchRecord, ProcId
from vllm_supervisor.instances.records import (
    MAX_BYTES,
    Budget,
    GpuEntry,
    InstanceRecord,
    ProcRef,
    VllmRef,
    is_finite_number,
    write_json_atomic,
    write_record,
)
from vllm_supervisor.instances.statedir import instance_lock_path, unlock_and_remove


class Registry:
    """The record a running supervisor keeps for `status`, `stop` and `cleanup`.

    It holds the current InstanceRecord and rewrites the file on every change; OSError
    from a write propagates (the supervisor decides whether that matters). LOCK, the fd
    holding the name's instance lock (commands.claim), stays open until finish(): the
    kernel then shows this process as the name's live supervisor."""

    def __init__(self, d: Path, name: str, wall: Callable[[], float] = time.time,
                 lock: int | None = None):
        self.dir, self.name = Path(d), name
        self.path = self.dir / f"{name}.json"
        self.record: InstanceRecord | None = None
        self._wall = wall
        self._lock = lock

    def launched(self, *, supervisor: ProcId, vllm: LaunchRecord, model: str, port: int,
                 url: str, gpus: dict[str, tuple[int | None, float | None]], grace_s: float,
                 kill_wait_s: float, vram_timeout_s: float, vram_tolerance_mib: float,
                 tmpdir: str | None) -> None:
        """Write the first record, state "starting"."""
        entries = tuple(GpuEntry(u, idx, None if base is None else float(base), False)
                        for u, (idx, base) in sorted(gpus.items()))
        self._write(InstanceRecord(
            name=self.name, boot_id=identity.BOOT_ID,
            supervisor=ProcRef(supervisor.pid, supervisor.start_ticks, ""),
            vllm=VllmRef(vllm.pid, vllm.pgid, vllm.sid, vllm.start_ticks),
            model=model, port=port, url=url, argv=tuple(vllm.argv), state="starting",
            started_wall=round(vllm.started_wall, 3), updated_wall=self._now(),
            budget=Budget(float(grace_s), float(kill_wait_s), float(vram_timeout_s),
                          float(vram_tolerance_mib)),
            tmpdir=tmpdir, gpus=entries))

    def update(self, *, state: str | None = None, tree: list[tuple[ProcId, str]] | None = None,
               shm: list[str] | None = None, gpus_used: set[str] | None = None,
               stop_reason: str | None = None, ready_wall: float | None = None,
               probe: str | None = None) -> None:
        """Replace the given fields (None leaves one as it is) and rewrite the record."""
        rec = self._held()
        changes: dict = {"updated_wall": self._now()}
        if state is not None:
            changes["state"] = state
        if tree is not None:
            changes["tree"] = tuple(ProcRef(i.pid, i.start_ticks, title) for i, title in tree)
        if shm is not None:
            changes["shm"] = tuple(sorted(set(shm)))
        if gpus_used is not None:
            changes["gpus"] = mark_used(rec.gpus, gpus_used)
        if stop_reason is not None:
            changes["stop_reason"] = stop_reason
        if ready_wall is not None:
            changes["ready_wall"] = round(ready_wall, 3)
        if probe is not None:  # the progress probe's last result
            changes["probe"], changes["probe_wall"] = probe[:300], round(self._now(), 3)
        self._write(dataclasses.replace(rec, **changes))

    def stop_request(self) -> float | None:
        """The --grace a `vllm-supervise stop` left for this run, read once and removed."""
        return take_stop_request(self.dir, self.name)

    def finish(self, report: dict, text: str, complete: bool) -> None:
        """Leave the report (and its text) for `stop`; drop the record after a complete
        stop, else mark it "incomplete-stop" with the exit code and its meaning. The
        instance lock goes last, whatever fails before."""
        try:
            write_report(self.dir, self.name, report | {"text": text})
            if complete:
                self.path.unlink(missing_ok=True)
            elif self.record is not None:  # None: the launch failed before any record
                code, meaning = report.get("exit_code"), report.get("exit_meaning")
                self._write(dataclasses.replace(
                    self.record, state="incomplete-stop", updated_wall=self._now(),
                    exit_code=int(code) if _exit_status(code) else None,
                    exit_meaning=meaning if isinstance(meaning, str) else None))
        finally:
            self._release(complete)

    def _release(self, complete: bool) -> None:
        """Let the instance lock go. After a complete stop its file goes too (names like
        "<model>-<port>" would otherwise pile up), removed while still held so that no
        claimer can be left holding a lock on a removed file (statedir._lock retries)."""
        fd, self._lock = self._lock, None
        if fd is None:
            return
        if complete:
            unlock_and_remove(fd, instance_lock_path(self.dir, self.name))
        else:
            os.close(fd)

    def _held(self) -> InstanceRecord:
        if self.record is None:
            raise RuntimeError(f"instance {self.name}: record updated before launched()")
        return self.record

    def _write(self, rec: InstanceRecord) -> None:
        # Held first: if this write fails, the next one still carries every change.
        self.record = rec
        write_record(self.dir, rec)

    def _now(self) -> float:
        return round(self._wall(), 3)


def mark_used(gpus: tuple[GpuEntry, ...], used: set[str]) -> tuple[GpuEntry, ...]:
    """GPUS with those in USED marked used (never unmarked); a UUID not among them (no
    baseline was taken for it) joins with index and baseline unknown."""
    known = {g.uuid for g in gpus}
    out = [dataclasses.replace(g, used=True) if g.uuid in used else g for g in gpus]
    out += [GpuEntry(u, None, None, True) for u in sorted(used - known)]
    return tuple(out)


def _exit_status(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255


# -- beside the record: the stop request and the stop report ------------------------
def report_path(d: Path, name: str) -> Path:
    """Where NAME's supervisor leaves its stop report."""
    return Path(d) / f"{name}.report.json"


def write_report(d: Path, name: str, report: dict) -> None:
    """Leave NAME's stop report for `vllm-supervise stop`."""
    write_json_atomic(report_path(d, name), report)


def read_report(d: Path, name: str) -> dict | None:
    """NAME's last stop report, or None when there is none or it cannot be read."""
    return _read_small_json(report_path(d, name), unlink=False)


def write_stop_request(d: Path, name: str, grace: float) -> None:
    """Ask NAME's supervisor for this grace in the stop it is about to be sent."""
    write_json_atomic(Path(d) / f"{name}.stop.json", {"grace": grace, "by": os.getpid()})


def take_stop_request(d: Path, name: str) -> float | None:
    """The grace a `stop` left for NAME, read once and removed; None unless it is a finite
    number >= 0."""
    data = _read_small_json(Path(d) / f"{name}.stop.json", unlink=True)
    grace = data.get("grace") if data else None
    return float(grace) if is_finite_number(grace) and grace >= 0 else None


def _read_small_json(path: Path, unlink: bool) -> dict | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        if unlink:  # once only, even when it is unusable
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    try:
        data = json.loads(raw) if len(raw) <= MAX_BYTES else None
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
