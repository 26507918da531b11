"""How signals reach the supervisor's loop: blocked, then taken with sigtimedwait.

No Python signal handler runs at all: the stop signals and SIGCHLD are blocked in every
thread and collected synchronously by the main loop, which also learns the sender's PID
(si_pid) for free. This removes the usual races between a handler and the loop.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# SIGUSR1 is an internal wake-up: helper threads send it so the loop reacts at once.
WAKE_SIGNAL = signal.SIGUSR1
HANDLED = (*STOP_SIGNALS, signal.SIGCHLD, WAKE_SIGNAL)


@dataclass(frozen=True)
class Received:
    """One signal taken from the queue, with who sent it."""

    signo: int
    sender_pid: int | None
    sender: str | None

    @property
    def name(self) -> str:
        """SIGTERM and so on."""
        return signal.Signals(self.signo).name


SI_KERNEL = 0x80
OUTSIDE = "a process outside this PID namespace (docker stop, the container runtime, kubelet)"


def describe_sender(pid: int, code: int) -> str:
    """Who sent a stop signal, from its siginfo. kill() from a process this PID namespace
    cannot see (`docker stop` reaches a container's PID 1 from the host) arrives with
    si_code SI_USER and si_pid 0; the terminal's Ctrl-C and the kernel's own signals carry
    SI_KERNEL."""
    if code == SI_KERNEL or code > 0:
        return "the kernel (terminal or OOM)"
    if pid == 0:
        return OUTSIDE
    try:
        p = psutil.Process(pid)
        cmd = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return f"pid {pid} (gone)"
    return f"pid {pid} ({cmd[:120]})"


class SignalInbox:
    """Blocks HANDLED signals (call before any thread starts) and hands them to the loop."""

    def block(self) -> None:
        """Block the handled signals in this thread; threads started later inherit it. They
        stay blocked until the process exits, so a late signal cannot kill it mid-report."""
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)

    def wait(self, timeout: float) -> list[Received]:
        """Wait up to TIMEOUT seconds for a signal; return it and everything else pending."""
        got = []
        info = signal.sigtimedwait(HANDLED, max(timeout, 0.0))
        while info is not None:
            sender = None
            if info.si_signo in STOP_SIGNALS:
                sender = describe_sender(info.si_pid, info.si_code)
            got.append(Received(info.si_signo, info.si_pid or None, sender))
            info = signal.sigtimedwait(HANDLED, 0)
        return got


def send_self_later(delay_s: float, sig: int) -> threading.Timer:
    """Send SIG to this process after DELAY_S seconds, from a daemon timer thread (the
    signal is blocked in every thread and taken by the loop like any other)."""
    t = threading.Timer(delay_s, os.kill, (os.getpid(), sig))
    t.daemon = True
    t.start()
    return t
