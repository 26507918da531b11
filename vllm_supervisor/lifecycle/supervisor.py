"""One supervised run: launch -> starting -> ready -> stopping -> killing -> awaiting VRAM
-> done. The Supervisor composes the collaborators (serving watch, stop sequence, tree
tracker, VRAM ledger, instance publisher, notifier) and runs the loop: wait for a signal
or the next deadline, reap, tick. Every side effect goes through the host port and the
clock, so the whole run can be driven by a fake host and a fake clock in a unit test."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_supervisor.clock import Clock
from vllm_supervisor.deploy.sdnotify import CHILD_VARS, Notifier
from vllm_supervisor.errors import ExitCode, SupervisorError
from vllm_supervisor.gpu.ledger import VramLedger
from vllm_supervisor.gpu.probe import GpuProbe
from vllm_supervisor.host import hygiene, ownership, preflight
from vllm_supervisor.host.signals import STOP_SIGNALS, Received
from vllm_supervisor.lifecycle.booking import Booking
from vllm_supervisor.lifecycle.config import Config
from vllm_supervisor.lifecycle.context import RunContext, SignalLog
from vllm_supervisor.lifecycle.logclass import LogClassifier
from vllm_supervisor.lifecycle.machine import RUNNING, Lifecycle, State
from vllm_supervisor.lifecycle.metrics import RunMetrics
from vllm_supervisor.lifecycle.ports import EventSink, Host, RecordSink
from vllm_supervisor.lifecycle.probes import ShutdownLog
from vllm_supervisor.lifecycle.publisher import Publisher
from vllm_supervisor.lifecycle.records import StopReport
from vllm_supervisor.lifecycle.report import MainExit, build_report
from vllm_supervisor.lifecycle.serving import ServingWatch, tree_summary
from vllm_supervisor.lifecycle.stopping import StopRequest, StopSequence
from vllm_supervisor.lifecycle.tracker import TreeTracker

STARTING_TICK_S = 0.25
STOPPING_TICK_S = 0.25
KILLING_TICK_S = 0.01
PUMP_JOIN_S = 5.0
SHM_NOTE_S = 10.0
SECOND_SIGNALS = ("SIGINT", "SIGQUIT")  # a second Ctrl-C (or SIGQUIT) escalates at once


@dataclass(frozen=True)
class _Live:
    """Everything that exists only once vLLM is launched."""

    ctx: RunContext
    leftovers: object
    guard: object | None
    pumps: list
    health: object
    serving: ServingWatch
    stop: StopSequence


class Supervisor:
    """Runs one vLLM tree from launch to a truthful stop report."""

    def __init__(self, cfg: Config, host: Host, probe: GpuProbe, ui: EventSink, clock: Clock,
                 registry: RecordSink | None = None, log_file=None, listeners: tuple = (),
                 notifier: Notifier | None = None, booking: Booking | None = None,
                 metrics: RunMetrics | None = None):
        self.cfg, self.host, self.ui, self.clock = cfg, host, ui, clock
        self.booking = booking
        # Not served unless the CLI serves it (--metrics-port); kept up to date regardless.
        self.metrics = metrics if metrics is not None else RunMetrics("", cfg.model, cfg.url)
        self.machine = Lifecycle((self.metrics, *listeners) + ((booking,) if booking else ()))
        self.notify = notifier if notifier is not None else Notifier()
        self.ledger = VramLedger(probe, cfg.vram_tolerance_mib, lookup=host.read_proc,
                                 user_of=host.user_of)
        self.metrics.new_run(probe, self.ledger, booking)
        self.signals = SignalLog()
        self.classifier = LogClassifier()
        self.publisher = Publisher(registry, ui)
        self.log_file = log_file
        self.main = MainExit()
        self.env_removed: list[str] = []
        self._live: _Live | None = None
        self._unreaped_guard: int | None = None
        self.token = ownership.new_token(host.self_ident())
        self._next_observe = 0.0
        self._next_shm_note = 0.0

    # -- launch --------------------------------------------------------------------------
    def run(self) -> StopReport:
        """Launch vLLM and supervise it until the stop is complete; return the report."""
        cfg, host = self.cfg, self.host
        host.block_signals()  # before any thread or child exists
        if cfg.subreaper:
            host.become_subreaper()
        self._preflight()
        self.machine.transition(State.LAUNCHING)
        guard = host.start_guard(cfg.grace_s, cfg.kill_wait_s) if cfg.guard else None
        t0 = self.clock.monotonic()
        leftovers = host.make_leftovers(cfg.private_tmp)
        env = leftovers.env(self._child_env())
        try:
            launch, fds = host.spawn(cfg.argv, env, cfg.parent_death_signal)
        except BaseException:
            leftovers.remove()
            if guard is not None:
                guard.done()
            raise
        if guard is not None:  # at once: a supervisor killed from here on is covered
            guard.tell_tree(launch.ident, self.token)
            guard.leftovers(leftovers.tmpdir, ())
        try:
            self._live = self._build(launch, fds, t0, leftovers, guard, env)
        except BaseException:
            if guard is not None:
                guard.close()  # the tree is launched: the guard stops it
            raise
        try:
            self._started()
            self._loop()
        finally:
            self._finish()
        report = self._report()
        self.metrics.run_ended(report)
        return report

    def _build(self, launch, fds, t0: float, leftovers, guard, env) -> _Live:
        cfg, host = self.cfg, self.host
        exclude = {guard.pid} if guard is not None and guard.pid else set()
        ctx = RunContext(cfg, self.clock, host, self.ui, self.machine,
                         TreeTracker(host, self.clock, t0, exclude), self.ledger, launch, t0,
                         self.signals, self.notify, self.publisher, self.metrics)
        shutdown_log = ShutdownLog()
        taps = [self.classifier.feed, shutdown_log.feed] + (
            [self.log_file.feed] if self.log_file else [])
        pumps = host.start_pumps(fds, self.ui.passthrough, taps)
        health = host.start_health(cfg.health_scheme, cfg.health_host, cfg.health_port,
                                   cfg.ready_poll_s, self.clock, cfg.health_interval_s,
                                   cfg.health_failures)
        serving = ServingWatch(ctx, health, pumps, self.classifier, env, shutdown_log)
        stop = StopSequence(ctx, leftovers, guard, self._reap)
        return _Live(ctx, leftovers, guard, pumps, health, serving, stop)

    def _started(self) -> None:
        live, cfg = self._live, self.cfg
        launch = live.ctx.launch
        gpus = {u: (self.ledger.index.get(u), b) for u, b in self.ledger.baseline.items()}
        tmpdir = live.leftovers.tmpdir
        self.publisher.launched(
            supervisor=self.host.self_ident(), vllm=launch, model=cfg.model,
            port=cfg.health_port, url=cfg.url, gpus=gpus, grace_s=cfg.grace_s,
            kill_wait_s=cfg.kill_wait_s, vram_timeout_s=cfg.vram_timeout_s,
            vram_tolerance_mib=cfg.vram_tolerance_mib,
            tmpdir=str(tmpdir) if tmpdir is not None else None)
        self.machine.transition(State.STARTING)
        self.notify.send(f"STATUS=starting {cfg.model} (vLLM pid {launch.pid})",
                         f"MAINPID={self.host.self_ident().pid}")
        self.ui.event(f"started vLLM (pid {launch.pid}, new session): {' '.join(cfg.argv)}")

    def _preflight(self) -> None:
        """Admission to the GPUs, their baseline and holders, and the port, before anything
        is started."""
        if self.booking is not None:
            self.booking.admit()
        ledger = self.ledger
        ledger.take_baseline()
        if ledger.unavailable:
            self.ui.event(f"GPU: VRAM will not be verified: {ledger.unavailable}", "warn")
        elif getattr(ledger.probe, "note", None):
            self.ui.event(f"GPU: {ledger.probe.note}", "warn")
        holders = [] if ledger.unavailable else preflight.gpu_holders(
            ledger.probe.read(), self.host.read_proc, self.host.user_of)
        if holders and self.cfg.require_free_gpu:
            raise SupervisorError("GPU memory is already held: " + "; ".join(holders),
                                  "stop those processes, or drop --require-free-gpu",
                                  ExitCode.START_FAILED)
        for h in holders:
            self.ui.event(f"GPU memory already held before launch: {h}", "warn")
        self.host.check_port(self.cfg.health_host, self.cfg.health_port)

    def _child_env(self) -> dict[str, str]:
        env = self.host.environ() | dict(self.cfg.env or ())
        for var in CHILD_VARS:  # systemd talks to the supervisor, not to vLLM
            env.pop(var, None)
        # The proof that a process is this tree's, inherited by every descendant and shown
        # by the kernel in /proc/PID/environ (host/ownership.py).
        env[ownership.TOKEN_VAR] = self.token
        if self.cfg.keep_dist_env:
            kept = hygiene.suspicious(env)
            if kept:
                self.ui.event("keeping inherited distributed variables (--keep-dist-env): "
                              + " ".join(kept), "warn")
            return env
        env, self.env_removed = hygiene.scrub(env)
        if self.env_removed:
            self.ui.event("removed inherited torch.distributed variables (--keep-dist-env "
                          "keeps them): " + " ".join(self.env_removed))
        return env

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while self.machine.state is not State.DONE:
            for sig in self.host.wait_signals(self._timeout()):
                self._on_signal(sig)
            self._reap()
            self._tick()

    def _timeout(self) -> float:
        state, live = self.machine.state, self._live
        tick = {
            State.STARTING: STARTING_TICK_S,
            State.READY: self.cfg.idle_poll_s,
            State.STOPPING: STOPPING_TICK_S,
            State.KILLING: KILLING_TICK_S,
            State.AWAITING_VRAM: self.cfg.vram_poll_s,
        }[state]
        if state is State.READY and self.notify.watchdog_s:
            tick = min(tick, self.notify.watchdog_s / 2)
        if live.stop.deadline is not None:
            tick = min(tick, max(0.0, live.stop.deadline - self.clock.monotonic()))
        return tick

    def _on_signal(self, sig: Received) -> None:
        if sig.signo not in STOP_SIGNALS:
            return  # SIGCHLD and the wake-up: the loop reaps and ticks anyway
        live, state = self._live, self.machine.state
        self.signals.received(live.ctx.now(), sig.name, sig.sender_pid, sig.sender)
        if state in RUNNING:
            self.ui.event(f"{sig.name} from {sig.sender}: stopping vLLM")
            self._begin_stop(f"{sig.name} from {sig.sender}", requested=True)
        elif state is State.STOPPING and sig.name in SECOND_SIGNALS:
            self.ui.event(f"second {sig.name}: escalating to SIGKILL now", "warn")
            live.stop.escalate(f"second {sig.name}")
        elif state is State.AWAITING_VRAM and sig.name in SECOND_SIGNALS:
            live.stop.interrupt_vram_wait(sig.name)
        else:
            self.ui.event(f"{sig.name} ignored: already {state.value}")

    def _begin_stop(self, reason: str, requested: bool) -> None:
        live = self._live
        asked = self.publisher.stop_request() if requested else None
        if asked is not None:
            self.ui.event(f"`vllm-supervise stop` asked for a grace of {asked:g} s")
        draining = requested and self.machine.state is State.READY
        live.health.stop()
        live.serving.probes.stop_watch()
        self.classifier.stop_requested = True
        infos = self._observe(force=True)  # before signalling: reparenting hides children
        request = StopRequest(reason, requested, asked if asked is not None else self.cfg.grace_s)
        n = live.serving.probes.begin_drain() if draining else None
        if n:
            self.ui.event(f"draining {n} requests (running and waiting in vLLM)")
            live.stop.drain_note = f"draining {n} requests"
        live.stop.begin(request, infos, main_alive=self.main.status is None)

    def _reap(self) -> None:
        live = self._live
        for pid, status in self.host.reap():
            text = live.ctx.tracker.on_reaped(pid, status)
            if pid != live.ctx.launch.pid:
                continue
            self.main.status, self.main.desc = status, text
            if self.machine.state in RUNNING:
                self.main.self_exit = True
                state = self.machine.state
                live.serving.on_main_exit(state)
                when = "while serving" if state is State.READY else "during startup"
                self.ui.event(f"vLLM {text} by itself {when}", "bad")
                self._begin_stop(f"vLLM {text} by itself {when}", requested=False)

    def _tick(self) -> None:
        live, state = self._live, self.machine.state
        if state is State.STARTING:
            infos = self._observe()
            why = live.serving.tick_starting(infos)
            if why is not None:
                self._begin_stop(why, requested=False)
            elif self.machine.state is State.READY:
                self._on_ready(infos)
        elif state is State.READY:
            self._observe()
            why = live.serving.tick_ready()
            if why is not None:
                self._begin_stop(why, requested=False)
        else:
            live.stop.tick()

    def _on_ready(self, infos: list) -> None:
        self._observe(force=True)
        self.publisher.update(state="ready", ready_wall=round(self.clock.time(), 3))
        self.notify.send("READY=1", f"STATUS=serving {self.cfg.model} at {self.cfg.url}")
        self._live.serving.probes.start()
        self.ui.clear_status()
        ready_at = self._live.serving.result.ready_at
        self.metrics.ready(ready_at)
        self.ui.event(f"ready: {self.cfg.url} answered /health after {ready_at:.1f} s "
                      f"({tree_summary(infos)})", "ok")

    def _observe(self, force: bool = False) -> list:
        """Walk the tree (at most every tick of the state), tell the guard of new
        processes, sample the GPUs, note /dev/shm files, and publish what changed."""
        live, now = self._live, self.clock.monotonic()
        tracker = live.ctx.tracker
        if not force and now < self._next_observe:
            return list(tracker.live.values())
        starting = self.machine.state is State.STARTING
        self._next_observe = now + (STARTING_TICK_S if starting else self.cfg.idle_poll_s)
        known = (len(tracker.seen), len(live.leftovers.shm), len(self.ledger.used_by_tree))
        infos = tracker.snapshot()
        self.metrics.tree(infos)
        if live.guard is not None:
            live.guard.track(i.ident for i in infos)
        self.ledger.sample(tracker.titles())
        if force or now >= self._next_shm_note:
            # vLLM makes its shared memory and semaphores while it starts: look often then.
            self._next_shm_note = now + (1.0 if starting else SHM_NOTE_S)
            live.leftovers.note([i.pid for i in infos if i.state != "Z"])
            if live.guard is not None:
                live.guard.leftovers(None, live.leftovers.shm)
        if force or known != (len(tracker.seen), len(live.leftovers.shm),
                              len(self.ledger.used_by_tree)):
            self.publisher.update(tree=[(i.ident, i.title) for i in tracker.seen.values()],
                                  shm=sorted(live.leftovers.shm),
                                  gpus_used=set(self.ledger.used_by_tree))
            if self.booking is not None:
                self.booking.tree([i.ident for i in tracker.seen.values()])
        return infos

    # -- the end -------------------------------------------------------------------------
    def _finish(self) -> None:
        live = self._live
        if self.booking is not None and self.machine.state is State.DONE:
            # First: a verified release hands the GPUs on at once (--replace, waiters).
            req = live.stop.result.request
            final = self.cfg.restart == "no" or bool(req and req.requested)
            self.booking.stopped(live.stop.result.vram, final)
        live.health.stop()
        live.health.join(2)  # no stray thread when a restart forks the next guard
        live.serving.probes.stop_watch(join_s=2)
        live.serving.probes.end_drain(live.stop.result.escalated)
        wait = 0.2 if live.stop.result.survivors else PUMP_JOIN_S
        for p in live.pumps:
            p.join(wait)
            if p.is_alive():
                live.stop.result.notes.append(f"vLLM's {p.stream} was still held open at exit")
            if getattr(p, "failure", None):
                live.stop.result.notes.append(f"passing vLLM's {p.stream} on failed: "
                                              f"{p.failure} (it was still drained)")
        self.classifier.flush()
        if live.guard is None:
            return
        if self.machine.state is State.DONE:
            live.guard.done()
            # A restart's tree walk would take a live or unreaped guard for part of the new
            # tree: wait for it now. Otherwise it exits by itself (1-2 ms tearing down its
            # copy of our memory) while the report is written, and reap_guard() collects it
            # at the very end, so that the stop is not held up by it.
            if self.cfg.restart != "no":
                self.host.wait_exit(live.guard.pid)
            else:
                self._unreaped_guard = live.guard.pid
        else:  # an internal error: leave the unfinished stop to the guard
            live.guard.close()

    def reap_guard(self, timeout_s: float) -> None:
        """Collect the death guard told "done" (it exits by itself within milliseconds),
        waiting at most TIMEOUT_S: no guard outlives the supervisor."""
        if self._unreaped_guard is not None:
            self.host.wait_exit(self._unreaped_guard, timeout_s)
            self._unreaped_guard = None

    def _report(self) -> StopReport:
        live = self._live
        lost = self.ui.output_lost()  # what stdout, stderr and the log file could not take
        return build_report(self.cfg, live.ctx, live.serving.result, live.stop.result,
                            self.main, self.env_removed,
                            self.classifier.verdict(bool(live.stop.result.request
                                                         and live.stop.result.request.requested)),
                            lost, live.serving.probes)
