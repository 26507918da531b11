"""The CLI's side of instance records: claim a name before serving, release it after;
and the `status`, `stop` and `cleanup` commands' logic (data in, data out)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from vllm_supervisor.errors import ExitCode, SupervisorError
from vllm_supervisor.instances import ops, orphans
from vllm_supervisor.instances.records import (
    InstanceRecord,
    RecordError,
    drop_record,
    read_record,
    scan,
    stop_budget,
)
from vllm_supervisor.instances.registry import Registry, read_report
from vllm_supervisor.instances.statedir import (
    check_name,
    default_name,
    existing_state_dir,
    instance_lock_path,
    op_locked,
    open_state_dir,
    try_lock,
    valid_name,
)


def claim(state_dir, name, cfg, reclaim: bool, probe, ui, wait_s: float = 0.0) -> Registry:
    """Take NAME for this supervisor's whole life: its instance lock (exactly one
    supervisor per name, however close two starts are), held by the Registry until
    finish(). With --reclaim, stop a dead predecessor's tree first. WAIT_S: how long to
    wait for a lock that a stopping supervisor (and its death guard) still hold."""
    name = check_name(name or default_name(cfg.model, cfg.health_port))
    d = open_state_dir(state_dir)
    deadline = time.monotonic() + wait_s
    while (lock := try_lock(instance_lock_path(d, name))) is None \
            and time.monotonic() < deadline:
        time.sleep(NAME_POLL_S)
    if lock is None:
        raise SupervisorError(f"instance {name!r} is already running",
                              f"pick another --name, or `vllm-supervise stop {name}`",
                              ExitCode.START_FAILED)
    try:
        with op_locked(d, name):  # a `stop` or `cleanup` of a dead predecessor: after it
            path = d / f"{name}.json"
            if path.exists() or path.is_symlink():
                try:
                    rec = read_record(path)
                except RecordError as e:
                    ui.event(f"replacing an unusable record: {e.one_line()}", "warn")
                    rec = None
                if rec is not None:
                    _take_over(d, rec, reclaim, probe, ui)
        return Registry(d, name, lock=lock)
    except BaseException:
        os.close(lock)
        raise


NAME_POLL_S = 0.002


def _take_over(d: Path, rec: InstanceRecord, reclaim: bool, probe, ui) -> None:
    name = rec.name
    if ops.supervisor_alive(rec, d):  # one that holds no lock: another vllm-supervise
        raise SupervisorError(f"instance {name!r} is already running (supervisor pid "
                              f"{rec.supervisor.pid})",
                              "pick another --name, or `vllm-supervise stop " + name + "`",
                              ExitCode.START_FAILED)
    tree = ops.tree_of_record(rec)
    if not tree.procs:
        return  # a stale record: its tree is gone
    if not reclaim:
        pids = " ".join(str(p.pid) for p in tree.procs)
        raise SupervisorError(f"instance {name!r}: its supervisor died and left its tree "
                              f"running (pids {pids})",
                              "pass --reclaim to stop it first, or `vllm-supervise stop "
                              f"{name}`", ExitCode.START_FAILED)
    ui.event(f"reclaiming {name}: stopping the tree its dead supervisor left")
    result = ops.stop_tree(tree, stop_budget(rec), probe)
    if not result["complete"]:
        raise SupervisorError(f"could not reclaim {name}: pids {result['survivors']} "
                              "survived SIGKILL", None, ExitCode.SURVIVED_SIGKILL)


def release(registry: Registry, report, text: str) -> None:
    """After the run: leave the report and its TEXT, drop the record if the stop was
    complete (REPORT: the lifecycle's StopReport)."""
    complete = not report.survivors and not (report.vram and report.vram.timed_out)
    try:
        registry.finish(report.to_dict() | {"exit_code": report.exit_code,
                                            "exit_meaning": report.exit_meaning},
                        text, complete)
    except OSError:
        pass  # the run is over; a full state dir leaves a stale record for `status`


# -- status -------------------------------------------------------------------------
def status_rows(state_dir, name: str | None, probe) -> tuple[list[dict], list[str]]:
    """One dict per instance, and one message per unreadable record. Changes nothing on
    disk: a missing state dir is no instances."""
    d = existing_state_dir(state_dir)
    rows, problems = [], []
    for _path, rec in scan(d) if d is not None else []:
        if isinstance(rec, RecordError):
            problems.append(rec.one_line())
            continue
        if name and rec.name != name:
            continue
        rows.append(_status_row(d, rec, probe))
    if name and not rows and not problems:
        raise SupervisorError(f"no instance named {name!r}", "see `vllm-supervise status`",
                              ExitCode.USAGE)
    return rows, problems


def _status_row(d: Path, rec: InstanceRecord, probe) -> dict:
    tree = ops.tree_of_record(rec)
    sup = ops.supervisor_alive(rec, d)
    state = rec.state
    if not sup and state != "incomplete-stop":
        state = "orphaned (supervisor gone)" if tree.procs else "stale (nothing left)"
    return {"name": rec.name, "model": rec.model, "url": rec.url, "state": state,
            "supervisor_alive": sup, "uptime_s": round(time.time() - rec.started_wall),
            "probe": rec.probe, "probe_age_s": None if rec.probe_wall is None
            else round(time.time() - rec.probe_wall, 1),
            "processes": ops.describe(tree, probe)}


def render_status(rows: list[dict], problems: list[str]) -> str:
    """A plain table (rich colours it on a terminal)."""
    out = []
    if not rows:
        out.append("no supervised instances")
    for r in rows:
        out.append(f"{r['name']}  {r['state']}  {r['model']}  {r['url']}  up "
                   f"{_age(r['uptime_s'])}")
        if r.get("probe"):
            out.append(f"    probe: {r['probe']} ({_age(r['probe_age_s'])} ago)")
        for p in r["processes"]:
            vram = ", ".join(p["vram"]) or "-"
            ports = ",".join(map(str, p["ports"])) or "-"
            out.append(f"    pid {p['pid']:<7} {p['title'][:40]:40} {p['rss_mib']:>7} MiB  "
                       f"VRAM {vram}  ports {ports}")
    out += [f"warning: {m}" for m in problems]
    return "\n".join(out) + "\n"


def _age(s: float) -> str:
    if s >= 3600:
        return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"
    return f"{s // 60:.0f}m{s % 60:02.0f}s"


# -- stop ---------------------------------------------------------------------------
def stop(state_dir, names: list[str], all_: bool, grace: float | None, probe,
         poll_s: float = 0.05) -> list[dict]:
    """Stop each named instance: through its live supervisor, or from its record. A name
    with nothing recorded changes nothing on disk. POLL_S: how often to look whether a
    live supervisor has finished (a --replace looks more often)."""
    d = existing_state_dir(state_dir)
    found = {r.name: r for _p, r in (scan(d) if d else []) if isinstance(r, InstanceRecord)}
    if all_:
        names = sorted(found)
    results = []
    for name in names:
        if name not in found:
            why = _why_not_found(d, name)
            results.append({"name": name, "error": why, "missing": why == NOT_FOUND})
            continue
        with op_locked(d, name):
            results.append(_stop_one(d, name, grace, probe, poll_s))
    return results


NOT_FOUND = "no such instance (already stopped?)"


def _why_not_found(d: Path | None, name: str) -> str:
    if not valid_name(name):
        return "not an instance name"  # never a path: nothing outside d is looked at
    path = d / f"{name}.json" if d is not None else None
    try:
        if path is not None and (path.exists() or path.is_symlink()):
            read_record(path)
    except RecordError as e:
        return e.one_line()
    return NOT_FOUND


def _stop_one(d, name: str, grace: float | None, probe, poll_s: float = 0.05) -> dict:
    path = d / f"{name}.json"
    if not path.exists():  # another `stop` finished it while we waited for the lock
        return read_report(d, name) or {"name": name, "error": "already stopped"}
    try:
        rec = read_record(path)  # again, under the lock: the supervisor may have rewritten it
    except RecordError as e:
        return {"name": name, "error": e.one_line()}
    if ops.supervisor_alive(rec, d):
        report = ops.ask_supervisor_to_stop(d, rec, grace, supervisor_wait_s(rec, grace),
                                            poll_s)
        if report is not None:
            return report
        if ops.supervisor_alive(rec, d):
            return {"name": name, "error": "the supervisor did not stop within its budget"}
        # It died before (or without) answering: finish its work from the record.
    result = ops.stop_tree(ops.tree_of_record(rec), stop_budget(rec, grace), probe)
    result["by"] = "vllm-supervise stop (the supervisor was gone)"
    if result["complete"]:
        drop_record(d, name)
    return result


def supervisor_wait_s(rec: InstanceRecord, grace: float | None) -> float:
    """How long the supervisor's own stop may take: its grace (or ours), kill wait and VRAM
    wait from the record, plus a minute."""
    b = stop_budget(rec, grace)
    return b.grace_s + b.kill_wait_s + b.vram_timeout_s + 60


# -- cleanup ------------------------------------------------------------------------
def cleanup_candidates(state_dir, all_users: bool) -> list[ops.Tree]:
    """Trees of dead supervisors (from records), then orphaned vLLM sessions. Only looks."""
    d = existing_state_dir(state_dir)
    trees = []
    claimed: set[int] = set()
    live = set()
    for _path, rec in scan(d) if d is not None else []:
        if not isinstance(rec, InstanceRecord):
            continue
        if ops.supervisor_alive(rec, d):
            live.add(rec.supervisor.ident)
            continue
        t = ops.tree_of_record(rec, all_users)
        if t.procs:
            trees.append(t)
            claimed.update(p.pid for p in t.procs)
    return trees + orphans.find_orphans(all_users, claimed, live)


def cleanup(state_dir, trees: list[ops.Tree], grace: float | None, probe) -> list[dict]:
    """Stop each tree with the supervisor's escalation and VRAM check: GRACE, then the
    kill wait, VRAM wait and tolerance its record gives (defaults without one). A tree
    from a record is stopped under that name's operation lock, as `stop` does."""
    d = existing_state_dir(state_dir)
    results = []
    for t in trees:
        if t.record is None or d is None:
            results.append(ops.stop_tree(t, stop_budget(t.record, grace), probe))
            continue
        with op_locked(d, t.record.name):
            if not _still_dead(d, t.record):
                results.append({"name": t.record.name, "complete": False, "stopped_pids": [],
                                "survivors": [], "error": "the record changed since it was "
                                "listed (a new supervisor took the name?): left alone"})
                continue
            r = ops.stop_tree(t, stop_budget(t.record, grace), probe)
            if r["complete"]:
                drop_record(d, t.record.name)
        results.append(r)
    return results


def _still_dead(d, listed: InstanceRecord) -> bool:
    """Under the name's operation lock: the record on disk is still the one listed (same
    supervisor) and that supervisor is still dead. Between the listing and a confirmation,
    a new `serve` may have taken the name: its record must not be dropped."""
    try:
        rec = read_record(d / f"{listed.name}.json")
    except (RecordError, OSError):
        return False
    return rec.supervisor.ident == listed.supervisor.ident and not ops.supervisor_alive(rec, d)


def print_json(data) -> None:
    """JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
