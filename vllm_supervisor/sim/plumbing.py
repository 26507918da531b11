"""Process plumbing for the simulated vLLM: logging, fork, titles, pipes and signals.

Everything here runs in processes made with ``os.fork()`` while single-threaded; children
exit with ``os._exit`` so they never run the parent's cleanup.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import threading
import time
import traceback

try:
    import setproctitle
except ImportError:  # optional: prctl alone still sets the name ps shows
    setproctitle = None

TERM_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PREFIX = ""  # "(EngineCore_DP0 pid=N) " in children, as vLLM prefixes its subprocesses' logs
# One writer at a time within a process: a big flood write can be split by the pipe, and
# another thread's line must not land inside it.
OUT_LOCK = threading.Lock()


# ---------------------------------------------------------------- logging


def emit(line: str, err: bool = False) -> None:
    """Write one whole line to stdout (or stderr) and flush it."""
    stream = sys.stderr if err else sys.stdout
    try:
        with OUT_LOCK:
            stream.write(line + "\n")  # one write: lines from several processes don't mix
            stream.flush()
    except (OSError, ValueError):
        pass  # a closed log pipe must not change how the tree behaves


def log(level: str, msg: str, where: str = "api_server.py") -> None:
    """A vLLM-style log line; INFO goes to stdout, anything else to stderr."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    emit(f"{_PREFIX}{level} {stamp} [{where}:1] {msg}", err=level != "INFO")


def flush() -> None:
    """Flush Python's stdout/stderr buffers (before fork, so children do not repeat them)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


# ---------------------------------------------------------------- processes


def set_title(title: str, comm: str | None = None) -> None:
    """Set the title ps shows (cmdline) and the 15-character comm."""
    if setproctitle is not None:
        setproctitle.setproctitle(title)
    try:  # PR_SET_NAME (15): comm, which ps -o comm and psutil's name() show
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p((comm or title).encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def fork(child, *args) -> int:
    """Fork; the child runs ``child(*args)`` and exits with its return value (never returns)."""
    flush()
    # Block SIGTERM/SIGINT across fork so that the child, until child_setup, cannot run the
    # parent's handler (which writes into the parent's self-pipe).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERM_SIGNALS)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return pid
    code = 1
    try:
        for sig in TERM_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        code = child(*args) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
        traceback.print_exc()
    finally:
        flush()
        os._exit(code)


def child_setup(keep=(), title=None, prefix=None, on_term="default"):
    """Start of a forked child: drop inherited fds, set title, then set and unblock signals.

    ``on_term`` is "default", "ignore" or "pipe"; with "pipe" the new Signals is returned.
    """
    global _PREFIX
    keep = {0, 1, 2, *keep}
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:  # pipe ends of other relations: they must be able to see EOF
            try:
                os.close(int(name))
            except OSError:
                pass
    if title:
        set_title(title)
    if prefix:
        _PREFIX = f"({prefix} pid={os.getpid()}) "
    sigs = None
    if on_term == "ignore":
        for sig in TERM_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    elif on_term == "pipe":
        sigs = Signals().install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERM_SIGNALS)
    return sigs


def stdio_to_devnull() -> None:
    """Point fds 0-2 at /dev/null, as a well-behaved daemon does."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid``, ignoring that it may be gone already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def hang_forever() -> None:
    """Block for good, deaf to SIGTERM/SIGINT (only SIGKILL ends this)."""
    for sig in TERM_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    while True:
        time.sleep(3600)


class Child:
    """A direct child whose exit can be polled from several threads (HTTP and main)."""

    def __init__(self, pid: int):
        self.pid, self.status, self._lock = pid, None, threading.Lock()

    def alive(self) -> bool:
        """Whether it has not exited yet (reaps it if it has)."""
        with self._lock:
            if self.status is None:
                try:
                    done, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = self.pid, 0
                if done:
                    self.status = status
            return self.status is None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever); whether it exited."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True


# ---------------------------------------------------------------- pipes and signals


class Signals:
    """Self-pipe: SIGTERM/SIGINT become bytes readable in the main flow's select()."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.w, False)

    def install(self) -> Signals:
        """Route SIGTERM and SIGINT into the pipe."""
        for sig in TERM_SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def ignore(self) -> None:
        """Ignore SIGTERM and SIGINT (signals sent meanwhile are lost)."""
        for sig in TERM_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def drain(self) -> list[int]:
        """The signal numbers received since the last drain."""
        return list(os.read(self.r, 256))

    def _handler(self, signum, _frame) -> None:
        try:
            os.write(self.w, bytes([signum]))
        except OSError:
            pass  # pipe full: a wake-up is pending anyway


def select_fds(fds, timeout: float | None) -> list[int]:
    """The fds (None entries skipped) readable within ``timeout`` s (None: forever)."""
    fds = [fd for fd in fds if fd is not None]
    timeout = None if timeout is None else max(0.0, timeout)
    if not fds:
        time.sleep(3600 if timeout is None else timeout)
        return []
    return select.select(fds, [], [], timeout)[0]


def send(fd: int, kind: str, payload: dict) -> None:
    """One message line ``kind JSON`` on a pipe (short, so atomic); a gone reader is ignored."""
    try:
        os.write(fd, f"{kind} {json.dumps(payload)}\n".encode())
    except OSError:
        pass


class Lines:
    """Reads ``kind JSON`` message lines from a pipe."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.open = fd, b"", True

    def read(self) -> list[tuple[str, dict]] | None:
        """Complete messages now available; None (and ``open`` False) at EOF (or when a
        socket peer went away with data unread: ECONNRESET)."""
        try:
            data = os.read(self.fd, 65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.open = False
            return None
        *lines, self.buf = (self.buf + data).split(b"\n")
        out = []
        for line in lines:
            kind, _, payload = line.decode().partition(" ")
            out.append((kind, json.loads(payload or "{}")))
        return out


def read_all(fd: int) -> bytes:
    """Read a pipe to EOF and close it."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to ``fd``; False if the reader went away."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError:
            return False
    return True


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
