"""A bounded-time diagnosis of a hung tree, taken before anything is stopped: for each process
its state, wchan, kernel stack, CPU used over a window, the last log line that names it, and
its Python stack (`py-spy dump --nonblocking`, one subprocess per pid, all in parallel).

It reads /proc and runs py-spy; it signals nothing but the py-spy processes it started (a
SIGKILL when one overruns the budget) and writes nothing. Every /proc read and every py-spy
runs in a thread of its own, so a read that blocks (cmdline takes the mmap lock of a process
that may be exiting) costs that one fact, never the deadline."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from types import EllipsisType

from vllm_supervisor.host.proctree import read_proc

EXTRA_HINT = "pip install 'vllm-supervise[diagnose]'"
BUDGET_S = 20.0  # a hang's diagnosis ends within this (the unit's WatchdogSec allows for it)
CAP_SYS_PTRACE = 19
KILL_WAIT_S = 0.5  # for a py-spy killed on overrunning to end and be reaped
JOIN_MARGIN_S = 0.25  # past the deadline, for threads that finish on time to be seen done
SHOW_PY_LINES = 25  # per process, in lines()
SHOW_KERNEL_FRAMES = 4  # per process, in lines()
KEEP_PY_LINES = 400  # per process, kept in the record
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LOG_PID = re.compile(r"\([^()]* pid=(\d+)\)")  # vLLM's "(EngineCore_DP0 pid=123) " prefix
_FRAME_ADDR = re.compile(r"^\[<[0-9a-f]+>\]\s*")


@dataclass(frozen=True)
class ProcessDiagnosis:
    """What one process was doing; every *_note says why a reading is missing."""

    pid: int
    title: str  # the command line / process title as the kernel shows it
    state: str  # "T (stopped)", "D (disk sleep)", "S (sleeping)", "gone", ...
    wchan: str  # the kernel function it waits in; "" when running; else a reason
    kernel_stack: tuple[str, ...]  # /proc/PID/stack frames (root only)
    kernel_stack_note: str
    cpu_s: float | None  # CPU seconds (all threads) over the window; None: unknown
    python_stack: tuple[str, ...]  # `py-spy dump` lines from the first thread on
    python_note: str
    last_log: str = ""  # the last of log_lines that names this pid ("(... pid=N)")


@dataclass(frozen=True)
class Diagnosis:
    """Every process of the tree, plus notes on the diagnosis as a whole."""

    processes: tuple[ProcessDiagnosis, ...]
    notes: tuple[str, ...]
    window_s: float
    took_s: float

    def lines(self) -> list[str]:
        """Compact human lines: a header, the notes, then per process one line and its
        Python stack (at most SHOW_PY_LINES lines), last log line and kernel frames."""
        head = (f"diagnosis of {len(self.processes)} processes "
                f"(CPU over {self.window_s:.1f} s, took {self.took_s:.1f} s)")
        out = [head, *(f"note: {n}" for n in self.notes)]
        for p in self.processes:
            cpu = "cpu ?" if p.cpu_s is None else f"cpu {p.cpu_s:.2f} s"
            title = " ".join(p.title.split())[:80] or "?"  # a title may hold newlines
            out.append(f"pid {p.pid} {title}: {p.state}, wchan {p.wchan or '-'}, {cpu}")
            if p.last_log:
                out.append(f"  last log: {p.last_log}")
            if p.python_stack:
                out += [f"  {line}" for line in p.python_stack[:SHOW_PY_LINES]]
                if (more := len(p.python_stack) - SHOW_PY_LINES) > 0:
                    out.append(f"  ... {more} more lines")
            elif p.python_note:
                out.append(f"  python: {p.python_note}")
            if p.kernel_stack:
                names = [f.split("+", 1)[0] for f in p.kernel_stack[:SHOW_KERNEL_FRAMES]]
                more = " < ..." if len(p.kernel_stack) > SHOW_KERNEL_FRAMES else ""
                out.append("  kernel: " + " < ".join(names) + more)
            elif p.kernel_stack_note:
                out.append(f"  kernel: {p.kernel_stack_note}")
        return out

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples as lists)."""
        def plain(p: ProcessDiagnosis) -> dict:
            return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p).items()}
        return {"window_s": round(self.window_s, 3), "took_s": round(self.took_s, 3),
                "notes": list(self.notes), "processes": [plain(p) for p in self.processes]}


def cpu_ticks(pids) -> dict[int, int]:
    """utime+stime clock ticks (all threads) of each live pid now: the window's start."""
    infos = (read_proc(pid, cmdline=False) for pid in pids)
    return {i.pid: i.cpu_ticks for i in infos if i is not None}


def cpu_seconds(before: int | None, now: int | None) -> float | None:
    """CPU seconds between two tick readings of one pid; None when either is missing or
    the count went down (the pid was reused)."""
    if before is None or now is None or now < before:
        return None
    return (now - before) / _CLK_TCK


def ptrace_rule(scope: int | None, has_cap: bool, same_uid: bool, is_descendant: bool,
                caps_superset: bool = True) -> str:
    """The kernel rule that forbids the tracer (py-spy) to read the target, in one phrase;
    "" when none does. SCOPE: Yama's ptrace_scope (None: Yama is not active); HAS_CAP: the
    tracer holds CAP_SYS_PTRACE; SAME_UID: the target's uids and gids are the tracer's;
    IS_DESCENDANT: the target descends from the tracer (never so for a py-spy we start: it
    is the supervisor's child, a sibling of the tree, so scope 1 needs the capability);
    CAPS_SUPERSET: the tracer holds every capability the target holds.
    A target may still allow a tracer (PR_SET_PTRACER) or refuse (non-dumpable), and
    seccomp or an LSM may refuse: py-spy's own error text has the last word."""
    if scope == 3:
        return "Yama ptrace_scope=3 forbids it to every process, CAP_SYS_PTRACE included"
    if has_cap:
        return ""
    lacks = "and this process lacks CAP_SYS_PTRACE"
    if not same_uid:
        return f"the target runs as another user, {lacks}"
    if not caps_superset:
        return f"the target holds capabilities this process lacks, {lacks}"
    if scope == 2:
        return "Yama ptrace_scope=2 needs CAP_SYS_PTRACE, which this process lacks"
    if scope == 1 and not is_descendant:
        return ("Yama ptrace_scope=1 lets a tracer read only its own descendants (py-spy is "
                "the supervisor's child, not the tree's ancestor) without CAP_SYS_PTRACE, "
                "which this process lacks")
    return ""


def read_dump(out: str, err: str, rule: str, gone: bool) -> tuple[tuple[str, ...], str]:
    """(Python stack lines, note) from a finished py-spy dump's stdout and stderr. The stack
    starts at the first "Thread" line (the header repeats the title); RULE is ptrace_rule's
    verdict for this target, GONE whether it has exited since."""
    lines = out.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("Thread ")), None)
    if first is not None:
        stack = tuple(line.rstrip() for line in lines[first:] if line.strip())
        return stack[:KEEP_PY_LINES], ""
    if gone:
        return (), "exited"
    text = _error_text(err or out)
    low = text.lower()
    if "permission denied" in low or "operation not permitted" in low:
        why = rule or (f"py-spy: {text}; no uid, capability or Yama rule explains it: seccomp, "
                       "an LSM or a non-dumpable target?")
        return (), f"ptrace not permitted ({why})"
    if "python version" in low or "python interpreter" in low:
        return (), f"not a Python process (py-spy: {text})"
    return (), f"py-spy failed: {text or 'no output'}"


def _error_text(err: str) -> str:
    """py-spy's error and its causes on one line, without a backtrace."""
    keep: list[str] = []
    for line in err.splitlines():
        s = line.strip()
        if s.startswith("Stack backtrace"):
            break
        s = re.sub(r"^(Error:|\d+:)\s*", "", s)
        if s and s != "Caused by:" and s not in keep:
            keep.append(s)
    return "; ".join(keep)[:300]


def find_py_spy() -> str | None:
    """py-spy on PATH, else beside this interpreter's scripts (a venv's bin/ not on PATH)."""
    found = shutil.which("py-spy")
    if found:
        return found
    local = os.path.join(sysconfig.get_path("scripts"), "py-spy")
    return local if os.access(local, os.X_OK) else None


def ptrace_scope() -> int | None:
    """Yama's /proc/sys/kernel/yama/ptrace_scope, or None when Yama is not active."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _status(pid: int | str) -> dict[str, str] | None:
    """/proc/PID/status as a dict, or None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return None


def exec_caps() -> int:
    """The capabilities a program we start (py-spy) will hold: root's are our bounding set;
    another user keeps only its ambient ones across exec."""
    me = _status("self") or {}
    return int(me.get("CapBnd" if os.geteuid() == 0 else "CapAmb", "0"), 16)


def _rule_for(status: dict[str, str], scope: int | None, caps: int) -> str:
    """ptrace_rule for one target, from its /proc status."""
    ids = status["Uid"].split()[:3], status["Gid"].split()[:3]
    same = all(int(u) == os.getuid() for u in ids[0]) and all(int(g) == os.getgid()
                                                              for g in ids[1])
    target_caps = int(status.get("CapPrm", "0"), 16)
    return ptrace_rule(scope, bool(caps >> CAP_SYS_PTRACE & 1), same, False,
                       target_caps & ~caps == 0)


def _wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return "gone"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return "" if text in ("", "0") else text


def _kernel_stack(pid: int) -> tuple[tuple[str, ...], str]:
    try:
        with open(f"/proc/{pid}/stack") as f:
            text = f.read()
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            return (), "gone"
        return (), "no /proc/PID/stack (a kernel without CONFIG_STACKTRACE)"
    except PermissionError:
        if os.geteuid() != 0:
            return (), "needs root"
        return (), "not permitted (root without CAP_SYS_ADMIN in the initial user namespace)"
    except OSError as e:
        return (), f"unreadable ({e.strerror})"
    frames = tuple(_FRAME_ADDR.sub("", line) for line in text.splitlines() if line.strip())
    return frames, "" if frames else "empty (on a CPU, or the kernel shows none)"


def _title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


class _Probe:
    """What is known of one pid so far: its threads fill it, diagnose reads it at the end."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.facts: dict = {}
        self.reading = f"/proc/{pid}/stat"
        self.dump: tuple[str, str] | str | None = None  # (stdout, stderr), or a note

    def read_facts(self) -> None:
        """The /proc readings, the one that may block (cmdline) last."""
        pid = self.pid
        info = read_proc(pid, cmdline=False)
        self.facts["ticks"] = info.cpu_ticks if info else None
        self.reading = f"/proc/{pid}/status"
        self.facts["status"] = _status(pid)
        self.reading = f"/proc/{pid}/wchan"
        self.facts["wchan"] = _wchan(pid)
        self.reading = f"/proc/{pid}/stack"
        self.facts["kernel"] = _kernel_stack(pid)
        self.reading = f"/proc/{pid}/cmdline"
        try:
            self.facts["title"] = _title(pid)
        except OSError:
            self.facts["title"] = ""

    def run_py_spy(self, py_spy: str, deadline: float) -> None:
        """One `py-spy dump --nonblocking`, SIGKILLed and reaped if it overruns DEADLINE."""
        argv = [py_spy, "dump", "--pid", str(self.pid), "--nonblocking"]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE,
                                    env=dict(os.environ, RUST_BACKTRACE="0"),  # no backtrace
                                    encoding="utf-8", errors="replace")
        except OSError as e:
            self.dump = f"cannot run {py_spy}: {e.strerror}"
            return
        started = time.monotonic()
        try:
            self.dump = proc.communicate(timeout=max(0.0, deadline - started - KILL_WAIT_S))
            return
        except subprocess.TimeoutExpired:
            proc.kill()
        took = time.monotonic() - started
        try:
            proc.communicate(timeout=KILL_WAIT_S)
            self.dump = f"py-spy timed out after {took:.1f} s (killed)"
        except subprocess.TimeoutExpired:  # stuck in the kernel: leave it to be reaped later
            proc.stdout.close()
            proc.stderr.close()
            self.dump = f"py-spy timed out after {took:.1f} s and did not end on SIGKILL"


def _thread(target, *args) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True, name="diagnose")
    t.start()
    return t


def diagnose(pids: list[int], cpu_before: dict[int, int], window_s: float,
             budget_s: float = BUDGET_S, py_spy: str | None | EllipsisType = ...,
             log_lines: Iterable[str] = ()) -> Diagnosis:
    """Diagnose PIDS within BUDGET_S seconds (plus a fraction of one), whatever they do.
    CPU_BEFORE: cpu_ticks() at the start of the WINDOW_S-second window that ends now.
    PY_SPY: its path; ... (the default) finds it now; None: no Python stacks. LOG_LINES:
    recent log lines, each process shown with the last one naming its pid."""
    start = time.monotonic()
    deadline = start + budget_s
    if py_spy is ...:
        py_spy = find_py_spy()
    probes = [_Probe(pid) for pid in pids]
    facts = [_thread(p.read_facts) for p in probes]
    spies = [_thread(p.run_py_spy, py_spy, deadline) for p in probes] if py_spy else []
    for t in facts:
        t.join(max(0.0, deadline - time.monotonic()))
    for t in spies:
        t.join(max(0.0, deadline + JOIN_MARGIN_S - time.monotonic()))
    scope, caps = ptrace_scope(), exec_caps()
    last = {}
    for line in log_lines:
        if m := _LOG_PID.search(line):
            last[int(m.group(1))] = line.strip()[:200]
    procs = tuple(_compose(p, py_spy, scope, caps, cpu_before, last.get(p.pid, ""))
                  for p in probes)
    return Diagnosis(procs, _notes(procs, py_spy), window_s, time.monotonic() - start)


def _compose(probe: _Probe, py_spy: str | None, scope: int | None, caps: int,
             cpu_before: dict[int, int], last_log: str) -> ProcessDiagnosis:
    """One process's record from whatever its threads found in time."""
    f, late = probe.facts, f"unknown (reading {probe.reading} did not finish in time)"
    status = f.get("status")
    if "status" not in f:
        state = late
    else:
        state = status["State"] if status else "gone"
    kernel, kernel_note = f.get("kernel", ((), late))
    title = f.get("title") or (status or {}).get("Name", "")
    gone = state == "gone" or state.startswith("Z") or not os.path.exists(f"/proc/{probe.pid}")
    if not py_spy:
        stack, note = (), "py-spy is not installed"
    elif probe.dump is None:
        stack, note = (), "py-spy did not finish in time"
    elif isinstance(probe.dump, str):
        stack, note = (), probe.dump
    else:
        rule = _rule_for(status, scope, caps) if status else ""
        stack, note = read_dump(*probe.dump, rule, gone)
    return ProcessDiagnosis(
        pid=probe.pid, title=title, state=state, wchan=f.get("wchan", late),
        kernel_stack=kernel, kernel_stack_note=kernel_note,
        cpu_s=cpu_seconds(cpu_before.get(probe.pid), f.get("ticks")),
        python_stack=stack, python_note=note, last_log=last_log)


def _notes(procs: tuple[ProcessDiagnosis, ...], py_spy: str | None) -> tuple[str, ...]:
    """Whole-diagnosis notes: py-spy missing, ptrace refused (per rule), dumps killed."""
    if not py_spy:
        return (f"no Python stacks: py-spy is not installed ({EXTRA_HINT})",)
    notes = []
    denied: dict[str, list[int]] = {}
    for p in procs:
        if p.python_note.startswith("ptrace not permitted"):
            denied.setdefault(p.python_note, []).append(p.pid)
    for note, pids in denied.items():
        which = "" if len(pids) == len(procs) else f" for pid {', '.join(map(str, pids))}"
        notes.append(f"no Python stacks{which}: {note}")
    killed = [str(p.pid) for p in procs if p.python_note.startswith("py-spy timed out")]
    if killed:
        notes.append(f"budget spent: py-spy killed for pid {', '.join(killed)}")
    return tuple(notes)
