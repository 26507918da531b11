"""The stop report: the exit-code decision, the human summary and the JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_supervisor.errors import ExitCode
from vllm_supervisor.gpu.verdict import VramVerdict
from vllm_supervisor.host.proctree import shell_code, signal_name
from vllm_supervisor.lifecycle.records import StopReport

MEANINGS = {
    ExitCode.OK: "requested stop; every process ended within the grace period",
    ExitCode.START_FAILED: "vLLM failed to start (it ended before /health answered)",
    ExitCode.ESCALATED: "requested stop; SIGKILL was needed",
    ExitCode.SURVIVED_SIGKILL: "a process survived SIGKILL",
    ExitCode.VRAM_NOT_RELEASED: "GPU memory was not verified released",
    ExitCode.ENGINE_DIED: "the engine died while serving (no stop was requested)",
}


@dataclass
class MainExit:
    """How vLLM's main process ended (filled in when it is reaped)."""

    status: int | None = None  # raw wait status
    desc: str = "still running"
    self_exit: bool = False  # it ended before any stop began


@dataclass(frozen=True)
class ExitFacts:
    """Everything the exit code depends on, and nothing else."""

    survivors: bool
    vram_failed: bool  # timed out, or the wait was interrupted
    start_failed: str | None
    ready: bool
    requested: bool
    escalated: bool
    engine_died: str | None
    self_exit: bool
    main_status: int | None
    main_desc: str


def decide_exit(f: ExitFacts) -> tuple[int, str]:
    """The exit code and its meaning, most serious first (README: "Exit codes")."""
    if f.survivors:
        return ExitCode.SURVIVED_SIGKILL, MEANINGS[ExitCode.SURVIVED_SIGKILL]
    if f.vram_failed:
        return ExitCode.VRAM_NOT_RELEASED, MEANINGS[ExitCode.VRAM_NOT_RELEASED]
    if f.start_failed:
        return ExitCode.START_FAILED, f"vLLM failed to start: {f.start_failed}"
    if not f.requested and not f.ready:
        return ExitCode.START_FAILED, MEANINGS[ExitCode.START_FAILED]
    own = shell_code(f.main_status) if f.main_status is not None else 0
    # vLLM's own non-zero code, when it ended by itself, already says "failure"; 0 (or a
    # code our own stop caused) must not hide the engine's death (vllm#48966).
    if f.engine_died and not (f.self_exit and own != 0):
        return ExitCode.ENGINE_DIED, f"{MEANINGS[ExitCode.ENGINE_DIED]}: {f.engine_died}"
    if f.requested:
        code = ExitCode.ESCALATED if f.escalated else ExitCode.OK
        return code, MEANINGS[code]
    return own, f"vLLM ended by itself ({f.main_desc}); its exit code is passed on"


def exit_facts(serving, stop, main: MainExit) -> ExitFacts:
    """The facts of one run, from its serving and stop results."""
    vram = stop.vram
    return ExitFacts(
        survivors=bool(stop.survivors),
        vram_failed=vram is not None and (vram.timed_out or vram.status == "interrupted"),
        start_failed=serving.start_failed,
        ready=serving.ready_at is not None,
        requested=bool(stop.request and stop.request.requested),
        escalated=stop.escalated,
        engine_died=serving.engine_died,
        self_exit=main.self_exit,
        main_status=main.status,
        main_desc=main.desc,
    )


def build_report(cfg, ctx, serving, stop, main: MainExit, env_removed, log,
                 output_lost=None, probes=None) -> StopReport:
    """Assemble the frozen report from the run's results (OUTPUT_LOST: destination ->
    OutputLoss, what our stdout, stderr and log file could not take)."""
    facts = exit_facts(serving, stop, main)
    code, meaning = decide_exit(facts)
    notes = list(stop.notes)
    tracker = ctx.tracker
    if tracker.unseen_reaped:
        notes.append(f"{len(tracker.unseen_reaped)} short-lived processes were adopted and "
                     f"reaped by the supervisor")
    launch = ctx.launch
    grace = stop.request.grace_s if stop.request else cfg.grace_s
    return StopReport(
        model=cfg.model,
        argv=launch.argv,
        launch=launch,
        grace_s=grace,
        kill_wait_s=cfg.kill_wait_s,
        vram_timeout_s=cfg.vram_timeout_s,
        reason=stop.request.reason if stop.request else "",
        requested=facts.requested,
        ready=facts.ready,
        time_to_ready_s=round(serving.ready_at, 3) if facts.ready else None,
        started_wall=launch.started_wall,
        t0_monotonic=ctx.t0,
        duration_s=round(ctx.now(), 3),
        stop_duration_s=round(stop.gone_at - stop.stop_at, 4)
        if stop.gone_at is not None and stop.stop_at is not None else None,
        tree_gone_t=round(stop.gone_at, 4) if stop.gone_at is not None else None,
        vllm_exit=shell_code(main.status) if main.status is not None else None,
        vllm_exit_desc=main.desc,
        escalated=stop.escalated,
        signals=tuple(ctx.signals.events),
        processes=tuple(tracker.ended()),
        survivors=tuple(stop.survivors),
        vram=stop.vram or VramVerdict("unavailable", "VRAM not verified"),
        exit_code=int(code),
        exit_meaning=meaning,
        log_notes=tuple(notes),
        log=log,
        leftovers_removed=tuple(stop.removed),
        leftovers_unattributed=tuple(stop.unattributed),
        engine_died=serving.engine_died,
        engine_death_reason=serving.death_reason,
        diagnosis=tuple(serving.diagnosis),
        hang=serving.hang,
        probe=probes.last_result() if probes else None,
        drain=asdict(probes.drain) | {"text": probes.drain.text()}
        if probes and probes.drain else None,
        env_removed=tuple(env_removed),
        output_lost=dict(output_lost or {}),
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
    for dest, lost in r.output_lost.items():
        lines.append(f"output      lost {lost.lines} lines ({lost.bytes} bytes) to {dest} "
                     f"({lost.why})")
    if r.env_removed:
        lines.append("environment removed " + " ".join(r.env_removed))
    if r.drain:
        lines.append(f"drain       {r.drain['text']}")
    if r.probe:
        lines.append(f"probe       last: {r.probe['text']}")
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
            f"killed by {signal_name(p.code)}"
        how = f"{what}, reaped by the supervisor"
    sent = f"; sent {', '.join(p.signals)}" if p.signals else ""
    when = f" at +{p.t_end:.3f} s" if p.t_end is not None else ""
    return f"pid {p.pid:<7} {title:48} {how}{when}{sent}"
