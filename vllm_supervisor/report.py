"""The stop report: the exit-code decision, the human summary and the JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vllm_supervisor import proctree
from vllm_supervisor.errors import ExitCode
from vllm_supervisor.records import StopReport, VramVerdict

MEANINGS = {
    ExitCode.OK: "requested stop; every process ended within the grace period",
    ExitCode.START_FAILED: "vLLM failed to start (it ended before /health answered)",
    ExitCode.ESCALATED: "requested stop; SIGKILL was needed",
    ExitCode.SURVIVED_SIGKILL: "a process survived SIGKILL",
    ExitCode.VRAM_NOT_RELEASED: "GPU memory was not verified released",
    ExitCode.ENGINE_DIED: "the engine died while serving (no stop was requested)",
}


def decide_exit(out, ready: bool) -> tuple[int, str]:
    """The exit code and its meaning, most serious first (README: "Exit codes")."""
    if out.survivors:
        return ExitCode.SURVIVED_SIGKILL, MEANINGS[ExitCode.SURVIVED_SIGKILL]
    if out.vram is not None and (out.vram.timed_out or out.vram.status == "interrupted"):
        return ExitCode.VRAM_NOT_RELEASED, MEANINGS[ExitCode.VRAM_NOT_RELEASED]
    if out.start_failed:
        return ExitCode.START_FAILED, f"vLLM failed to start: {out.start_failed}"
    if not out.requested and not ready:
        return ExitCode.START_FAILED, MEANINGS[ExitCode.START_FAILED]
    own = proctree.shell_code(out.main_status) if out.main_status is not None else 0
    # vLLM's own non-zero code, when it ended by itself, already says "failure"; 0 (or a
    # code our own stop caused) must not hide the engine's death (vllm#48966).
    if out.engine_died and not (out.self_exit and own != 0):
        return ExitCode.ENGINE_DIED, f"{MEANINGS[ExitCode.ENGINE_DIED]}: {out.engine_died}"
    if out.requested:
        code = ExitCode.ESCALATED if out.escalated else ExitCode.OK
        return code, MEANINGS[code]
    code = proctree.shell_code(out.main_status)
    return code, f"vLLM ended by itself ({out.main_desc}); its exit code is passed on"


def build_report(cfg, launch, out, tracker, t0: float, now: float, log) -> StopReport:
    """Assemble the frozen report from the run's outcome."""
    ready = out.ready_at is not None
    code, meaning = decide_exit(out, ready)
    notes = list(out.notes)
    if tracker.unseen_reaped:
        notes.append(f"{len(tracker.unseen_reaped)} short-lived processes were adopted and "
                     f"reaped by the supervisor")
    return StopReport(
        model=cfg.model,
        argv=launch.argv,
        launch=launch,
        grace_s=cfg.grace_s,
        kill_wait_s=cfg.kill_wait_s,
        vram_timeout_s=cfg.vram_timeout_s,
        reason=out.reason,
        requested=out.requested,
        ready=ready,
        time_to_ready_s=round(out.ready_at, 3) if ready else None,
        started_wall=launch.started_wall,
        t0_monotonic=t0,
        duration_s=round(now, 3),
        stop_duration_s=round(out.gone_at - out.stop_at, 4)
        if out.gone_at is not None and out.stop_at is not None else None,
        tree_gone_t=round(out.gone_at, 4) if out.gone_at is not None else None,
        vllm_exit=proctree.shell_code(out.main_status) if out.main_status is not None else None,
        vllm_exit_desc=out.main_desc,
        escalated=out.escalated,
        signals=tuple(out.signals),
        processes=tuple(tracker.ended()),
        survivors=tuple(out.survivors),
        vram=out.vram or VramVerdict("unavailable", "VRAM not verified"),
        exit_code=int(code),
        exit_meaning=meaning,
        log_notes=tuple(notes),
        log=log,
        leftovers_removed=tuple(out.removed),
        leftovers_unattributed=tuple(out.unattributed),
        engine_died=out.engine_died,
        diagnosis=tuple(out.diagnosis),
        env_removed=tuple(out.env_removed),
    )


def write_json(report: StopReport, path: Path) -> None:
    """Write the report as JSON, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def render_text(r: StopReport) -> str:
    """The human summary, plain text (the CLI colours it on a terminal)."""
    lines = ["", "── vllm-supervise stop report ──"]
    lines.append(f"model       {r.model}")
    lines.append(f"launched    pid {r.launch.pid} (group {r.launch.pgid}, session "
                 f"{r.launch.sid}, created {r.launch.create_time:.2f})")
    lines.append(f"reason      {r.reason or 'unknown'}")
    ready = f"after {r.time_to_ready_s:.2f} s" if r.ready else "never"
    lines.append(f"ready       {ready}; ran {r.duration_s:.2f} s in all")
    if r.stop_duration_s is not None:
        lines.append(f"stop took   {r.stop_duration_s:.3f} s "
                     f"({'SIGKILL needed' if r.escalated else 'no SIGKILL needed'})")
    lines.append(f"vLLM        {r.vllm_exit_desc}")
    lines.append("signals")
    for s in r.signals:
        who = f" from {s.sender}" if s.sender else ""
        note = f" ({s.note})" if s.note else ""
        verb = "received" if s.direction == "received" else "sent to " + s.target
        lines.append(f"  +{s.t:8.3f} s  {s.signal:8} {verb}{who}{note}")
    lines.append(f"processes   ({len(r.processes)})")
    for p in r.processes:
        lines.append("  " + _process_line(p))
    for note in r.log_notes:
        lines.append(f"note        {note}")
    lines.append(f"vLLM log    {r.log.summary}")
    if r.env_removed:
        lines.append("environment removed " + " ".join(r.env_removed))
    for d in r.diagnosis:
        lines.append(f"diagnosis   {d}")
    if r.leftovers_removed:
        shown = ", ".join(r.leftovers_removed[:6])
        more = f" and {len(r.leftovers_removed) - 6} more" if len(r.leftovers_removed) > 6 else ""
        lines.append(f"leftovers   removed {len(r.leftovers_removed)}: {shown}{more}")
    if r.leftovers_unattributed:
        lines.append("leftovers   left alone (made during the run, never seen in the tree): "
                     + ", ".join(r.leftovers_unattributed[:6]))
    lines.append(f"VRAM        {r.vram.status}: {r.vram.detail}"
                 + (f" (waited {r.vram.waited_s:.3f} s)" if r.vram.status != "unavailable" else ""))
    for p in r.vram.peak_by_process:
        lines.append(f"  peak: pid {p['pid']} {p['title'][:40]} held {p['peak_mib']:.0f} MiB "
                     f"on GPU {p['gpu']}")
    for h in r.vram.holders:
        who = "ours" if h.ours else "not ours"
        mib = "N/A" if h.used_mib is None else f"{h.used_mib:.0f} MiB"
        lines.append(f"  GPU {h.gpu}: pid {h.pid} {h.name} (user {h.user}) holds {mib} ({who})")
    lines.append(f"exit code   {r.exit_code}: {r.exit_meaning}")
    return "\n".join(lines) + "\n"


def _process_line(p) -> str:
    title = p.title if len(p.title) <= 48 else p.title[:45] + "..."
    if p.outcome == "survived":
        how = f"SURVIVED SIGKILL, state {p.state}"
    elif p.outcome == "gone":
        how = "ended, reaped by its parent"
    else:
        what = f"exited {p.code}" if p.outcome == "exited" else \
            f"killed by {proctree.signal_name(p.code)}"
        how = f"{what}, reaped by the supervisor"
    sent = f"; sent {', '.join(p.signals)}" if p.signals else ""
    when = f" at +{p.t_end:.3f} s" if p.t_end is not None else ""
    return f"pid {p.pid:<7} {title:48} {how}{when}{sent}"
