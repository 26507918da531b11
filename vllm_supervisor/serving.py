"""While starting and serving: the startup watchdog, engine death, the systemd watchdog."""

from __future__ import annotations

from vllm_supervisor import hygiene, preflight, proctree


class ServingWatch:
    """Mixed into Supervisor: the checks made on each tick while starting or ready."""

    def _ping_watchdog(self) -> None:
        """WATCHDOG=1 at half the WatchdogSec interval, only while /health answers: once it
        fails, the pings stop and systemd's watchdog may act on its own."""
        wd = self.notify.watchdog_s
        now = self.clock.monotonic()
        if wd and now >= self._next_ping and self.readiness.last_status == 200:
            self.notify.send("WATCHDOG=1")
            self._next_ping = now + wd / 2

    def _startup_stalled(self, infos: list) -> bool:
        """The startup watchdog: --startup-timeout, and --stall-timeout without progress."""
        now = self.clock.monotonic()
        live = [i for i in infos if i.state != "Z"]
        vram = sum(mib for (pid, _), mib in self.ledger.peak.items()
                   if pid in {i.pid for i in live})
        stalled = self.stall.feed(now, sum(p.bytes for p in self.pumps),
                                  sum(i.rss_bytes for i in live), vram,
                                  sum(i.cpu_ticks for i in live))
        why = None
        if now - self.t0 >= self.cfg.startup_timeout_s:
            why = f"not ready after --startup-timeout {self.cfg.startup_timeout_s:g} s"
        elif stalled:
            why = (f"no progress for {self.cfg.stall_timeout_s:g} s (no log output, no memory "
                   f"or GPU memory growth, no CPU use; last progress: {self.stall.last_kind})")
        if why is None:
            return False
        self.out.start_failed = why
        self.out.diagnosis = self._diagnose(live)
        self.ui.event(f"startup hang: {why}", "bad")
        for line in self.out.diagnosis:
            self.ui.event(f"  {line}", "bad")
        self._begin_stop(f"startup hang: {why}", requested=False)
        return True

    def _diagnose(self, live: list) -> list[str]:
        out = [f"pid {i.pid} {i.title[:50]}: state {i.state}, wchan {proctree.wchan(i.pid)}"
               for i in live]
        for p in self.pumps:
            out += [f"last {p.stream}: {line[:160]}" for line in p.last_lines(3)]
        sus = hygiene.suspicious(self._env)
        if sus:
            out.append("inherited distributed variables (a foreign process group?): "
                       + " ".join(sus))
        holder = preflight.port_holder(self.cfg.health_port)
        if holder and not any(holder.startswith(f"pid {i.pid} ") for i in live):
            out.append(f"port {self.cfg.health_port} is held by {holder}, not by this tree")
        return out

    def _engine_death(self) -> str | None:
        """Why the engine is dead while the server may still run, or None."""
        if self.readiness.unhealthy:
            return self.readiness.unhealthy
        gone = [e for e in self.tracker.ends.values() if "EngineCor" in e.title]
        if gone:
            return f"the engine process (pid {gone[0].pid}) is gone"
        if self.classifier.engine_death_seen():
            return "vLLM logged the engine's death: " + ", ".join(self.classifier.unrequested)
        return None
