"""Operating instances from their records: status, stop, and cleanup of orphans."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from vllm_supervisor.gpu.ledger import VramLedger
from vllm_supervisor.host import identity, proctree
from vllm_supervisor.host.guard import finish_stop, left_of_tree, remove_files
from vllm_supervisor.host.leftovers import Leftovers
from vllm_supervisor.host.procinfo import ProcId, ProcInfo
from vllm_supervisor.host.proctree import user_of
from vllm_supervisor.instances.records import UNRECORDED_BUDGET, Budget, InstanceRecord
from vllm_supervisor.instances.registry import read_report, report_path, write_stop_request


def supervisor_alive(rec: InstanceRecord) -> bool:
    """Is the record's supervisor still that very process, on this boot?"""
    return identity.alive(rec.supervisor.ident, boot=rec.boot_id) is not None


@dataclass
class Tree:
    """A tree to show or stop: from a record, or found orphaned."""

    label: str
    procs: list[ProcInfo]
    pgid: int = 0
    sid: int = 0
    record: InstanceRecord | None = None
    main: int | None = None
    files: list[str] = field(default_factory=list)


def tree_of_record(rec: InstanceRecord) -> Tree:
    """The live part of a record's tree. Group and session members count only while the
    session's leader is gone or is still the record's vLLM (a reused PID would make an
    unrelated session look like ours); nothing counts from another boot."""
    v = rec.vllm
    if rec.boot_id != identity.BOOT_ID:
        # Its PIDs, groups and tick counts name other processes now, and /dev/shm was
        # emptied; only its private TMPDIR may be left on a disk-backed /tmp.
        return Tree(rec.name, [], 0, 0, rec, None, [rec.tmpdir] if rec.tmpdir else [])
    idents = {t.ident for t in rec.tree} | {v.ident}
    leader_gone = proctree.read_proc(v.sid, cmdline=False) is None
    trusted = leader_gone or identity.current(ProcId(v.sid, v.start_ticks),
                                              boot=rec.boot_id) is not None
    pgid, sid = (v.pgid, v.sid) if trusted else (0, 0)
    live = set(left_of_tree(pgid, sid, idents))
    procs = [p for p in (identity.alive(i, cmdline=True, boot=rec.boot_id) for i in live)
             if p is not None]
    files = ([rec.tmpdir] if rec.tmpdir else []) + list(rec.shm)
    return Tree(rec.name, sorted(procs, key=lambda p: p.pid), pgid, sid, rec, v.pid, files)


def stop_tree(tree: Tree, budget: Budget, probe) -> dict:
    """The supervisor's stop sequence, without the supervisor: SIGTERM (vLLM's main
    process when it lives), BUDGET's grace, SIGKILL of the group and every tracked process,
    then the GPU check and the leftover files. Returns a report dict."""
    t0 = time.monotonic()
    idents = {p.ident for p in tree.procs}
    shm = Leftovers(private_tmp=False)
    shm.note([p.pid for p in tree.procs])  # its /dev/shm files, by path and inode, first
    gone = finish_stop(tree.pgid, tree.sid, idents, budget.grace_s, budget.kill_wait_s,
                       term=tree.main if tree.main else -1)
    left = left_of_tree(tree.pgid, tree.sid, idents)
    report = {"name": tree.label, "stopped_pids": sorted(i.pid for i in idents),
              "complete": gone, "survivors": sorted(i.pid for i in left),
              "stop_s": round(time.monotonic() - t0, 3)}
    report["vram"] = vram_after(tree, probe, budget) if gone else "not checked"
    if gone:
        remove_files(tree.files)
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
                           timeout_s: float) -> dict | None:
    """SIGTERM the live supervisor (leaving --grace for it) and wait for its report."""
    if grace is not None:
        write_stop_request(state_dir, rec.name, grace)
    path = report_path(state_dir, rec.name)
    before = path.stat().st_mtime if path.exists() else 0
    proctree.signal_process(rec.supervisor.ident, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not supervisor_alive(rec):
            break
        time.sleep(0.05)
    if path.exists() and path.stat().st_mtime > before:
        return read_report(state_dir, rec.name)
    return None


def find_orphans(all_users: bool) -> list[Tree]:
    """vLLM processes (titles VLLM::*, or a `vllm serve` command line, and the session they
    share) that no live supervisor is running, grouped by session."""
    supervised = _supervised_pids()
    by_sid: dict[int, list[ProcInfo]] = {}
    sessions: set[int] = set()
    everyone = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in supervised:
            continue
        info = proctree.read_proc(int(name))
        if info is None or info.state == "Z":
            continue
        everyone.append(info)
        if not all_users and _uid(info.pid) != os.getuid():
            continue
        if _looks_like_vllm(info):
            sessions.add(info.sid)
    for info in everyone:
        if info.sid in sessions and (all_users or _uid(info.pid) == os.getuid()):
            by_sid.setdefault(info.sid, []).append(info)
    return [Tree(f"orphaned session {sid}", sorted(ps, key=lambda p: p.pid), 0, sid)
            for sid, ps in sorted(by_sid.items())]


def _looks_like_vllm(info: ProcInfo) -> bool:
    args = info.cmdline.split()
    serve = any(os.path.basename(a) == "vllm" for a in args[:3]) and "serve" in args[:4]
    return info.name.startswith("VLLM::") or info.cmdline.startswith("VLLM::") or serve


def _supervised_pids() -> set[int]:
    """Every process under a live supervisor (its own descendants), and the supervisor."""
    out: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        info = proctree.read_proc(int(name))
        if info and _is_supervisor(info.cmdline.split()):
            out.add(info.pid)
            out.update(p.pid for p in proctree.descendants(info.pid))
    return out


def _is_supervisor(args: list[str]) -> bool:
    """`vllm-supervise serve|demo ...` or `python -m vllm_supervisor serve|demo ...`."""
    for i, a in enumerate(args):
        if os.path.basename(a) == "vllm-supervise" or (
                a == "vllm_supervisor" and i > 0 and args[i - 1] == "-m"):
            return any(x in ("serve", "demo") for x in args[i + 1:])
    return False


def _uid(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


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


__all__ = ["Tree", "ask_supervisor_to_stop", "describe", "find_orphans", "stop_tree",
           "supervisor_alive", "tree_of_record", "vram_after"]
