"""Operating instances from their records: status, stop, and cleanup of orphans."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field

from vllm_supervisor.gpu.ledger import VramLedger
from vllm_supervisor.host import identity, ownership, takeover
from vllm_supervisor.host.leftovers import Leftovers
from vllm_supervisor.host.procinfo import ProcId, ProcInfo
from vllm_supervisor.host.proctree import read_proc, user_of
from vllm_supervisor.instances.records import (
    UNRECORDED_BUDGET,
    Budget,
    InstanceRecord,
    removable_tmpdir,
)
from vllm_supervisor.instances.registry import read_report, report_path, write_stop_request
from vllm_supervisor.instances.statedir import instance_lock_path


def supervisor_alive(rec: InstanceRecord, state_dir=None) -> bool:
    """Is the record's supervisor still that very process, on this boot, and does the
    kernel show it holding the instance's lock (proof no file edit can fake)? Without
    STATE_DIR only the identity is checked."""
    info = identity.alive(rec.supervisor.ident, boot=rec.boot_id)
    if info is None:
        return False
    if state_dir is None:
        return True
    return info.pid in ownership.lock_holders(str(instance_lock_path(state_dir, rec.name)))


@dataclass
class Tree:
    """A tree to show or stop: from a record, or found orphaned."""

    label: str
    procs: list[ProcInfo]
    target: takeover.Target
    record: InstanceRecord | None = None
    main: int | None = None
    files: list[str] = field(default_factory=list)


def tree_of_record(rec: InstanceRecord, all_users: bool = False) -> Tree:
    """The live part of a record's tree, as far as the kernel proves it: processes whose
    environment carries the instance token naming the record's supervisor; recorded
    identities only inside the recorded session and with kernel evidence besides; the
    group only while its leader carries the token. Nothing counts from another boot."""
    tmp = removable_tmpdir(rec)
    files = [str(tmp)] if tmp is not None else []
    if rec.boot_id != identity.BOOT_ID:
        # Its PIDs, groups and tick counts name other processes now, and /dev/shm was
        # emptied; only its private TMPDIR may be left on a disk-backed /tmp.
        return Tree(rec.name, [], takeover.Target(None), rec, None, files)
    owner = rec.supervisor.ident
    v = rec.vllm
    leader = v.ident if identity.alive(v.ident) and ownership.carries_token(v.pid, owner) \
        else None
    # Recorded identities (the file's word) count only inside the recorded session, and only
    # with the kernel's word too: a token carrier in that session, or a VLLM::* title (the
    # titled processes overwrite their /proc/PID/environ, token included).
    carrier = leader is not None or _session_has_carrier(v.sid, owner)
    tracked = {i for i in {t.ident for t in rec.tree} | {v.ident}
               if (info := identity.alive(i)) and info.sid == v.sid
               and (carrier or ownership.carries_title(info))}
    target = takeover.Target(leader, frozenset(tracked), owner, all_users)
    procs = [p for p in (identity.alive(i, cmdline=True) for i in takeover.left_of_tree(target))
             if p is not None]
    return Tree(rec.name, sorted(procs, key=lambda p: p.pid), target, rec, v.pid, files)


def _session_has_carrier(sid: int, owner: ProcId) -> bool:
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = read_proc(int(name), cmdline=False)
            if info and info.sid == sid and info.state != "Z" and \
                    ownership.carries_token(info.pid, owner):
                return True
    return False


def stop_tree(tree: Tree, budget: Budget, probe) -> dict:
    """The supervisor's stop sequence, without the supervisor: SIGTERM (vLLM's main
    process when it lives), BUDGET's grace, SIGKILL of what is proven the tree's, then the
    GPU check and the leftover files the tree was seen using. Returns a report dict."""
    t0 = time.monotonic()
    idents = {p.ident for p in tree.procs}
    shm = Leftovers(private_tmp=False)
    shm.note([p.pid for p in tree.procs])  # its /dev/shm files, by path and inode, first
    target = dataclasses.replace(tree.target, tracked=tree.target.tracked | idents)
    gone = takeover.finish_stop(target, budget.grace_s, budget.kill_wait_s,
                                term=tree.main if tree.main else -1)
    left = takeover.left_of_tree(target)
    report = {"name": tree.label, "stopped_pids": sorted(i.pid for i in idents),
              "complete": gone, "survivors": sorted(i.pid for i in left),
              "stop_s": round(time.monotonic() - t0, 3)}
    report["vram"] = vram_after(tree, probe, budget) if gone else "not checked"
    if gone:
        takeover.remove_files(tree.files)
        report["removed"] = sorted(set(tree.files) | set(shm.remove()))
    return report


def vram_after(tree: Tree, probe, budget: Budget = UNRECORDED_BUDGET) -> str:
    """The GPU verdict once the tree is gone, judged against the record's baselines with
    the instance's own tolerance, waiting up to BUDGET's VRAM timeout for the release."""
    ledger = VramLedger(probe, budget.vram_tolerance_mib)
    if ledger.unavailable:
        return f"unavailable: {ledger.unavailable}"
    gpus = tree.record.gpus if tree.record else ()
    ledger.baseline = {g.uuid: g.baseline_mib for g in gpus}
    ledger.index = {g.uuid: g.index for g in gpus if g.index is not None}
    ledger.used_by_tree = {g.uuid for g in gpus if g.used}
    titles = {p.pid: p.title for p in tree.procs}
    deadline = time.monotonic() + budget.vram_timeout_s
    while True:
        done, verdict = ledger.check(titles)
        if done or time.monotonic() >= deadline:
            return f"{verdict.status}: {verdict.detail}"
        time.sleep(0.05)


def ask_supervisor_to_stop(state_dir, rec: InstanceRecord, grace: float | None,
                           timeout_s: float, poll_s: float = 0.05) -> dict | None:
    """SIGTERM the live supervisor (leaving --grace for it) and wait for its report."""
    if grace is not None:
        write_stop_request(state_dir, rec.name, grace)
    path = report_path(state_dir, rec.name)
    before = path.stat().st_mtime_ns if path.exists() else 0
    if identity.signal_process(rec.supervisor.ident, signal.SIGTERM) != "sent":
        return None  # gone in between: the caller finishes the stop from the record
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not supervisor_alive(rec, state_dir):
            break
        time.sleep(poll_s)
    if path.exists() and path.stat().st_mtime_ns > before:
        return read_report(state_dir, rec.name)
    return None


def describe(tree: Tree, probe) -> list[dict]:
    """One row per process: pid, title, user, age, VRAM per GPU, listening ports."""
    vram: dict[int, list[str]] = {}
    if probe.available() is None:
        for r in probe.read():
            for pid, mib in r.procs:
                vram.setdefault(pid, []).append(
                    f"GPU {r.index} {'N/A' if mib is None else f'{mib / 1024:.1f} GiB'}")
    now = time.time()
    return [{"pid": p.pid, "title": p.title[:60], "user": user_of(p.pid),
             "age_s": round(now - p.create_time), "rss_mib": round(p.rss_bytes / 2**20),
             "vram": vram.get(p.pid, []), "ports": _ports(p.pid)} for p in tree.procs]


def _ports(pid: int) -> list[int]:
    from vllm_supervisor.host.preflight import listening_ports

    return listening_ports(pid)


__all__ = ["Tree", "ask_supervisor_to_stop", "describe", "stop_tree", "supervisor_alive",
           "tree_of_record", "vram_after"]
