"""This supervisor's GPU reservation, from admission to a verified release.

One Booking lives as long as the supervisor (restarts keep it through their backoff). It
waits for admission before each launch (gpu/admission.py decides, gpu/reservations.py
holds the table), follows the lifecycle into the entry (loading, ready, stopping), and
after a stop: drops the entry when the VRAM verdict is "released", keeps it marked "held"
with the holding PIDs otherwise, so that nobody is admitted into memory still in use."""

from __future__ import annotations

import time
from dataclasses import astuple

from vllm_supervisor.errors import ExitCode, SupervisorError
from vllm_supervisor.gpu.admission import Wanted, blockers, shares_of
from vllm_supervisor.gpu.claim import GpuClaim
from vllm_supervisor.gpu.probe import unlisted_mib
from vllm_supervisor.gpu.reservations import LOADING, Entry, OwnEntry, Table
from vllm_supervisor.host.procinfo import ProcId
from vllm_supervisor.host.signals import STOP_SIGNALS
from vllm_supervisor.lifecycle.machine import State


class StoppedBeforeLaunch(SupervisorError):
    """A stop signal while waiting for the GPUs: nothing was launched (exit 0)."""

    exit_code = ExitCode.OK


class Booking:
    """The reservation of one supervised instance (None of it with --no-reservations)."""

    def __init__(self, table: Table, claim: GpuClaim, cfg, probe, ui, host, clock, *,
                 name: str, notify=None):
        self.table, self.claim, self.cfg, self.probe = table, claim, cfg, probe
        self.ui, self.host, self.clock = ui, host, clock
        self.name, self.notify = name, notify
        self.own: OwnEntry | None = None
        self.takes_over: str | None = None  # the entry a --replace inherits
        self.handoff_from: tuple[str, float | None] | None = None  # --replace: old, verdict

    # -- admission ---------------------------------------------------------------------
    def wanted(self) -> Wanted | None:
        """The GPUs vLLM will use (the first COUNT its environment makes visible), or None
        without a GPU probe (nothing to reserve)."""
        if self.probe.available() is not None:
            return None
        readings = self.probe.read()
        if len(readings) < self.claim.count:
            raise SupervisorError(f"vLLM will use {self.claim.count} GPUs (tensor x pipeline "
                                  f"x local data parallel) but {len(readings)} are visible",
                                  "check CUDA_VISIBLE_DEVICES and the parallel sizes",
                                  ExitCode.START_FAILED)
        return Wanted(tuple(readings[:self.claim.count]), self.claim.fraction)

    def reserve_for_replace(self, old_supervisor: ProcId) -> Entry | None:
        """--replace: take a place now beside the old instance's entry (which we inherit,
        so it is not counted against us), before the old one is stopped: from here on no
        third start can take what the old instance gives back. Its entry, or None when it
        has none. Memory is checked later, in admit(), once the old one let go."""
        want = self.wanted()
        if want is None:
            return None
        deadline = self.clock.monotonic() + self.cfg.gpu_wait_s
        while True:
            why = ["another start is being admitted now"]
            with self.table.try_locked(g.uuid for g in want.gpus) as locked:
                if locked:  # the table is read under the GPU locks: nobody admitted since
                    entries, _ = self.table.entries(self.probe.read(),
                                                    self.cfg.vram_tolerance_mib)
                    old = next((e for e in entries
                                if e.supervisor == old_supervisor and e.live), None)
                    self.takes_over = old.id if old else None
                    why = blockers(want, entries, {}, frozenset({old.id} if old else ()),
                                   physical=False)
                    if not why:
                        self.own = self.table.create(self._data(want, "replacing"))
                        return old
            self._wait_or_fail(why, deadline)

    def admit(self) -> None:
        """Wait until this start is admitted (the entry then says "loading"), showing who
        holds what; exit 3 after --gpu-wait, exit 0 on a stop signal (nothing launched;
        the stop signals are blocked by now, and taken while waiting)."""
        want = self.wanted()
        if want is None:
            return
        t0 = self.clock.monotonic()
        deadline = t0 + self.cfg.gpu_wait_s
        last = None
        while True:
            why, notes = ["another start is being admitted now"], []
            ignore = frozenset(x for x in (self.own and self.own.id, self.takes_over) if x)
            with self.table.try_locked(g.uuid for g in want.gpus) as locked:
                if locked:  # the table is read under the GPU locks: nobody admitted since
                    readings = self.probe.read()
                    now = {r.uuid: r for r in readings}
                    entries, notes = self.table.entries(readings,
                                                        self.cfg.vram_tolerance_mib)
                    why = blockers(want, entries, now, ignore)
                for n in notes:
                    self.ui.event(f"GPU reservations: {n}")
                if not why:
                    self._admitted(Wanted(tuple(now.get(g.uuid, g) for g in want.gpus),
                                          want.fraction))
                    break
            if why != last:
                self.ui.event("waiting for GPU memory: " + "; ".join(why), "warn")
                last = why
            self._wait_or_fail(why, deadline)
        if last is not None:
            self.ui.event(f"GPU admitted after {self.clock.monotonic() - t0:.2f} s")

    def _admitted(self, want: Wanted) -> None:
        data = self._data(want, LOADING)
        if self.own is None:
            self.own = self.table.create(data)
        else:
            self.own.update(**data)
        gpus = ", ".join(f"GPU {g.index} {want.fraction:.2f}" for g in want.gpus)
        self.ui.event(f"GPU reserved: {gpus} ({self.claim.how}; table {self.table.dir})")

    def _data(self, want: Wanted, state: str) -> dict:
        return {"name": self.name, "model": self.cfg.model, "url": self.cfg.url,
                "state": state, "supervisor": list(astuple(self.host.self_ident())),
                "gpus": shares_of(want, unlisted_mib), "tree": [], "holders": [],
                "since_wall": round(time.time(), 3), "replaces": self.takes_over}

    def _wait_or_fail(self, why: list[str], deadline: float) -> None:
        left = deadline - self.clock.monotonic()
        if left <= 0:
            raise SupervisorError(
                f"GPUs not free after --gpu-wait {self.cfg.gpu_wait_s:g} s: " + "; ".join(why),
                "stop the instances named, give a longer --gpu-wait, or lower "
                "--gpu-memory-utilization", ExitCode.START_FAILED)
        text = "waiting for GPU: " + "; ".join(why)
        self.ui.status(f"{text} ({left:.0f} s left)")
        if self.notify is not None:
            self.notify.send(f"STATUS={text[:200]}")
        for sig in self.host.wait_signals(min(self.cfg.vram_poll_s, left)):
            if sig.signo in STOP_SIGNALS:
                self.ui.clear_status()
                raise StoppedBeforeLaunch(f"{sig.name} from {sig.sender} while waiting for "
                                          "the GPUs: nothing was launched")

    # -- the run, into the entry ------------------------------------------------------
    def on_transition(self, old: State, new: State) -> None:
        """A lifecycle listener: READY and STOPPING go into the entry; after a --replace,
        the time from the old tree's verified release to this launch is told."""
        if new in (State.READY, State.STOPPING):
            self._update(state=new.value)
        elif new is State.STARTING and self.handoff_from and self.handoff_from[1]:
            ms = (time.time() - self.handoff_from[1]) * 1000
            self.ui.event(f"handoff: vLLM launched {ms:.1f} ms after "
                          f"{self.handoff_from[0]}'s verified VRAM release")
            self.handoff_from = None

    def tree(self, idents: list[ProcId]) -> None:
        """The tree's identities, so a reader can tell when a dead supervisor's tree is gone."""
        self._update(tree=[[i.pid, i.start_ticks] for i in idents][:512])

    def stopped(self, verdict, final: bool) -> None:
        """After a run's VRAM verdict: released -> the entry goes (FINAL: no restart can
        follow) or waits for the restart; anything else -> kept, marked held."""
        if self.own is None or verdict is None or self.own.data.get("state") == "held":
            return  # nothing to do, or told already (the CLI tells the last run again)
        if verdict.status == "released":
            if final:
                self.release()
            else:
                self._update(state="restarting")
            return
        holders = sorted({h.pid for h in verdict.holders if h.pid is not None})
        self._update(state="held", holders=holders)
        self.ui.event(f"GPU reservation kept (VRAM {verdict.status}): nobody is admitted "
                      "into this memory until it is back", "warn")

    def release(self) -> None:
        """Drop the entry (a verified release, or nothing was launched)."""
        if self.own is not None:
            self.own.drop()
            self.own = None

    def finish(self) -> None:
        """The supervisor is about to exit: an entry not marked held goes."""
        if self.own is not None and self.own.data.get("state") != "held":
            self.release()

    def _update(self, **fields) -> None:
        if self.own is None:
            return
        try:
            self.own.update(**fields)
        except OSError as e:
            self.ui.event(f"could not update the GPU reservation: {e.strerror}", "warn")

