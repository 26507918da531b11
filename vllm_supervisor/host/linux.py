"""The real host: the lifecycle's host port (lifecycle.ports.Host) on Linux."""

from __future__ import annotations

import os
import select

from vllm_supervisor.host import identity, preflight, proctree, vllm_http
from vllm_supervisor.host.guard import DeathGuard
from vllm_supervisor.host.health import HealthWatch
from vllm_supervisor.host.leftovers import Leftovers
from vllm_supervisor.host.logs import StreamPump
from vllm_supervisor.host.probing import DrainWatch, ProgressWatch
from vllm_supervisor.host.procinfo import LaunchRecord, ProcId, ProcInfo
from vllm_supervisor.host.signals import HANDLED, Received, SignalInbox


class LinuxHost:
    """Spawn, /proc, signals, reaping, the death guard, leftovers, health and log threads."""

    def __init__(self) -> None:
        self._inbox = SignalInbox()
        self._popen = None
        self._guard_pid: int | None = None

    def environ(self) -> dict[str, str]:
        """Our own environment (vLLM's starts from it)."""
        return dict(os.environ)

    def block_signals(self) -> None:
        """Block the handled signals (before any thread or child exists)."""
        self._inbox.block()

    def become_subreaper(self) -> None:
        """Adopt every orphan the tree makes."""
        proctree.become_subreaper()

    def self_ident(self) -> ProcId:
        """The supervisor's own identity."""
        me = proctree.read_proc(os.getpid(), cmdline=False)
        return me.ident

    def check_port(self, host: str, port: int) -> None:
        """A 'failed to start' error when vLLM's port cannot be bound."""
        preflight.check_port(host, port)

    def port_holder(self, port: int) -> str | None:
        """Who listens on PORT."""
        return preflight.port_holder(port)

    def start_guard(self, grace_s: float, kill_wait_s: float) -> DeathGuard:
        """Fork the death guard."""
        guard = DeathGuard(grace_s, kill_wait_s)
        self._guard_pid = guard.start()
        return guard

    def make_leftovers(self, private_tmp: bool) -> Leftovers:
        """The tree's private TMPDIR (made now) and its /dev/shm bookkeeping."""
        return Leftovers(private_tmp)

    def spawn(self, argv, env, pdeathsig) -> tuple[LaunchRecord, tuple[int, int]]:
        """Start ARGV in a new session; its launch record and its stdout/stderr fds."""
        proc, rec = proctree.spawn(argv, env, pdeathsig, HANDLED)
        fds = []
        for stream in (proc.stdout, proc.stderr):
            fds.append(os.dup(stream.fileno()))
            stream.close()
        self._popen = proc
        return rec, (fds[0], fds[1])

    def start_pumps(self, fds, sink, taps) -> list[StreamPump]:
        """One thread per stream, copying it to SINK and the TAPS."""
        pumps = [StreamPump(n, fd, sink, taps)
                 for n, fd in zip(("stdout", "stderr"), fds, strict=True)]
        for p in pumps:
            p.start()
        return pumps

    def start_health(self, scheme, host, port, ready_poll, clock, interval, failures):
        """The /health polling thread."""
        h = HealthWatch(scheme, host, port, ready_poll, clock, interval, failures)
        h.start()
        return h

    def start_progress(self, ep, judge, kind, interval_s, timeout_s, clock, model_hint):
        """The progress probe's thread."""
        w = ProgressWatch(ep, judge, kind, interval_s, timeout_s, clock, model_hint)
        w.start()
        return w

    def fetch_metrics(self, ep, timeout):
        """vLLM's /metrics, parsed (None when it does not answer)."""
        return vllm_http.fetch_metrics(ep, timeout)

    def start_drain(self, ep, first):
        """/metrics polled while vLLM drains."""
        w = DrainWatch(ep, first)
        w.start()
        return w

    def diagnose(self, pids, cpu_before, window_s, budget_s, log_lines):
        """A hung tree's diagnosis (host/diagnose.py)."""
        from vllm_supervisor.host import diagnose

        return diagnose.diagnose(pids, cpu_before, window_s, budget_s, log_lines=log_lines)

    def snapshot(self, exclude: set[int], titles: bool) -> list[ProcInfo]:
        """Every descendant of the supervisor but EXCLUDE (the guard)."""
        return proctree.descendants(os.getpid(), exclude, cmdline=titles)

    def read_proc(self, pid: int, cmdline: bool = True) -> ProcInfo | None:
        """One process from /proc."""
        return proctree.read_proc(pid, cmdline)

    def wchan(self, pid: int) -> str:
        """Where PID sleeps in the kernel."""
        return proctree.wchan(pid)

    def user_of(self, pid: int) -> str:
        """PID's owner."""
        return proctree.user_of(pid)

    def signal_child(self, pid: int, sig: int) -> str:
        """SIG to our own unreaped child (it cannot have been replaced)."""
        try:
            os.kill(pid, sig)
            return "sent"
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            return "eperm"

    def signal_group(self, pgid: int, sig: int) -> str:
        """SIG to a process group."""
        return proctree.signal_group(pgid, sig)

    def signal_process(self, ident: ProcId, sig: int) -> str:
        """SIG to exactly this process (pidfd and identity check)."""
        return identity.signal_process(ident, sig)

    def reap(self) -> list[tuple[int, int]]:
        """Reap every ended child but the guard (waited for at the end)."""
        out = []
        for pid, status in proctree.reap_all():
            if pid == self._guard_pid:
                continue
            if self._popen is not None and pid == self._popen.pid:
                self._popen.returncode = proctree.shell_code(status)  # Popen must not wait
            out.append((pid, status))
        return out

    def wait_signals(self, timeout: float) -> list[Received]:
        """Wait up to TIMEOUT for signals."""
        return self._inbox.wait(timeout)

    def wait_exit(self, pid: int | None, timeout_s: float | None = None) -> None:
        """Wait for our child PID to exit and reap it (the guard, after 'done'); with
        TIMEOUT_S, give up after that long (the pidfd turns readable at its exit)."""
        if pid is None:
            return
        try:
            if timeout_s is not None:
                fd = os.pidfd_open(pid)
                try:
                    select.select([fd], [], [], timeout_s)
                finally:
                    os.close(fd)
                os.waitpid(pid, os.WNOHANG)
            else:
                os.waitpid(pid, 0)
        except (ChildProcessError, ProcessLookupError):
            pass  # already reaped
