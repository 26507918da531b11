"""What the tests share (fixtures live in conftest.py): ports, process identity, waiting on
conditions instead of sleeping, the CLI in a subprocess, and `Run`, one supervisor under test
with the recorder of its tree."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
PF_EXITING = 0x4  # task flag (field 9 of /proc/PID/stat): the process is on its way out
GUARD_TITLE = "vllm-supervise: death guard"
GUARD_EXIT_S = 10.0


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int, create_time: float | None = None) -> bool:
    """True when PID runs and is not a zombie (and, given CREATE_TIME, is still that very
    process, not a reuse of its PID)."""
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) >= 0.05:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def poll(predicate: Callable, timeout: float, interval: float = 0.02):
    """Call PREDICATE until it returns something truthy or TIMEOUT passes; its last value.
    The one place where a test sleeps: between two looks at a condition."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def wait_until(predicate: Callable, timeout: float = 10.0, what: str | Callable[[], str] = "",
               interval: float = 0.02):
    """PREDICATE's first truthy value; an AssertionError naming WHAT (a text, or a function
    giving one at the time of failure) when TIMEOUT passes first."""
    value = poll(predicate, timeout, interval)
    if not value:
        text = what() if callable(what) else what
        raise AssertionError(f"timed out after {timeout:g} s waiting for "
                             f"{text or getattr(predicate, '__name__', 'a condition')}")
    return value


def survivors(procs: Mapping[int, float | None] | Iterable[int],
              timeout: float = 0.0) -> dict[int, float | None]:
    """Those of PROCS (pid -> create_time or None, or bare pids) still alive after waiting up
    to TIMEOUT for all of them to end. Waits on pidfds, which become readable when their
    process ends: no polling, and a reused PID is never mistaken for the process."""
    procs = dict(procs) if isinstance(procs, Mapping) else dict.fromkeys(procs)
    watched: dict[int, int] = {}  # fd -> pid
    try:
        for pid, ctime in procs.items():
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue  # gone already
            if alive(pid, ctime):  # checked after the open: the fd is that very process
                watched[fd] = pid
            else:
                os.close(fd)
        poller = select.poll()
        for fd in watched:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while watched and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                del watched[fd]
                os.close(fd)
        return {pid: procs[pid] for pid in watched.values()}
    finally:
        for fd in watched:
            os.close(fd)


def still_alive(seen: Mapping[int, tuple[float, str]], timeout: float) -> list[int]:
    """Those of SEEN (pid -> (create_time, title)) still alive after up to TIMEOUT s; a
    death guard gets up to GUARD_EXIT_S: told "done", it exits by itself, and may do so
    just after the supervisor (which waits for it only when it restarts vLLM)."""
    guards = {p for p, (_, title) in seen.items() if title.startswith(GUARD_TITLE)}
    left = survivors({p: c for p, (c, _) in seen.items() if p not in guards}, timeout)
    left |= survivors({p: seen[p][0] for p in guards}, max(timeout, GUARD_EXIT_S))
    return sorted(left)


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def signal_ignored(pid: int, sig: int) -> bool:
    """Whether PID ignores SIG (SIG_IGN): the kernel discards such a signal when it is sent,
    so a test needs no wait to know it had no effect."""
    return bool(int(_proc_status(pid)["SigIgn"], 16) >> (sig - 1) & 1)


def untouched(pid: int) -> bool:
    """True while PID runs with no signal pending and is not exiting: nothing fatal was sent
    to it. A fatal signal is pending, or being acted on, from the moment kill() returns, so
    this needs no waiting either."""
    try:
        status = _proc_status(pid)
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    flags = int(stat[stat.rfind(")") + 2:].split()[6])
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return status["State"][0] not in "ZX" and not pending and not flags & PF_EXITING


def comm(pid: int) -> str:
    """The kernel's 15-character process name (psutil's name() expands it from cmdline)."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def http_get(port: int, path: str = "/health", timeout: float = 2) -> tuple[int | None, bytes]:
    """(HTTP status, body) of GET PATH on 127.0.0.1:PORT; status None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, b""


def cli(*args: str, env: dict | None = None, timeout: float = 90):
    """`python -m vllm_supervisor ARGS...` run to its end, output captured."""
    return subprocess.run([sys.executable, "-m", "vllm_supervisor", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def read_pidfile(path: Path, key: str) -> dict | None:
    """The simulated vLLM's pidfile (FAKE_VLLM_PIDFILE) once it holds KEY, else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if key in data else None


def sim_gpu(tmp_path: Path, gpus: int = 1, **knobs) -> tuple[tuple[str, str], dict]:
    """A simulated GPU folder: the supervisor's --gpu-probe option and the simulated vLLM's
    environment (KNOBS: vram_mib=1000 becomes FAKE_VLLM_VRAM_MIB=1000, and so on)."""
    d = tmp_path / "gpus"
    d.mkdir(exist_ok=True)
    env = {"FAKE_VLLM_SIM_GPU_DIR": str(d), "FAKE_VLLM_NUM_GPUS": str(gpus)}
    env |= {f"FAKE_VLLM_{k.upper()}": str(v) for k, v in knobs.items()}
    return ("--gpu-probe", f"sim:{d}:{gpus}"), env


class TreeRecorder(threading.Thread):
    """Records every descendant of a PID every 20 ms: the test's own view of the tree, as
    pid -> (create_time, latest title: a child seen between fork and exec, or before it
    set its title, shows its parent's)."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.seen: dict[int, tuple[float, str]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(0.02)  # a sampling period, not a wait for anything

    def poll(self) -> None:
        """Record the descendants alive now."""
        try:
            kids = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return
        for k in kids:
            try:
                ctime, title = k.create_time(), " ".join(k.cmdline())
            except psutil.Error:
                continue
            known = self.seen.get(k.pid)
            if known is None or (title and known[0] == ctime):
                self.seen[k.pid] = (ctime, title)

    def stop(self) -> None:
        """Stop recording."""
        self._halt.set()
        self.join(2)


@dataclass
class Run:
    """One supervisor process under test (the `supervise` fixture makes them)."""

    proc: subprocess.Popen
    tmp: Path
    recorder: TreeRecorder
    report_path: Path
    pidfile: Path
    port: int
    stderr_lines: list[str] = field(default_factory=list)
    _news: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _eof: bool = False

    @property
    def pid(self) -> int:
        """The supervisor's pid."""
        return self.proc.pid

    def start_reader(self) -> None:
        """Collect the supervisor's stderr lines in a thread, waking wait_for on each."""
        def pump():
            for raw in self.proc.stderr:
                with self._news:
                    self.stderr_lines.append(raw.decode(errors="replace"))
                    self._news.notify_all()
            with self._news:
                self._eof = True
                self._news.notify_all()
        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout: float = 30) -> None:
        """Until the supervisor's stderr shows TEXT (fails at the end of its stderr)."""
        def seen():
            return any(text in line for line in self.stderr_lines)
        with self._news:
            if self._news.wait_for(lambda: seen() or self._eof, timeout) and seen():
                return
        raise AssertionError(f"{text!r} not seen; stderr:\n" + "".join(self.stderr_lines[-40:]))

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the supervisor reports vLLM ready."""
        self.wait_for("ready: ", timeout)

    def tree_pids(self, key: str = "api", timeout: float = 20) -> dict:
        """The simulated vLLM's own account of its pids (FAKE_VLLM_PIDFILE), once it has KEY."""
        return wait_until(lambda: read_pidfile(self.pidfile, key), timeout,
                          f"the simulated vLLM's pidfile with {key!r}")

    def signal(self, sig: int) -> None:
        """Send SIG to the supervisor."""
        os.kill(self.proc.pid, sig)

    def finish(self, timeout: float = 60) -> int:
        """Wait for the supervisor to exit; return its exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def report(self) -> dict:
        """The stop report (--report-json)."""
        return json.loads(self.report_path.read_text())

    def stderr(self) -> str:
        """Everything the supervisor wrote to stderr so far."""
        return "".join(self.stderr_lines)

    def left_alive(self, timeout: float = 0.0) -> list[str]:
        """Processes the recorder saw that are alive after up to TIMEOUT s (see
        still_alive), as 'pid title'."""
        seen = dict(self.recorder.seen)
        return [f"{p} {seen[p][1]}" for p in still_alive(seen, timeout)]

    def assert_all_gone(self, timeout: float = 0.0) -> None:
        """Every process the test saw in the tree is gone (not merely unreachable)."""
        left = self.left_alive(timeout)
        assert not left, f"still alive: {left}"


def kill_all(procs: Mapping[int, float | None] | Iterable[int]) -> None:
    """SIGKILL PROCS (pid -> create_time or None, or bare pids): processes this test started
    itself, each checked to be still that process; gone ones are fine."""
    procs = dict(procs) if isinstance(procs, Mapping) else dict.fromkeys(procs)
    for pid, ctime in procs.items():
        try:
            p = psutil.Process(pid)
            if ctime is None or abs(p.create_time() - ctime) < 0.05:
                p.kill()  # psutil checks again that the PID was not reused meanwhile
        except psutil.Error:
            pass


def write_vllm_script(path) -> None:
    """A stand-in for vLLM's `vllm` console script that runs the simulated vLLM. Like the
    script pip writes (it reads `from vllm.entrypoints.cli.main import main`), it is a
    Python script, so the kernel shows `python /path/to/vllm serve ...`: cleanup
    recognises it by the same evidence as the real entry point."""
    import sys

    path.write_text(f"#!{sys.executable}\n"
                    "# stands in for: from vllm.entrypoints.cli.main import main\n"
                    "import sys\n"
                    "from vllm_supervisor.sim.server import main\n"
                    "sys.exit(main())\n")
    path.chmod(0o755)


def exposition(text: str) -> dict[tuple, float]:
    """A Prometheus text exposition as (sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def states_on(samples: dict) -> list[str]:
    """The lifecycle states the state set shows as 1 (exactly one, when it is right)."""
    return [dict(k[1])["vllm_supervise_state"] for k, v in samples.items()
            if k[0] == "vllm_supervise_state" and v == 1]
