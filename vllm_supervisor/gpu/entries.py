"""An entry of the GPU reservation table as read (untrusted content; the kernel gives its
owner and whether its lock is held), and the rule for a dead supervisor's entry: it counts
while its tree lives, NVML lists its PIDs, or memory no process lists stays above its level
at admission."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from vllm_supervisor.gpu.probe import GpuReading, unlisted_mib
from vllm_supervisor.host import identity
from vllm_supervisor.host.procinfo import ProcId

VERSION = 1
MAX_TREE = 512
LOADING = "loading"  # admitted, not ready yet: no other load may start on its GPUs


@dataclass(frozen=True)
class Share:
    """One GPU of an entry: FRACTION of TOTAL_MIB, and the memory no process listed on it
    at admission (driver, stale handles), against which a dead entry's GPU is judged."""

    uuid: str
    index: int
    fraction: float
    total_mib: float
    unlisted_mib: float | None = None


@dataclass(frozen=True)
class Entry:
    """One supervisor's claim, as read (untrusted content, kernel-given UID and liveness)."""

    id: str
    uid: int
    live: bool  # its supervisor (or death guard) holds its lock
    name: str
    model: str
    state: str
    supervisor: ProcId
    boot_id: str
    pidns: int
    shares: dict[str, Share]
    tree: tuple[ProcId, ...] = ()
    holders: tuple[int, ...] = ()
    since_wall: float = 0.0
    replaces: str | None = None
    why_kept: str = ""  # for a dead entry that still counts: why

    def describe(self, uuid: str) -> str:
        """'NAME (0.45, ready, pid 123, uid 0)' for one of its GPUs."""
        share = self.shares.get(uuid)
        frac = f"{share.fraction:.2f}" if share else "?"
        who = f"pid {self.supervisor.pid}" if self.live else f"supervisor gone: {self.why_kept}"
        return f"{self.name} ({frac}, {self.state}, {who}, uid {self.uid})"


def pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def with_(entry: Entry, **changes) -> Entry:
    """ENTRY with CHANGES."""
    return replace(entry, **changes)


def parse(eid: str, uid: int, live: bool, d: dict) -> Entry:
    if d.get("version") != VERSION or d.get("id") != eid:
        raise ValueError("another version")
    shares = {}
    for uuid, s in dict(d["gpus"]).items():
        frac = float(s["fraction"])
        if not 0 < frac <= 1:
            raise ValueError("bad fraction")
        unlisted = s.get("unlisted_mib")
        shares[str(uuid)] = Share(str(uuid), int(s["index"]), frac, float(s["total_mib"]),
                                  None if unlisted is None else float(unlisted))
    sup = d["supervisor"]
    tree = tuple(ProcId(int(p), int(t)) for p, t in list(d.get("tree", ()))[:MAX_TREE])
    return Entry(eid, uid, live, str(d.get("name", "?"))[:120], str(d.get("model", ""))[:200],
                 str(d.get("state", "unknown"))[:20], ProcId(int(sup[0]), int(sup[1])),
                 str(d.get("boot_id", "")), int(d.get("pidns", 0)), shares, tree,
                 tuple(int(p) for p in list(d.get("holders", ()))[:MAX_TREE]),
                 float(d.get("since_wall", 0)), d.get("replaces"))


def still_holds(entry: Entry, readings: list[GpuReading], tolerance_mib: float) -> str:
    """Why a dead supervisor's entry still counts ('' when it can be dropped): a process
    of its tree alive (by identity, in our PID namespace) or listed by NVML on its GPUs, or
    memory no process lists above what it was at admission."""
    if entry.boot_id and entry.boot_id != identity.BOOT_ID:
        return ""  # from an earlier boot: nothing of it can be alive
    same_ns = entry.pidns == pidns()
    if same_ns:
        alive = [p.pid for p in (entry.supervisor, *entry.tree) if identity.alive(p)]
        if alive:
            return f"pids {' '.join(map(str, alive[:8]))} of its tree alive"
    elif not _pidns_gone(entry.pidns):
        return "its PID namespace (a container?) still has processes, which we cannot see"
    pids = {p.pid for p in entry.tree} | set(entry.holders)
    for r in readings:
        share = entry.shares.get(r.uuid)
        if share is None:
            continue
        listed = [pid for pid, _ in r.procs if pid in pids] if same_ns else []
        if listed:
            return f"pids {' '.join(map(str, listed))} still hold memory on GPU {r.index}"
        unlisted = unlisted_mib(r)
        if share.unlisted_mib is not None and unlisted is not None \
                and unlisted - share.unlisted_mib > tolerance_mib:
            return (f"GPU {r.index} has {unlisted - share.unlisted_mib:.0f} MiB more that no "
                    "process lists than at its admission")
    return ""


def _pidns_gone(ino: int) -> bool:
    """No process we can see lives in PID namespace INO (False when we cannot tell)."""
    if not ino:
        return False
    unknown = False
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}/ns/pid").st_ino == ino:
                return False
        except PermissionError:
            unknown = True
        except OSError:
            continue
    return not unknown
