"""The OS boundary for processes: spawn in a new session, read /proc, signal, reap."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Iterable, Sequence

import psutil

from vllm_supervisor.errors import ExitCode, LaunchError
from vllm_supervisor.host.procinfo import LaunchRecord, ProcInfo

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_BOOT_TIME = psutil.boot_time()
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> int:
    res = _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def become_subreaper() -> None:
    """Adopt every orphan the tree makes (PR_SET_CHILD_SUBREAPER), so it stays ours to reap."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def read_proc(pid: int, cmdline: bool = True) -> ProcInfo | None:
    """One process from /proc/PID/stat (+cmdline), or None when it is gone.

    Reading cmdline takes the process's mmap lock, which a process in the middle of
    exiting holds while it unmaps (for a GPU worker, tens of GiB of mappings): callers
    that walk a dying tree pass cmdline=False and keep the titles they already know."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return None
    # comm may hold spaces or parentheses: split around the last ')'.
    lpar, rpar = raw.find(b"("), raw.rfind(b")")
    name = raw[lpar + 1 : rpar].decode(errors="replace")
    rest = raw[rpar + 2 :].split()
    cmd = ""
    if cmdline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    start = int(rest[19])
    return ProcInfo(
        pid=pid,
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        start_ticks=start,
        create_time=round(_BOOT_TIME + start / _CLK_TCK, 2),  # as psutil computes it
        name=name,
        cmdline=cmd,
        state=rest[0].decode(),
        rss_bytes=int(rest[21]) * _PAGE,
        cpu_ticks=int(rest[11]) + int(rest[12]),
    )


def _children_of(pid: int) -> list[int]:
    """Direct children of PID, from every thread's /proc children list."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


_HAVE_CHILDREN_FILE = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def descendants(root: int, exclude: Iterable[int] = (), cmdline: bool = True) -> list[ProcInfo]:
    """Every live descendant of ROOT (zombies included), skipping EXCLUDE and their subtrees."""
    skip = set(exclude)
    if _HAVE_CHILDREN_FILE:
        pids, stack, seen = [], list(_children_of(root)), set()
        while stack:
            pid = stack.pop()
            if pid in seen or pid in skip:
                continue
            seen.add(pid)
            pids.append(pid)
            stack.extend(_children_of(pid))
    else:  # kernels without CONFIG_PROC_CHILDREN: psutil scans all of /proc
        try:
            kids = psutil.Process(root).children(recursive=True)
        except psutil.Error:
            kids = []
        pids = [p.pid for p in kids if p.pid not in skip]
    infos = (read_proc(p, cmdline) for p in pids)
    return [i for i in infos if i is not None]


def signal_group(pgid: int, sig: int) -> str:
    """Send SIG to a process group: 'sent', 'gone' or 'eperm'."""
    try:
        os.killpg(pgid, sig)
        return "sent"
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "eperm"


def reap_all() -> list[tuple[int, int]]:
    """Reap every child that has ended: [(pid, raw wait status)], never blocking."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        out.append((pid, status))
    return out


def describe_status(status: int) -> tuple[str, int, str]:
    """(outcome, code, text) for a raw wait status: exited N / killed by SIGX."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return "killed", sig, f"killed by {signal_name(sig)}"
    code = os.waitstatus_to_exitcode(status)
    return "exited", code, f"exited with {code}"


def shell_code(status: int) -> int:
    """The exit code a shell would show: N, or 128+S for a death by signal S."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def signal_name(sig: int) -> str:
    """SIGTERM for 15, and so on."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def wchan(pid: int) -> str:
    """The kernel function a process sleeps in, when the kernel tells."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def _child_setup(parent: int, pdeathsig: int | None, unblock: Sequence[int]) -> None:
    """Runs in the child between fork and exec (async-signal-safe calls only)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)
    if pdeathsig:
        _prctl(PR_SET_PDEATHSIG, pdeathsig)
        # The parent may have died before prctl took effect: then act on it now.
        if os.getppid() != parent:
            os.kill(os.getpid(), pdeathsig)


def resolve_binary(path: str) -> str:
    """An executable path for PATH-or-file PATH: an ELF binary or a script whose #! names
    an existing interpreter; or LaunchError with exit 127/126."""
    import shutil

    hint = "pass --vllm-bin PATH or set VLLM_SUPERVISE_VLLM_BIN"
    if not path:
        raise LaunchError("the vLLM binary path is empty", hint, ExitCode.NOT_EXECUTABLE)
    found = path if os.sep in path else shutil.which(path)
    if found is None:
        raise LaunchError(f"{path!r} not found on PATH", "install vLLM (pip install vllm), or "
                          f"{hint}; `vllm-supervise demo` runs without vLLM",
                          ExitCode.NOT_FOUND)
    if not os.path.exists(found):
        raise LaunchError(f"vLLM binary {path!r} does not exist", hint, ExitCode.NOT_FOUND)
    if not os.access(found, os.X_OK) or os.path.isdir(found):
        raise LaunchError(f"vLLM binary {path!r} is not executable",
                          f"chmod +x {found}, or point --vllm-bin at the vllm script",
                          ExitCode.NOT_EXECUTABLE)
    try:
        with open(found, "rb") as f:
            head = f.read(256)
    except OSError:
        return found  # executable but unreadable: exec may still run an ELF binary
    why = None
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        interp = os.fsdecode(words[0]) if words else ""
        if not interp:
            why = "its #! line names no interpreter"
        elif not os.path.isfile(interp):
            why = f"its #! line names {interp}, which does not exist"
        elif not os.access(interp, os.X_OK):
            why = f"its #! line names {interp}, which is not executable"
    elif not head.startswith(b"\x7fELF"):
        why = "it is neither an ELF binary nor a script with a #! line"
    if why:
        raise LaunchError(f"vLLM binary {found!r} cannot be run: {why}",
                          f"point --vllm-bin at the vllm script; {hint}",
                          ExitCode.NOT_EXECUTABLE)
    return found


def spawn(
    argv: Sequence[str],
    env: dict[str, str] | None,
    pdeathsig: int | None,
    unblock: Sequence[int],
) -> tuple[subprocess.Popen, LaunchRecord]:
    """Start ARGV in a new session with piped stdout/stderr; return it and its launch record."""
    import time

    parent = os.getpid()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(parent, pdeathsig, unblock),  # noqa: PLW1509 - no thread exists yet
        )
    except FileNotFoundError as e:
        raise LaunchError(f"cannot start {argv[0]!r}: {e.strerror}", None, ExitCode.NOT_FOUND)
    except PermissionError as e:
        raise LaunchError(f"cannot start {argv[0]!r}: {e.strerror}", None, ExitCode.NOT_EXECUTABLE)
    info = read_proc(proc.pid, cmdline=False)
    rec = LaunchRecord(
        argv=tuple(argv),
        pid=proc.pid,
        pgid=proc.pid,  # setsid made it leader of a new session and group
        sid=proc.pid,
        # Our unreaped child cannot be gone from /proc: info is there (a zombie at worst).
        start_ticks=info.start_ticks if info else 0,
        create_time=info.create_time if info else round(time.time(), 2),
        started_wall=time.time(),
    )
    return proc, rec


def user_of(pid: int) -> str:
    """The owner of PID, or '?' when it cannot be seen."""
    import pwd

    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    try:
                        return pwd.getpwuid(uid).pw_name
                    except KeyError:
                        return str(uid)
    except OSError:
        pass
    return "?"
