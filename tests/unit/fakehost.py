"""A fake host and a fake clock for the lifecycle's unit tests: an in-memory process tree
that obeys or ignores signals as told, whose waits advance the clock to the next event.

The tree mirrors vLLM's: API server (our child, leader of its own group and session) ->
VLLM::EngineCore -> VLLM::Worker_TP<n>. A process that obeys SIGTERM passes it on to its
children and exits once they are gone (vLLM's orderly shutdown); one that ignores it
makes its parents wait forever, as a stuck engine makes vLLM wait. Nothing here touches
a real process.
"""

from __future__ import annotations

import heapq
import itertools
import signal
from dataclasses import dataclass, field

from fakeserver import FakeDiagnosis, FakeDrainWatch, FakeProgressWatch, FakeServer

from vllm_supervisor.gpu.probe import GpuReading
from vllm_supervisor.host.procinfo import LaunchRecord, ProcId, ProcInfo
from vllm_supervisor.host.signals import Received

SUPERVISOR = 10
GUARD = 11
SENDER = 4242
TERMS = (signal.SIGTERM, signal.SIGINT)


class FakeClock:
    """Monotonic and wall time that move only when the fake host waits."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return 1_800_000_000.0 + self.t


@dataclass
class Proc:
    """One fake process."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    title: str
    start_ticks: int
    term_delay: float | None = 0.05  # seconds to exit after SIGTERM; None: ignores it
    killable: bool = True  # False: sits in D state through SIGKILL
    vram_mib: float = 0.0
    vram_release_s: float = 0.0  # the driver frees the memory this long after death
    state: str = "S"
    status: int | None = None  # raw wait status once dead
    died_at: float | None = None
    reaped: bool = False
    signals: list[int] = field(default_factory=list)
    terming: bool = False
    foreign: bool = False  # not of our tree: never in our snapshot

    @property
    def dead(self) -> bool:
        return self.status is not None


@dataclass
class Spec:
    """How the fake vLLM behaves."""

    workers: int = 2
    ready_after: float | None = 1.0  # /health answers 200 this long after launch
    api_term_delay: float | None = 0.05
    engine_term_delay: float | None = 0.05
    worker_term_delay: float | None = 0.05
    worker_killable: bool = True
    worker_vram_mib: float = 0.0
    vram_release_s: float = 0.0
    worker_setsid: bool = False
    term_exit_code: int = 0


class FakeGuard:
    """Records what the supervisor tells its death guard."""

    pid = GUARD

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def tell_tree(self, leader, token):
        self.calls.append(("tree", leader.pid, token))

    def track(self, idents):
        for i in idents:
            if ("track", i) not in self.calls:
                self.calls.append(("track", i))

    def grace(self, seconds):
        self.calls.append(("grace", seconds))

    def leftovers(self, tmpdir, shm_paths):
        self.calls.append(("leftovers", tmpdir, tuple(shm_paths)))

    def done(self):
        self.calls.append(("done",))

    def close(self):
        self.calls.append(("close",))


class FakeLeftovers:
    """No files: records what it was asked."""

    def __init__(self) -> None:
        self.tmpdir = "/fake/tmpdir"
        self.shm: set[str] = set()
        self.removed = False

    def env(self, env):
        return dict(env, TMPDIR=self.tmpdir)

    def note(self, pids):
        pass

    def remove(self):
        self.removed = True
        return [self.tmpdir]

    def unattributed(self, since_wall):
        return []


class FakeHealth:
    """/health as the fake host scripts it."""

    def __init__(self) -> None:
        self.ready_at: float | None = None
        self.last_status: int | None = None
        self.unhealthy: str | None = None
        self.stopped = False

    def stop(self):
        self.stopped = True

    def join(self, timeout=None):
        pass


class FakePump:
    """A stream that carried nothing."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.bytes = 0

    def last_lines(self, n):
        return [f"last {self.stream} line"]

    def join(self, timeout=None):
        pass

    def is_alive(self):
        return False


class FakeHost:
    """The lifecycle's host port over an in-memory tree (see the module docstring)."""

    def __init__(self, clock: FakeClock, spec: Spec | None = None, env: dict | None = None):
        self.clock = clock
        self.spec = spec or Spec()
        self.env = dict(env or {})
        self.procs: dict[int, Proc] = {}
        self.pending: list[Received] = []
        self.sent: list[tuple[float, str, int]] = []  # (time, target, signal)
        self.events: list = []
        self._seq = itertools.count()
        self._pids = itertools.count(100)
        self.health = FakeHealth()
        self.server = FakeServer()
        self.progress: FakeProgressWatch | None = None
        self.diagnosed: list = []
        self.guard = FakeGuard()
        self.leftovers = FakeLeftovers()
        self.port_busy = False
        self.spawned = False
        self.spawn_env: dict | None = None
        self.launch: LaunchRecord | None = None

    # -- scripting -------------------------------------------------------------------------
    def at(self, delay: float, fn, *args) -> None:
        """Run FN(*ARGS) DELAY seconds from now (in fake time)."""
        heapq.heappush(self.events, (self.clock.t + delay, next(self._seq), fn, args))

    def send_supervisor(self, delay: float, sig: int = signal.SIGTERM) -> None:
        """An operator's signal to the supervisor, DELAY seconds from now."""
        self.at(delay, self._post, Received(sig, SENDER, f"pid {SENDER} (kill)"))

    def exit_at(self, delay: float, pid: int, code: int = 0, sig: int | None = None) -> None:
        """PID ends by itself (exit CODE, or killed by SIG) DELAY seconds from now."""
        self.at(delay, self._die, pid, (sig & 0x7F) if sig else (code << 8))

    def unhealthy_at(self, delay: float, why: str = "/health failed 3 times in a row") -> None:
        """/health starts failing DELAY seconds from now."""
        def fail():
            self.health.unhealthy, self.health.last_status = why, 503
            self._wake()
        self.at(delay, fail)

    def fork_at(self, delay: float, parent: int, title: str = "daemon", setsid=False) -> None:
        """PARENT forks a new process DELAY seconds from now."""
        self.at(delay, self._fork, parent, title, setsid)

    def add_foreign(self, pid: int, title: str) -> None:
        """A process that is not ours (another user's, another program)."""
        self.procs[pid] = Proc(pid, 1, pid, pid, title, start_ticks=pid, foreign=True)

    def pid_of(self, title: str) -> int:
        return next(p.pid for p in self.procs.values() if p.title == title)

    def signals_to(self, title: str) -> list[str]:
        return [signal.Signals(s).name for s in self.procs[self.pid_of(title)].signals]

    # -- the host port -----------------------------------------------------------------------
    def environ(self):
        return dict(self.env)

    def block_signals(self):
        pass

    def become_subreaper(self):
        pass

    def self_ident(self):
        return ProcId(SUPERVISOR, 1)

    def check_port(self, host, port):
        if self.port_busy:
            from vllm_supervisor.errors import ExitCode, SupervisorError

            raise SupervisorError(f"port {port} is already in use by pid 7 (other)",
                                  None, ExitCode.START_FAILED)

    def port_holder(self, port):
        return "pid 7 (other)" if self.port_busy else None

    def start_guard(self, grace_s, kill_wait_s):
        self.guard.calls.append(("start", grace_s, kill_wait_s))
        return self.guard

    def make_leftovers(self, private_tmp):
        return self.leftovers

    def spawn(self, argv, env, pdeathsig):
        s, t = self.spec, self.clock.t
        self.spawned, self.spawn_env = True, env
        api = self._new(SUPERVISOR, None, "vllm serve (API server)", s.api_term_delay)
        engine = self._new(api.pid, api, "VLLM::EngineCore", s.engine_term_delay)
        for rank in range(s.workers):
            w = self._new(engine.pid, engine, f"VLLM::Worker_TP{rank}", s.worker_term_delay,
                          killable=s.worker_killable, vram_mib=s.worker_vram_mib)
            if s.worker_setsid:
                w.pgid = w.sid = w.pid
        if s.ready_after is not None:
            self.at(s.ready_after, self._ready)
        self.launch = LaunchRecord(tuple(argv), api.pid, api.pid, api.pid, api.start_ticks,
                                   t, 1_800_000_000.0 + t)
        return self.launch, (-1, -1)

    def start_pumps(self, fds, sink, taps):
        return [FakePump("stdout"), FakePump("stderr")]

    def start_health(self, scheme, host, port, ready_poll, clock, interval, failures):
        return self.health

    def start_progress(self, ep, judge, kind, interval_s, timeout_s, clock, model_hint):
        self.progress = FakeProgressWatch(self, judge, interval_s, timeout_s)
        return self.progress

    def fetch_metrics(self, ep, timeout):
        return self.server.sample()

    def start_drain(self, ep, first):
        return FakeDrainWatch(self, first)

    def diagnose(self, pids, cpu_before, window_s, budget_s, log_lines):
        self.diagnosed.append((self.clock.t, tuple(pids)))
        return FakeDiagnosis(tuple(pids), window_s)

    def snapshot(self, exclude, titles):
        return [self._info(p) for p in self.procs.values()
                if not p.reaped and not p.foreign and p.pid not in exclude]

    def read_proc(self, pid, cmdline=True):
        p = self.procs.get(pid)
        return None if p is None or p.reaped else self._info(p)

    def wchan(self, pid):
        return "fake_wait"

    def user_of(self, pid):
        return "tester"

    def signal_child(self, pid, sig):
        return self._deliver(self.procs[pid], sig, f"pid {pid}")

    def signal_group(self, pgid, sig):
        members = [p for p in self.procs.values() if p.pgid == pgid and not p.reaped]
        self.sent.append((self.clock.t, f"group {pgid}", sig))
        for p in members:
            self._deliver(p, sig, None)
        return "sent" if members else "gone"

    def signal_process(self, ident, sig):
        p = self.procs.get(ident.pid)
        if p is None or p.reaped or p.start_ticks != ident.start_ticks:
            return "gone"
        return self._deliver(p, sig, f"pid {p.pid}")

    def reap(self):
        out = []
        for p in self.procs.values():
            if p.dead and not p.reaped and p.ppid == SUPERVISOR:
                p.reaped = True
                out.append((p.pid, p.status))
        return out

    def wait_signals(self, timeout):
        if not self.pending:
            until = self.clock.t + max(timeout, 0.0)
            while self.events and self.events[0][0] <= until and not self.pending:
                t, _, fn, args = heapq.heappop(self.events)
                self.clock.t = max(self.clock.t, t)
                fn(*args)
            if not self.pending:
                self.clock.t = max(self.clock.t, until)
        got, self.pending = self.pending, []
        return got

    def wait_exit(self, pid, timeout_s=None):
        self.guard.calls.append(("waited", timeout_s))

    # -- the simulation ----------------------------------------------------------------------
    def _new(self, ppid, parent, title, term_delay, killable=True, vram_mib=0.0) -> Proc:
        pid = next(self._pids)
        pgid = sid = pid if parent is None else parent.pgid
        if parent is not None:
            sid = parent.sid
        p = Proc(pid, ppid, pgid, sid, title, start_ticks=int(self.clock.t * 100) + pid,
                 term_delay=term_delay, killable=killable, vram_mib=vram_mib,
                 vram_release_s=self.spec.vram_release_s)
        self.procs[pid] = p
        return p

    def _fork(self, parent: int, title: str, setsid: bool) -> None:
        par = self.procs[parent]
        if par.dead:
            return
        p = self._new(parent, par, title, 0.05)
        if setsid:
            p.pgid = p.sid = p.pid

    def _info(self, p: Proc) -> ProcInfo:
        return ProcInfo(p.pid, p.ppid, p.pgid, p.sid, p.start_ticks, 1_800_000_000.0,
                        p.title, p.title, "Z" if p.dead else p.state, 100 << 20, 0)

    def _children(self, p: Proc) -> list[Proc]:
        return [c for c in self.procs.values() if c.ppid == p.pid and not c.dead]

    def _deliver(self, p: Proc, sig: int, target: str | None) -> str:
        if target is not None:
            self.sent.append((self.clock.t, target, sig))
        if p.dead:
            return "gone" if p.reaped else "sent"
        p.signals.append(sig)
        if sig == signal.SIGKILL:
            if p.killable:
                self._die(p.pid, signal.SIGKILL)
            else:
                p.state = "D"
        elif sig in TERMS and p.term_delay is not None and not p.terming:
            p.terming = True
            for c in self._children(p):
                self._deliver(c, signal.SIGTERM, None)
            self.at(p.term_delay, self._exit_when_children_gone, p.pid)
        return "sent"

    def _exit_when_children_gone(self, pid: int) -> None:
        p = self.procs[pid]
        if p.dead:
            return
        if self._children(p):
            self.at(0.05, self._exit_when_children_gone, pid)  # waits, maybe forever
        else:
            self._die(pid, self.spec.term_exit_code << 8)

    def _die(self, pid: int, status: int) -> None:
        p = self.procs[pid]
        if p.dead:
            return
        p.status, p.died_at = status, self.clock.t
        for c in self.procs.values():  # orphans are adopted by the subreaper: us
            if c.ppid == pid and not c.reaped:
                c.ppid = SUPERVISOR
                # vLLM's workers watch their engine through a pipe and exit with it.
                if c.title.startswith("VLLM::Worker") and c.term_delay is not None:
                    self.at(c.term_delay, self._die, c.pid, 0)
        if p.ppid == SUPERVISOR:
            self.pending.append(Received(signal.SIGCHLD, pid, None))
        else:
            p.reaped = True  # its living parent reaps it

    def _ready(self) -> None:
        api = self.procs[self.launch.pid]
        if not api.dead:
            self.health.ready_at, self.health.last_status = self.clock.t, 200
            self._wake()

    def _wake(self) -> None:
        self._post(Received(signal.SIGUSR1, SUPERVISOR, None))

    def _post(self, received: Received) -> None:
        self.pending.append(received)


class FakeProbe:
    """GPUs whose memory the fake tree's workers hold (released VRAM_RELEASE_S after
    death), plus memory a test pins on a GPU with no owner or a foreign owner."""

    name = "fake"

    def __init__(self, host: FakeHost, gpus: int = 2, base_mib: float = 600.0):
        self.host = host
        self.gpus = gpus
        self.base = base_mib
        self.extra: list[tuple[int, int | None, float]] = []  # (gpu, pid, MiB)

    def available(self):
        return None

    def read(self):
        used = [self.base] * self.gpus
        procs: list[list] = [[] for _ in range(self.gpus)]
        workers = [p for p in self.host.procs.values() if p.vram_mib]
        for i, p in enumerate(workers):
            gpu = i % self.gpus
            held = not p.dead or self.host.clock.t < p.died_at + p.vram_release_s
            if held:
                used[gpu] += p.vram_mib
                if not p.dead:
                    procs[gpu].append((p.pid, p.vram_mib))
        for gpu, pid, mib in self.extra:
            used[gpu] += mib
            if pid is not None:
                procs[gpu].append((pid, mib))
        return [GpuReading(i, f"GPU-fake-{i}", used[i], 81559.0, tuple(procs[i]))
                for i in range(self.gpus)]
