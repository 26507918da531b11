"""The stop sequence: the stop signal, the grace, SIGKILL of the group and of every
escapee, the wait for the tree to be gone and reaped, and the GPU memory check."""

from __future__ import annotations

import os
import signal
from dataclasses import replace as _replace

from vllm_supervisor import proctree
from vllm_supervisor.records import SignalEvent, State


class StopSequence:
    """Mixed into Supervisor: everything from the stop request to DONE."""

    def _begin_stop(self, reason: str, requested: bool) -> None:
        self.readiness.stop()
        self.ui.clear_status()
        self.out.reason, self.out.requested = reason, requested
        self.out.stop_at = self._now()
        asked = self.registry.stop_request() if (self.registry and requested) else None
        if asked and isinstance(asked.get("grace"), int | float) and asked["grace"] >= 0:
            self.cfg = _replace(self.cfg, grace_s=float(asked["grace"]))
            self.ui.event(f"`vllm-supervise stop` asked for a grace of {asked['grace']:g} s")
        self.classifier.stop_requested = True
        infos = self._snapshot(force=True)  # before signalling: reparenting hides children
        self.state = State.STOPPING
        self._publish(state="stopping", stop_reason=reason)
        self.notify.send("STOPPING=1", f"STATUS=stopping: {reason[:200]}")
        self.notify.extend(self.cfg.grace_s + self.cfg.kill_wait_s + self.cfg.vram_timeout_s
                           + 10)
        self.deadline = self.clock.monotonic() + self.cfg.grace_s
        sig = self.cfg.stop_signal
        if self.out.main_status is None:
            if self.cfg.signal_group:
                self._send_group(sig, infos)
            else:
                self._send_one(sig, self.launch.pid, infos)
        else:  # vLLM's main process is gone: its leftovers get SIGTERM themselves
            if any(i.pgid == self.launch.pgid and i.state != "Z" for i in infos):
                self._send_group(signal.SIGTERM, infos)  # only while the group is ours
            self._send_outside(signal.SIGTERM, infos)
        self.ui.event(f"waiting up to {self.cfg.grace_s:g} s for vLLM to stop, then SIGKILL")
        self._tick_stopping()

    def _tick_stopping(self) -> None:
        if self._tree_gone():
            return
        self._watch_release()
        if self.clock.monotonic() >= self.deadline:
            self.ui.event(f"grace of {self.cfg.grace_s:g} s is over: SIGKILL", "warn")
            self._escalate("grace period expired")
        else:
            left = self.deadline - self.clock.monotonic()
            self.ui.status(f"stopping: {len(self.tracker.live)} processes left, "
                           f"SIGKILL in {left:.0f} s")

    def _escalate(self, why: str) -> None:
        self.notify.extend(self.cfg.kill_wait_s + self.cfg.vram_timeout_s + 10,
                           f"SIGKILL: {why}")
        self.out.escalated = True
        self.out.notes.append(f"escalated to SIGKILL: {why}")
        self.state = State.KILLING
        self.deadline = self.clock.monotonic() + self.cfg.kill_wait_s
        self._kill_everything()

    def _kill_everything(self) -> None:
        """SIGKILL the group (once) and every live process not yet SIGKILLed; later ticks
        catch whatever was forked in between."""
        infos = [i for i in self.tracker.snapshot(titles=False)
                 if i.state != "Z" and i.ident not in self._killed]
        if not infos:
            return
        if not self._killed and any(i.pgid == self.launch.pgid for i in infos):
            self._send_group(signal.SIGKILL, infos)
        for info in infos:
            if info.pgid != self.launch.pgid or self._killed:
                self._send_proc(signal.SIGKILL, info)
        self._killed.update(i.ident for i in infos)

    def _tick_killing(self) -> None:
        if self._tree_gone():
            return
        self._watch_release()
        if self.clock.monotonic() < self.deadline:
            self._kill_everything()  # also catches anything forked since the last kill
            return
        alive = [i for i in self.tracker.snapshot(titles=False) if i.state != "Z"]
        self.out.survivors = self.tracker.mark_survivors(alive)
        for s in self.out.survivors:
            self.ui.event(f"pid {s.pid} ({s.title}) survived SIGKILL: state {s.state}", "bad")
        self._after_tree(gone=False)

    def _watch_release(self) -> None:
        """While processes are still being torn down, note when the GPUs first read back at
        baseline with no tree process listed: the driver frees memory before the kernel
        finishes the exit, so this is when the memory really came back. The stop is still
        done only after every process is reaped and a final check agrees."""
        if self._seen_released is None and not self.ledger.unavailable:
            done, verdict = self.ledger.check(self.tracker.titles())
            if done and verdict.status == "released":
                self._seen_released = self.clock.monotonic()

    def _tree_gone(self) -> bool:
        self._reap()
        infos = self.tracker.snapshot(titles=False)
        if infos:
            return False
        self._after_tree(gone=True)
        return True

    def _after_tree(self, gone: bool) -> None:
        self.out.gone_at = self._now()
        self.ui.clear_status()
        if not self.out.survivors:
            self.out.removed = self.leftovers.remove()
            self.out.unattributed = self.leftovers.unattributed(self.launch.started_wall)
        elif self.leftovers.tmpdir is not None:
            self.out.notes.append(f"private TMPDIR {self.leftovers.tmpdir} kept: a process "
                                  "that survived SIGKILL may still use it")
        if gone:
            self.ui.event(f"every process of the tree is gone and reaped "
                          f"({self.out.gone_at - self.out.stop_at:.2f} s after the stop began)")
        self.deadline_start = self.clock.monotonic()
        self.deadline = self.deadline_start + self.cfg.vram_timeout_s
        if not self.ledger.unavailable and self.cfg.vram_timeout_s > 0:
            self.notify.extend(self.cfg.vram_timeout_s + 10, "waiting for GPU memory")
        self.state = State.AWAITING_VRAM
        self._tick_vram()

    def _tick_vram(self) -> None:
        done, verdict = self.ledger.check(self.tracker.titles())
        now = self.clock.monotonic()
        waited = round(now - self.deadline_start, 4)
        # With survivors still holding memory, waiting cannot help: report what is seen.
        if not done and self.cfg.vram_timeout_s <= 0:  # the operator chose not to wait
            verdict = _replace(verdict, status="not-waited",
                               detail=f"--vram-timeout 0, not waited for: {verdict.detail}")
            done = True
        timed_out = not done and (now >= self.deadline or bool(self.out.survivors))
        if done or timed_out:
            seen = self._seen_released if self._seen_released is not None else now
            released_t = round(seen - self.t0, 4) if verdict.status == "released" else None
            self.out.vram = _replace(verdict, waited_s=waited, timed_out=timed_out,
                                     released_t=released_t, peak_by_process=self.ledger.peaks())
            self.state = State.DONE
            self.ui.clear_status()
            style = "ok" if verdict.status == "released" else "bad" if timed_out else "warn"
            if verdict.status != "unavailable":
                self.ui.event(f"VRAM {verdict.status}: {verdict.detail} "
                              f"(after {waited:.3f} s)", style)
            return
        self.ui.status(f"waiting for VRAM ({waited:.1f} s): {self.ledger.progress(verdict)}")

    # -- signalling ------------------------------------------------------------------
    def _send_one(self, sig: int, pid: int, infos: list) -> None:
        # Our own unreaped child cannot have been replaced by another process.
        try:
            os.kill(pid, sig)
            res = "sent"
        except ProcessLookupError:
            res = "gone"
        self._record(sig, f"pid {pid}", res)
        self.tracker.note_signal([i for i in infos if i.pid == pid], proctree.signal_name(sig))

    def _send_group(self, sig: int, infos: list) -> None:
        res = proctree.signal_group(self.launch.pgid, sig)
        self._record(sig, f"group {self.launch.pgid}", res)
        self.tracker.note_signal(infos, proctree.signal_name(sig), pgid=self.launch.pgid)

    def _send_outside(self, sig: int, infos: list) -> None:
        for info in infos:
            if info.pgid != self.launch.pgid and info.state != "Z":
                self._send_proc(sig, info)

    def _send_proc(self, sig: int, info) -> None:
        res = proctree.signal_process(info.ident, sig)
        where = "outside the group" if info.pgid != self.launch.pgid else "in the group"
        self._record(sig, f"pid {info.pid} ({info.title[:40]}, {where})", res)
        self.tracker.note_signal([info], proctree.signal_name(sig))

    def _record(self, sig: int, target: str, res: str) -> None:
        name = proctree.signal_name(sig)
        if res == "eperm":
            self.ui.event(f"not permitted to send {name} to {target}", "bad")
        self.out.signals.append(SignalEvent(round(self._now(), 4), name, "sent", target,
                                            note=None if res == "sent" else res))
