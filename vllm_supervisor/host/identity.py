"""The one rule for "is this still that process": the PID and its start time in clock
ticks since boot, exactly, on the same boot. Never a float tolerance, never a name."""

from __future__ import annotations

import errno
import os
import signal

from vllm_supervisor.host.procinfo import ProcId, ProcInfo
from vllm_supervisor.host.proctree import read_proc


def boot_id() -> str:
    """This boot's id (/proc/sys/kernel/random/boot_id): start ticks count from boot, so an
    identity recorded before a reboot names nothing after it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


BOOT_ID = boot_id()


def current(ident: ProcId, cmdline: bool = False, boot: str | None = None) -> ProcInfo | None:
    """The process IDENT names, if that very process still exists (zombies included);
    None when it is gone, the PID was reused, or BOOT (a recorded boot id) is not this boot."""
    if boot is not None and boot != BOOT_ID:
        return None
    info = read_proc(ident.pid, cmdline=cmdline)
    if info is None or info.start_ticks != ident.start_ticks:
        return None
    return info


def alive(ident: ProcId, cmdline: bool = False, boot: str | None = None) -> ProcInfo | None:
    """Like current(), but a zombie (dead, not yet reaped) counts as gone."""
    info = current(ident, cmdline, boot)
    return None if info is None or info.state == "Z" else info


def signal_process(ident: ProcId, sig: int) -> str:
    """Send SIG to exactly this process: 'sent', 'gone' (ESRCH or PID reused) or 'eperm'.
    The pidfd is opened first and the identity checked after: once the pidfd exists it
    names that process even if the PID is reused, so check and signal cannot race."""
    try:
        fd = os.pidfd_open(ident.pid)
    except ProcessLookupError:
        return "gone"
    except OSError as e:  # pidfd unsupported: fall back to check-then-kill
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        fd = None
    try:
        if current(ident) is None:
            return "gone"
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(ident.pid, sig)
        return "sent"
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "eperm"
    finally:
        if fd is not None:
            os.close(fd)
