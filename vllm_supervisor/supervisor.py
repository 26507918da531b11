"""The lifecycle: launch -> starting -> ready -> stopping -> killing -> awaiting VRAM -> done."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from vllm_supervisor import hygiene, preflight, proctree
from vllm_supervisor.clock import Clock, SystemClock
from vllm_supervisor.config import Config
from vllm_supervisor.errors import ExitCode, SupervisorError
from vllm_supervisor.gpu import GpuProbe, VramLedger
from vllm_supervisor.guard import DeathGuard
from vllm_supervisor.health import HealthWatch
from vllm_supervisor.leftovers import Leftovers
from vllm_supervisor.logclass import LogClassifier
from vllm_supervisor.logs import LogFile, StreamPump
from vllm_supervisor.records import ProcessEnd, SignalEvent, State, StopReport, VramVerdict
from vllm_supervisor.report import build_report
from vllm_supervisor.sdnotify import CHILD_VARS, Notifier
from vllm_supervisor.serving import ServingWatch
from vllm_supervisor.signals import HANDLED, STOP_SIGNALS, Received, SignalInbox
from vllm_supervisor.stopping import StopSequence
from vllm_supervisor.tracker import TreeTracker
from vllm_supervisor.ui import Ui
from vllm_supervisor.watchdog import StallWatch

STARTING_TICK_S = 0.25
STOPPING_TICK_S = 0.25
KILLING_TICK_S = 0.01
PUMP_JOIN_S = 5.0
SHM_NOTE_S = 10.0


@dataclass
class Outcome:
    """What happened, filled in as the run goes (the report is built from it at the end)."""

    reason: str = ""
    requested: bool = False
    escalated: bool = False
    ready_at: float | None = None
    stop_at: float | None = None
    gone_at: float | None = None
    main_status: int | None = None
    main_desc: str = "still running"
    survivors: list[ProcessEnd] = field(default_factory=list)
    signals: list[SignalEvent] = field(default_factory=list)
    vram: VramVerdict | None = None
    notes: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unattributed: list[str] = field(default_factory=list)
    start_failed: str | None = None  # why the startup watchdog gave up
    engine_died: str | None = None  # engine death seen while serving, no stop requested
    self_exit: bool = False  # vLLM's main process ended before any stop began
    diagnosis: list[str] = field(default_factory=list)
    env_removed: list[str] = field(default_factory=list)


class Supervisor(ServingWatch, StopSequence):
    """Runs one vLLM tree from launch to a truthful stop report."""

    def __init__(self, cfg: Config, ui: Ui, gpu: GpuProbe, clock: Clock | None = None,
                 log_file: LogFile | None = None, registry=None):
        self.cfg, self.ui, self.clock = cfg, ui, clock or SystemClock()
        self.registry = registry  # state.Registry: the record status/stop/cleanup read
        self.notify = Notifier()
        self._next_ping = 0.0
        self._next_extend = 0.0
        self.inbox = SignalInbox()
        self.ledger = VramLedger(gpu, cfg.vram_tolerance_mib)
        self.log_file = log_file
        self.state = State.LAUNCHING
        self.out = Outcome()
        self.guard = DeathGuard(cfg.grace_s, cfg.kill_wait_s) if cfg.guard else None
        self.deadline: float | None = None
        self._next_snapshot = 0.0
        self._killed: set = set()
        self._seen_released: float | None = None
        self._next_shm_note = 0.0
        self.classifier = LogClassifier()

    # -- launch --------------------------------------------------------------------
    def run(self) -> StopReport:
        """Launch vLLM and supervise it until the stop is complete; return the report."""
        self.inbox.block()  # before any thread or child exists
        if self.cfg.subreaper:
            proctree.become_subreaper()
        self._preflight()
        guard_pid = self.guard.start() if self.guard else None
        self.t0 = self.clock.monotonic()
        self.leftovers = Leftovers(self.cfg.private_tmp)
        env = self.leftovers.env(self._child_env())
        try:
            self.proc, self.launch = proctree.spawn(
                self.cfg.argv, env, self.cfg.parent_death_signal, HANDLED)
        except BaseException:
            self.leftovers.remove()
            raise
        self.tracker = TreeTracker(self.clock, self.t0, {guard_pid} if guard_pid else set())
        self._publish_launch()
        if self.guard:
            self.guard.tell_tree(self.launch.pgid, self.launch.sid)
            self.guard.leftovers(self.leftovers.tmpdir, ())
        self._start_threads()
        self.state = State.STARTING
        self.notify.send(f"STATUS=starting {self.cfg.model} (vLLM pid {self.launch.pid})",
                         f"MAINPID={os.getpid()}")
        self.ui.event(f"started vLLM (pid {self.launch.pid}, new session): "
                      f"{' '.join(self.cfg.argv)}")
        try:
            self._loop()
        finally:
            self._finish_threads()
        return self._report()

    def _publish_launch(self) -> None:
        if self.registry is None:
            return
        me = proctree.read_proc(os.getpid(), cmdline=False)
        l, c = self.launch, self.cfg
        gpus = {u: {"index": self.ledger.index.get(u), "baseline_mib": b, "used": False}
                for u, b in self.ledger.baseline.items()}
        self.registry.publish(
            name=self.registry.name, supervisor={"pid": me.pid, "create_time": me.create_time},
            vllm={"pid": l.pid, "pgid": l.pgid, "sid": l.sid, "create_time": l.create_time},
            model=c.model, port=c.health_port, url=c.url, argv=list(l.argv), gpus=gpus,
            state="starting", started_wall=l.started_wall, tree=[],
            budget={"grace_s": c.grace_s, "kill_wait_s": c.kill_wait_s,
                    "vram_timeout_s": c.vram_timeout_s},
            tmpdir=str(self.leftovers.tmpdir) if self.leftovers.tmpdir else None, shm=[])

    def _publish(self, **fields) -> None:
        if self.registry is None:
            return
        try:
            self.registry.publish(**fields)
        except OSError as e:  # a full or vanished state dir must not stop the supervision
            self.ui.event(f"could not update the instance record: {e.strerror}", "warn")

    def _preflight(self) -> None:
        """GPU baseline and holders, and the port, before anything is started."""
        self.ledger.take_baseline()
        if self.ledger.unavailable:
            self.ui.event(f"GPU: VRAM will not be verified: {self.ledger.unavailable}", "warn")
        elif getattr(self.ledger.probe, "note", None):
            self.ui.event(f"GPU: {self.ledger.probe.note}", "warn")
        holders = [] if self.ledger.unavailable else preflight.gpu_holders(self.ledger.probe.read())
        if holders and self.cfg.require_free_gpu:
            raise SupervisorError("GPU memory is already held: " + "; ".join(holders),
                                  "stop those processes, or drop --require-free-gpu",
                                  ExitCode.START_FAILED)
        for h in holders:
            self.ui.event(f"GPU memory already held before launch: {h}", "warn")
        preflight.check_port(self.cfg.health_host, self.cfg.health_port)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ) | dict(self.cfg.env or ())
        for var in CHILD_VARS:  # systemd talks to the supervisor, not to vLLM
            env.pop(var, None)
        if self.cfg.keep_dist_env:
            kept = hygiene.suspicious(env)
            if kept:
                self.ui.event("keeping inherited distributed variables (--keep-dist-env): "
                              + " ".join(kept), "warn")
            self._env = env
            return env
        env, self.out.env_removed = hygiene.scrub(env)
        if self.out.env_removed:
            self.ui.event("removed inherited torch.distributed variables (--keep-dist-env "
                          "keeps them): " + " ".join(self.out.env_removed))
        self._env = env
        return env

    def _start_threads(self) -> None:
        fds = []
        for stream in (self.proc.stdout, self.proc.stderr):
            fds.append(os.dup(stream.fileno()))
            stream.close()
        taps = [self.classifier.feed] + ([self.log_file.feed] if self.log_file else [])
        self.pumps = [StreamPump(n, fd, self.ui.passthrough, taps)
                      for n, fd in zip(("stdout", "stderr"), fds, strict=True)]
        c = self.cfg
        self.readiness = HealthWatch(c.health_scheme, c.health_host, c.health_port,
                                     c.ready_poll_s, self.clock, c.health_interval_s,
                                     c.health_failures)
        self.stall = StallWatch(c.stall_timeout_s, self.clock.monotonic())
        for t in (*self.pumps, self.readiness):
            t.start()

    # -- the loop ------------------------------------------------------------------
    def _loop(self) -> None:
        while self.state is not State.DONE:
            for sig in self.inbox.wait(self._timeout()):
                self._on_signal(sig)
            self._reap()
            self._tick()

    def _now(self) -> float:
        return self.clock.monotonic() - self.t0

    def _timeout(self) -> float:
        tick = {
            State.STARTING: STARTING_TICK_S,
            State.READY: self.cfg.idle_poll_s,
            State.STOPPING: STOPPING_TICK_S,
            State.KILLING: KILLING_TICK_S,
            State.AWAITING_VRAM: self.cfg.vram_poll_s,
        }[self.state]
        if self.state is State.READY and self.notify.watchdog_s:
            tick = min(tick, self.notify.watchdog_s / 2)
        if self.state is State.READY and self.cfg.stop_after_ready_s is not None:
            tick = min(tick, max(0.0, self.out.ready_at + self.cfg.stop_after_ready_s
                                 - self._now()))
        if self.deadline is not None:
            tick = min(tick, max(0.0, self.deadline - self.clock.monotonic()))
        return tick

    def _on_signal(self, sig: Received) -> None:
        if sig.signo not in STOP_SIGNALS:
            return  # SIGCHLD and the wake-up are handled by _reap and _tick
        self.out.signals.append(SignalEvent(round(self._now(), 4), sig.name, "received",
                                            "supervisor", sig.sender_pid, sig.sender))
        if self.state in (State.STARTING, State.READY):
            self.ui.event(f"{sig.name} from {sig.sender}: stopping vLLM")
            self._begin_stop(f"{sig.name} from {sig.sender}", requested=True)
        elif self.state is State.STOPPING and sig.signo in (signal.SIGINT, signal.SIGQUIT):
            self.ui.event(f"second {sig.name}: escalating to SIGKILL now", "warn")
            self._escalate(f"second {sig.name}")
        elif self.state is State.AWAITING_VRAM and sig.signo in (signal.SIGINT, signal.SIGQUIT):
            self.ui.event(f"{sig.name}: giving up the VRAM wait", "warn")
            self.out.vram = VramVerdict("interrupted", "VRAM wait interrupted; not verified",
                                        round(self.clock.monotonic() - self.deadline_start, 3))
            self.state = State.DONE
        else:
            self.ui.event(f"{sig.name} ignored: already {self.state.value}")

    def _reap(self) -> None:
        for pid, status in proctree.reap_all():
            if self.guard and pid == self.guard.pid:
                continue
            text = self.tracker.on_reaped(pid, status)
            if pid == self.launch.pid:
                self.out.main_status = status
                self.out.main_desc = text
                self.proc.returncode = proctree.shell_code(status)  # Popen must not wait
                if self.state in (State.STARTING, State.READY):
                    self._on_main_exit(text)

    def _on_main_exit(self, text: str) -> None:
        self.out.self_exit = True
        when = "while serving" if self.state is State.READY else "during startup"
        if self.state is State.READY:
            self.tracker.snapshot(titles=False)
            self.out.engine_died = self._engine_death()
        self.ui.event(f"vLLM {text} by itself {when}", "bad")
        self._begin_stop(f"vLLM {text} by itself {when}", requested=False)

    # -- ticks per state -------------------------------------------------------------
    def _tick(self) -> None:
        {
            State.STARTING: self._tick_starting,
            State.READY: self._tick_ready,
            State.STOPPING: self._tick_stopping,
            State.KILLING: self._tick_killing,
            State.AWAITING_VRAM: self._tick_vram,
            State.DONE: lambda: None,
        }[self.state]()

    def _snapshot(self, force: bool = False) -> list:
        now = self.clock.monotonic()
        if not force and now < self._next_snapshot:
            return list(self.tracker.live.values())
        self._next_snapshot = now + (STARTING_TICK_S if self.state is State.STARTING
                                     else self.cfg.idle_poll_s)
        known = (len(self.tracker.seen), len(self.leftovers.shm), len(self.ledger.used_by_tree))
        infos = self.tracker.snapshot()
        if self.guard:
            self.guard.track(i.ident for i in infos)
        self.ledger.sample(self.tracker.titles())
        if force or now >= self._next_shm_note:
            # vLLM makes its shared memory and semaphores while it starts: look often then.
            self._next_shm_note = now + (1.0 if self.state is State.STARTING else SHM_NOTE_S)
            self.leftovers.note([i.pid for i in infos if i.state != "Z"])
            if self.guard:
                self.guard.leftovers(None, self.leftovers.shm)
        now_known = (len(self.tracker.seen), len(self.leftovers.shm),
                     len(self.ledger.used_by_tree))
        if force or now_known != known:
            self._publish_tree()
        return infos

    def _publish_tree(self) -> None:
        if self.registry is None:
            return
        gpus = self.registry.data.get("gpus", {})
        for u in self.ledger.used_by_tree:
            gpus.setdefault(u, {"index": self.ledger.index.get(u),
                                "baseline_mib": self.ledger.baseline.get(u)})["used"] = True
        self._publish(tree=[{"pid": i.pid, "create_time": i.create_time, "title": i.title}
                            for i in self.tracker.seen.values()],
                      shm=sorted(self.leftovers.shm), gpus=gpus)

    def _tick_starting(self) -> None:
        infos = self._snapshot()
        if self._startup_stalled(infos):
            return
        if self.readiness.ready_at is not None:
            self.out.ready_at = self.readiness.ready_at - self.t0
            self.state = State.READY
            self._snapshot(force=True)
            self._publish(state="ready", ready_wall=round(self.clock.time(), 3))
            self.notify.send("READY=1", f"STATUS=serving {self.cfg.model} at {self.cfg.url}")
            self.ui.clear_status()
            self.ui.event(f"ready: {self.cfg.url} answered /health after "
                          f"{self.out.ready_at:.1f} s ({_tree_summary(infos)})", "ok")
            return
        phase = _phase(infos, self.readiness.last_status)
        self.ui.status(f"starting {self.cfg.model}: {self._now():.0f} s, "
                       f"{phase}, {_tree_summary(infos)}")
        if self.clock.monotonic() >= self._next_extend:  # our own watchdog judges the start
            self._next_extend = self.clock.monotonic() + 10
            self.notify.extend(30, f"starting {self.cfg.model}: {phase}")

    def _tick_ready(self) -> None:
        self._snapshot()
        self._ping_watchdog()
        why = self._engine_death()
        if why is not None:
            self.out.engine_died = why
            self.ui.event(f"engine died while serving: {why}", "bad")
            self._begin_stop(f"engine died while serving: {why}", requested=False)
            return
        after = self.cfg.stop_after_ready_s
        if after is not None and self._now() >= self.out.ready_at + after:
            self.cfg = _replace(self.cfg, stop_after_ready_s=None)
            os.kill(os.getpid(), self.cfg.stop_signal)  # through the real signal path

    # -- the end ---------------------------------------------------------------------
    def _finish_threads(self) -> None:
        if hasattr(self, "readiness"):
            self.readiness.stop()
            self.readiness.join(2)  # no stray thread when a restart forks the next guard
        wait = 0.2 if self.out.survivors else PUMP_JOIN_S
        for p in getattr(self, "pumps", []):
            p.join(wait)
            if p.is_alive():
                self.out.notes.append(f"vLLM's {p.stream} was still held open at exit")
        self.classifier.flush()
        if self.guard:
            if self.state is State.DONE:
                self.guard.done()
                try:
                    os.waitpid(self.guard.pid, 0)
                except ChildProcessError:
                    pass
            else:  # an internal error: leave the unfinished stop to the guard
                self.guard.close()

    def _report(self) -> StopReport:
        return build_report(self.cfg, self.launch, self.out, self.tracker, self.t0,
                            self._now(), self.classifier.verdict(self.out.requested))


def _replace(obj, **kw):
    from dataclasses import replace

    return replace(obj, **kw)


def _phase(infos: list, last_status: int | None) -> str:
    names = " ".join(i.title for i in infos)
    if last_status is not None:
        return f"/health answers {last_status}"
    if "VLLM::Worker" in names:
        return "workers loading the model"
    if "VLLM::EngineCore" in names:
        return "engine core starting"
    return "API server starting"


def _tree_summary(infos: list) -> str:
    live = [i for i in infos if i.state != "Z"]
    rss = sum(i.rss_bytes for i in live) / 2**30
    return f"{len(live)} processes, {rss:.2f} GiB RSS"
