"""The stop sequence: the stop signal, the grace, SIGKILL of the group and of every
escapee, the wait for the tree to be gone and reaped, and the GPU memory check. A stop is
asked for with a StopRequest (data: why, whether an operator asked, with what grace)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from vllm_supervisor.gpu.verdict import VramVerdict
from vllm_supervisor.host.proctree import signal_name
from vllm_supervisor.lifecycle.context import RunContext
from vllm_supervisor.lifecycle.machine import State
from vllm_supervisor.lifecycle.records import ProcessEnd


@dataclass(frozen=True)
class StopRequest:
    """Why the stop begins, whether it was asked for, and the grace before SIGKILL."""

    reason: str
    requested: bool
    grace_s: float


@dataclass
class StopResult:
    """What the stop did, for the report."""

    request: StopRequest | None = None
    stop_at: float | None = None  # seconds after launch
    gone_at: float | None = None
    escalated: bool = False
    survivors: list[ProcessEnd] = field(default_factory=list)
    vram: VramVerdict | None = None
    removed: list[str] = field(default_factory=list)
    unattributed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class StopSequence:
    """Everything from the stop request to DONE; owns its deadlines and what it killed."""

    def __init__(self, ctx: RunContext, leftovers, guard, reap: Callable[[], None]):
        self.ctx = ctx
        self.leftovers = leftovers
        self.guard = guard
        self._reap = reap
        self.result = StopResult()
        self.deadline: float | None = None
        self._killed: set = set()
        self._seen_released: float | None = None
        self._vram_from: float | None = None
        self.drain_note = ""  # "draining N requests", shown while the grace runs

    @property
    def grace_s(self) -> float:
        """The grace in force (the request's)."""
        return self.result.request.grace_s if self.result.request else self.ctx.cfg.grace_s

    # -- begin ---------------------------------------------------------------------------
    def begin(self, request: StopRequest, infos: list, main_alive: bool) -> None:
        """Start the stop: INFOS is the tree walked just before (reparenting hides children
        once signals fly)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        ctx.ui.clear_status()
        self.result.request = request
        self.result.stop_at = ctx.now()
        if self.guard is not None:
            self.guard.grace(request.grace_s)
        ctx.machine.transition(State.STOPPING)
        ctx.publisher.update(state="stopping", stop_reason=request.reason)
        drain = f" ({self.drain_note})" if self.drain_note else ""
        ctx.notify.send("STOPPING=1", f"STATUS=stopping{drain}: {request.reason[:200]}")
        ctx.notify.extend(request.grace_s + cfg.kill_wait_s + cfg.vram_timeout_s + 10)
        self.deadline = ctx.clock.monotonic() + request.grace_s
        if main_alive:
            if cfg.signal_group:
                self._send_group(cfg.stop_signal, infos)
            else:
                self._send_child(cfg.stop_signal, infos)
        else:  # vLLM's main process is gone: its leftovers get SIGTERM themselves
            if any(i.pgid == ctx.launch.pgid and i.state != "Z" for i in infos):
                self._send_group(signal.SIGTERM, infos)  # only while the group is ours
            self._send_outside(signal.SIGTERM, infos)
        ctx.ui.event(f"waiting up to {request.grace_s:g} s for vLLM to stop, then SIGKILL")
        self.tick()

    # -- ticks ---------------------------------------------------------------------------
    def tick(self) -> None:
        """One step of whichever stop state the run is in."""
        state = self.ctx.machine.state
        if state is State.STOPPING:
            self._tick_stopping()
        elif state is State.KILLING:
            self._tick_killing()
        elif state is State.AWAITING_VRAM:
            self._tick_vram()

    def _tick_stopping(self) -> None:
        if self._tree_gone():
            return
        self._watch_release()
        ctx = self.ctx
        if ctx.clock.monotonic() >= self.deadline:
            ctx.ui.event(f"grace of {self.grace_s:g} s is over: SIGKILL", "warn")
            self.escalate("grace period expired")
        else:
            left = self.deadline - ctx.clock.monotonic()
            drain = f"{self.drain_note}, " if self.drain_note else ""
            ctx.ui.status(f"stopping: {drain}{len(ctx.tracker.live)} processes left, "
                          f"SIGKILL in {left:.0f} s")

    def escalate(self, why: str) -> None:
        """SIGKILL now (grace over, or a second Ctrl-C)."""
        ctx = self.ctx
        ctx.notify.extend(ctx.cfg.kill_wait_s + ctx.cfg.vram_timeout_s + 10, f"SIGKILL: {why}")
        self.result.escalated = True
        self.result.notes.append(f"escalated to SIGKILL: {why}")
        ctx.machine.transition(State.KILLING)
        self.deadline = ctx.clock.monotonic() + ctx.cfg.kill_wait_s
        self._kill_everything()

    def _kill_everything(self) -> None:
        """SIGKILL the group (once) and every live process not yet SIGKILLed; later ticks
        catch whatever was forked in between."""
        pgid = self.ctx.launch.pgid
        infos = [i for i in self.ctx.tracker.snapshot(titles=False)
                 if i.state != "Z" and i.ident not in self._killed]
        if not infos:
            return
        if not self._killed and any(i.pgid == pgid for i in infos):
            self._send_group(signal.SIGKILL, infos)
        for info in infos:
            if info.pgid != pgid or self._killed:
                self._send_proc(signal.SIGKILL, info)
        self._killed.update(i.ident for i in infos)

    def _tick_killing(self) -> None:
        if self._tree_gone():
            return
        self._watch_release()
        ctx = self.ctx
        if ctx.clock.monotonic() < self.deadline:
            self._kill_everything()  # also catches anything forked since the last kill
            return
        alive = [i for i in ctx.tracker.snapshot(titles=False) if i.state != "Z"]
        self.result.survivors = ctx.tracker.mark_survivors(alive)
        for s in self.result.survivors:
            ctx.ui.event(f"pid {s.pid} ({s.title}) survived SIGKILL: state {s.state}", "bad")
        self._after_tree(gone=False)

    def _watch_release(self) -> None:
        """While processes are still being torn down, note when the GPUs first read back at
        baseline with no tree process listed: the driver frees memory before the kernel
        finishes the exit, so this is when the memory really came back. The stop is still
        done only after every process is reaped and a final check agrees."""
        ledger = self.ctx.ledger
        if self._seen_released is None and not ledger.unavailable:
            done, verdict = ledger.check(self.ctx.tracker.titles())
            if done and verdict.status == "released":
                self._seen_released = self.ctx.clock.monotonic()

    def _tree_gone(self) -> bool:
        self._reap()
        if self.ctx.tracker.snapshot(titles=False):
            return False
        self._after_tree(gone=True)
        return True

    def _after_tree(self, gone: bool) -> None:
        ctx, res = self.ctx, self.result
        res.gone_at = ctx.now()
        ctx.ui.clear_status()
        if not res.survivors:
            res.removed = self.leftovers.remove()
            res.unattributed = self.leftovers.unattributed(ctx.launch.started_wall)
        elif self.leftovers.tmpdir is not None:
            res.notes.append(f"private TMPDIR {self.leftovers.tmpdir} kept: a process "
                             "that survived SIGKILL may still use it")
        if gone:
            ctx.ui.event(f"every process of the tree is gone and reaped "
                         f"({res.gone_at - res.stop_at:.2f} s after the stop began)")
        self._vram_from = ctx.clock.monotonic()
        self.deadline = self._vram_from + ctx.cfg.vram_timeout_s
        if not ctx.ledger.unavailable and ctx.cfg.vram_timeout_s > 0:
            ctx.notify.extend(ctx.cfg.vram_timeout_s + 10, "waiting for GPU memory")
        ctx.machine.transition(State.AWAITING_VRAM)
        self._tick_vram()

    def _tick_vram(self) -> None:
        ctx, res = self.ctx, self.result
        done, verdict = ctx.ledger.check(ctx.tracker.titles())
        now = ctx.clock.monotonic()
        waited = round(now - self._vram_from, 4)
        if not done and ctx.cfg.vram_timeout_s <= 0:  # the operator chose not to wait
            verdict = replace(verdict, status="not-waited",
                              detail=f"--vram-timeout 0, not waited for: {verdict.detail}")
            done = True
        # With survivors still holding memory, waiting cannot help: report what is seen.
        timed_out = not done and (now >= self.deadline or bool(res.survivors))
        if not (done or timed_out):
            ctx.ui.status(f"waiting for VRAM ({waited:.1f} s): {ctx.ledger.progress(verdict)}")
            return
        seen = self._seen_released if self._seen_released is not None else now
        released = verdict.status == "released"
        res.vram = replace(verdict, waited_s=waited, timed_out=timed_out,
                           released_t=round(seen - ctx.t0, 4) if released else None,
                           released_wall=round(ctx.clock.time() - (now - seen), 4)
                           if released else None, verdict_wall=round(ctx.clock.time(), 4),
                           peak_by_process=ctx.ledger.peaks())
        self._done(verdict.status, f"VRAM {verdict.status}: {verdict.detail} "
                   f"(after {waited:.3f} s)", "ok" if verdict.status == "released"
                   else "bad" if timed_out else "warn")

    def interrupt_vram_wait(self, signame: str) -> None:
        """A Ctrl-C during the VRAM wait gives it up: not verified."""
        waited = round(self.ctx.clock.monotonic() - self._vram_from, 3)
        self.result.vram = VramVerdict("interrupted", "VRAM wait interrupted; not verified",
                                       waited)
        self._done("interrupted", f"{signame}: giving up the VRAM wait", "warn")

    def _done(self, status: str, line: str, style: str) -> None:
        self.ctx.ui.clear_status()
        if status != "unavailable":
            self.ctx.ui.event(line, style)
        self.ctx.machine.transition(State.DONE)

    # -- signalling ------------------------------------------------------------------------
    def _send_child(self, sig: int, infos: list) -> None:
        pid = self.ctx.launch.pid
        # Our own unreaped child cannot have been replaced by another process.
        self._record(sig, f"pid {pid}", self.ctx.host.signal_child(pid, sig))
        self.ctx.tracker.note_signal([i for i in infos if i.pid == pid], signal_name(sig))

    def _send_group(self, sig: int, infos: list) -> None:
        pgid = self.ctx.launch.pgid
        self._record(sig, f"group {pgid}", self.ctx.host.signal_group(pgid, sig))
        self.ctx.tracker.note_signal(infos, signal_name(sig), pgid=pgid)

    def _send_outside(self, sig: int, infos: list) -> None:
        for info in infos:
            if info.pgid != self.ctx.launch.pgid and info.state != "Z":
                self._send_proc(sig, info)

    def _send_proc(self, sig: int, info) -> None:
        res = self.ctx.host.signal_process(info.ident, sig)
        where = "outside the group" if info.pgid != self.ctx.launch.pgid else "in the group"
        self._record(sig, f"pid {info.pid} ({info.title[:40]}, {where})", res)
        self.ctx.tracker.note_signal([info], signal_name(sig))

    def _record(self, sig: int, target: str, res: str) -> None:
        if res == "eperm":
            self.ctx.ui.event(f"not permitted to send {signal_name(sig)} to {target}", "bad")
        self.ctx.signals.sent(self.ctx.now(), sig, target, res)
