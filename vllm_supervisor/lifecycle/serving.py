"""While starting and serving: readiness, the startup watchdog and its diagnosis, engine
death, and the systemd watchdog and start-timeout extensions. It decides; the supervisor
acts: a tick returns why the run must stop (or None)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_supervisor.host import hygiene
from vllm_supervisor.host.diagnose import BUDGET_S
from vllm_supervisor.lifecycle.context import RunContext
from vllm_supervisor.lifecycle.logclass import LogClassifier
from vllm_supervisor.lifecycle.machine import State
from vllm_supervisor.lifecycle.probes import ServingProbes, ShutdownLog
from vllm_supervisor.lifecycle.watchdog import StallWatch

EXTEND_EVERY_S = 10.0
EXTEND_BY_S = 30.0


@dataclass
class ServingResult:
    """What the watch saw, for the report."""

    ready_at: float | None = None  # seconds after launch
    start_failed: str | None = None  # why the startup watchdog gave up
    engine_died: str | None = None  # engine death seen while serving, no stop requested
    death_reason: str | None = None  # how it was found: exit, engine-gone, health, hung, log
    diagnosis: list[str] = field(default_factory=list)
    hang: dict | None = None  # the hang's diagnosis, JSON-ready


class ServingWatch:
    """The checks made on each tick while starting or ready; owns their schedules."""

    def __init__(self, ctx: RunContext, health, pumps: list, classifier: LogClassifier,
                 env: dict[str, str], shutdown_log: ShutdownLog | None = None):
        self.ctx = ctx
        self.health = health
        self.pumps = pumps
        self.classifier = classifier
        self.env = env  # vLLM's environment, for the hang diagnosis
        self.result = ServingResult()
        self.probes = ServingProbes(ctx, env, shutdown_log)
        self.stall = StallWatch(ctx.cfg.stall_timeout_s, ctx.clock.monotonic())
        self._next_ping = 0.0
        self._next_extend = 0.0

    # -- starting ------------------------------------------------------------------------
    def tick_starting(self, infos: list) -> str | None:
        """Ready, still starting, or hung: the reason to stop when the start failed."""
        why = self._startup_stalled(infos)
        if why is not None:
            return why
        ctx = self.ctx
        if self.health.ready_at is not None:
            self.result.ready_at = self.health.ready_at - ctx.t0
            ctx.machine.transition(State.READY)
            return None
        phase = _phase(infos, self.health.last_status)
        ctx.ui.status(f"starting {ctx.cfg.model}: {ctx.now():.0f} s, {phase}, "
                      f"{tree_summary(infos)}")
        if ctx.clock.monotonic() >= self._next_extend:  # our own watchdog judges the start
            self._next_extend = ctx.clock.monotonic() + EXTEND_EVERY_S
            ctx.notify.extend(EXTEND_BY_S, f"starting {ctx.cfg.model}: {phase}")
        return None

    def _startup_stalled(self, infos: list) -> str | None:
        """The startup watchdog: --startup-timeout, and --stall-timeout without progress
        (either one 0: no limit)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        now = ctx.clock.monotonic()
        live = [i for i in infos if i.state != "Z"]
        pids = {i.pid for i in live}
        vram = sum(mib for (pid, _), mib in ctx.ledger.peak.items() if pid in pids)
        stalled = self.stall.feed(now, sum(p.bytes for p in self.pumps),
                                  sum(i.rss_bytes for i in live), vram,
                                  sum(i.cpu_ticks for i in live))
        if cfg.startup_timeout_s > 0 and now - ctx.t0 >= cfg.startup_timeout_s:
            why = f"not ready after --startup-timeout {cfg.startup_timeout_s:g} s"
        elif stalled and cfg.stall_timeout_s > 0:
            why = (f"no progress for {cfg.stall_timeout_s:g} s (no log output, no memory "
                   f"or GPU memory growth, no CPU use; last progress: {self.stall.last_kind})")
        else:
            return None
        self.result.start_failed = why
        self.result.diagnosis = self._diagnose(live)
        ctx.ui.event(f"startup hang: {why}", "bad")
        for line in self.result.diagnosis:
            ctx.ui.event(f"  {line}", "bad")
        return f"startup hang: {why}"

    def _diagnose(self, live: list) -> list[str]:
        host, port = self.ctx.host, self.ctx.cfg.health_port
        out = [f"pid {i.pid} {i.title[:50]}: state {i.state}, wchan {host.wchan(i.pid)}"
               for i in live]
        for p in self.pumps:
            out += [f"last {p.stream}: {line[:160]}" for line in p.last_lines(3)]
        sus = hygiene.suspicious(self.env)
        if sus:
            out.append("inherited distributed variables (a foreign process group?): "
                       + " ".join(sus))
        holder = host.port_holder(port)
        if holder and not any(holder.startswith(f"pid {i.pid} ") for i in live):
            out.append(f"port {port} is held by {holder}, not by this tree")
        return out

    # -- ready ---------------------------------------------------------------------------
    def tick_ready(self) -> str | None:
        """Feed systemd's watchdog while healthy; the reason to stop on engine death or a
        hung engine (diagnosed before anything is stopped)."""
        self._ping_watchdog()
        reason, why = self._death()
        if why is None:
            reason, why = "hung", self.probes.check(list(self.ctx.tracker.live.values()))
            if why is not None:
                self._diagnose_hang(why)
        if why is None:
            return None
        self.result.engine_died, self.result.death_reason = why, reason
        self.ctx.ui.event(f"engine died while serving: {why}", "bad")
        return f"engine died while serving: {why}"

    def _diagnose_hang(self, why: str) -> None:
        """Each process's state, wchan, kernel and Python stacks, CPU since the first failed
        canary, and the last log lines, within BUDGET_S; systemd's watchdog is fed
        before and after."""
        ctx = self.ctx
        ctx.notify.send("WATCHDOG=1", f"STATUS=engine hung, diagnosing: {why[:200]}")
        ctx.ui.event(f"engine hung: {why}; diagnosing before the stop", "bad")
        live = [i for i in ctx.tracker.live.values() if i.state != "Z"]
        since = self.probes.cpu_at_suspect
        logs = [f"{p.stream}: {line[:200]}" for p in self.pumps for line in p.last_lines(5)]
        window = ctx.clock.monotonic() - self.probes.suspect_at
        d = ctx.host.diagnose([i.pid for i in live], since, window, BUDGET_S, logs)
        ctx.notify.send("WATCHDOG=1")
        self.result.diagnosis = list(d.lines())
        self.result.hang = d.to_dict()
        for line in self.result.diagnosis:
            ctx.ui.event(f"  {line}", "bad")

    def _ping_watchdog(self) -> None:
        """WATCHDOG=1 at half the WatchdogSec interval, only while /health answers: once it
        fails, the pings stop and systemd's watchdog may act on its own."""
        notify, now = self.ctx.notify, self.ctx.clock.monotonic()
        if notify.watchdog_s and now >= self._next_ping and self.health.last_status == 200:
            notify.send("WATCHDOG=1")
            self._next_ping = now + notify.watchdog_s / 2

    def _death(self) -> tuple[str | None, str | None]:
        """(how it was found, why) the engine is dead while the server may still run, or
        (None, None)."""
        if self.health.unhealthy:
            return "health", self.health.unhealthy
        gone = self.ctx.tracker.engine_gone()
        if gone is not None:
            return "engine-gone", f"the engine process (pid {gone.pid}) is gone"
        if self.classifier.engine_death_seen():
            return "log", ("vLLM logged the engine's death: "
                           + ", ".join(self.classifier.unrequested))
        return None, None

    def on_main_exit(self, state: State) -> None:
        """vLLM's main process ended by itself: was the engine dead too? (The metrics
        count it as an engine death found by the exit when nothing else says why.)"""
        if state is State.READY:
            self.ctx.tracker.snapshot(titles=False)
            reason, self.result.engine_died = self._death()
            self.result.death_reason = reason or "exit"


def _phase(infos: list, last_status: int | None) -> str:
    names = " ".join(i.title for i in infos)
    if last_status is not None:
        return f"/health answers {last_status}"
    if "VLLM::Worker" in names:
        return "workers loading the model"
    if "VLLM::EngineCore" in names:
        return "engine core starting"
    return "API server starting"


def tree_summary(infos: list) -> str:
    """'N processes, X GiB RSS' for the live ones."""
    live = [i for i in infos if i.state != "Z"]
    rss = sum(i.rss_bytes for i in live) / 2**30
    return f"{len(live)} processes, {rss:.2f} GiB RSS"
