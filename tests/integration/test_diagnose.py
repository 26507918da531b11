"""The hang diagnosis against real processes this test starts (and kills and reaps itself):
a Python child in a named function, a stopped one, CPU burnt or not, a non-Python child,
a py-spy that overruns the budget, and ptrace refused for real (another uid; a missing
CAP_SYS_PTRACE). The pure parts: tests/unit/test_diagnose.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, wait_until
from vllm_supervisor.host.diagnose import (
    CAP_SYS_PTRACE,
    cpu_ticks,
    diagnose,
    exec_caps,
    find_py_spy,
    ptrace_rule,
    ptrace_scope,
)

pytestmark = pytest.mark.timeout(60)
PY_SPY = find_py_spy()
HAS_CAP = bool(exec_caps() >> CAP_SYS_PTRACE & 1)
# What keeps py-spy from reading a child of ours here (Yama, as on most desktops and CI
# runners that are not root), or "".
BLOCKED = ptrace_rule(ptrace_scope(), HAS_CAP, True, False)
needs_py_spy = pytest.mark.skipif(PY_SPY is None, reason="py-spy is not installed")
needs_ptrace = pytest.mark.skipif(PY_SPY is None or bool(BLOCKED),
                                  reason=f"py-spy cannot read our children: {BLOCKED}")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another "
                                "uid or capability")
SLEEPER = """import sys, time
def sleeping_in_named_function():
    time.sleep(300)
print("ready", flush=True)
sleeping_in_named_function()
"""


@pytest.fixture
def start():
    """Start a child; every one is SIGKILLed (by its Popen) and reaped at the end."""
    procs: list[subprocess.Popen] = []

    def go(argv, **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
        procs.append(p)
        return p

    yield go
    for p in procs:
        p.kill()
        p.communicate(timeout=10)


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def sleeper(start) -> subprocess.Popen:
    """A Python child asleep in sleeping_in_named_function: its 'ready' line comes just
    before the call, and its first sleep after that line is the time.sleep inside it."""
    p = start([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    wait_until(lambda: state(p.pid) == "S", 10, "the child asleep")
    return p


@needs_ptrace
def test_a_python_child_shows_the_function_it_sleeps_in(start):
    p = sleeper(start)
    d = diagnose([p.pid], cpu_ticks([p.pid]), 0.0, budget_s=10)
    (pd,) = d.processes
    assert any("sleeping_in_named_function" in line for line in pd.python_stack), pd
    assert pd.python_note == "" and d.notes == ()
    assert pd.state == "S (sleeping)" and pd.wchan and "python" in pd.title
    if os.geteuid() == 0:
        assert pd.kernel_stack and pd.kernel_stack_note == ""
    else:
        assert pd.kernel_stack == () and pd.kernel_stack_note == "needs root"


@needs_ptrace
def test_a_stopped_child_is_named_so_and_does_not_hold_the_diagnosis(start):
    p = sleeper(start)
    os.kill(p.pid, signal.SIGSTOP)
    wait_until(lambda: state(p.pid) == "T", 10, "the child stopped")
    t0 = time.monotonic()
    d = diagnose([p.pid], {}, 0.0, budget_s=5)
    assert time.monotonic() - t0 < 5.5
    (pd,) = d.processes
    assert pd.state == "T (stopped)" and pd.wchan == "do_signal_stop"
    # --nonblocking reads memory without stopping (ptrace-attaching) the target.
    assert any("sleeping_in_named_function" in line for line in pd.python_stack), pd
    assert state(p.pid) == "T"  # left as it was: nothing was sent to it


def test_cpu_over_the_window_tells_a_burning_child_from_a_sleeping_one(start):
    burner = start([sys.executable, "-c", "while True: pass"])
    idle = sleeper(start)
    before = cpu_ticks([burner.pid, idle.pid])
    t0 = time.monotonic()
    wait_until(lambda: cpu_ticks([burner.pid])[burner.pid] >= before[burner.pid] + 10, 20,
               "the burner to use 10 ticks of CPU")
    d = diagnose([burner.pid, idle.pid], before, time.monotonic() - t0, budget_s=5,
                 py_spy=None)
    burnt, slept = d.processes
    assert burnt.cpu_s >= 10 / os.sysconf("SC_CLK_TCK") and burnt.state == "R (running)"
    assert slept.cpu_s == 0.0


@needs_ptrace
def test_a_non_python_child_says_so(start):
    p = start(["sleep", "30"])
    wait_until(lambda: state(p.pid) == "S", 10, "sleep asleep")
    (pd,) = diagnose([p.pid], {}, 0.0, budget_s=10).processes
    assert pd.title == "sleep 30" and pd.python_stack == ()
    assert pd.python_note.startswith("not a Python process (py-spy: "), pd.python_note


def test_a_py_spy_that_overruns_the_budget_is_killed_and_reaped(start, tmp_path):
    """Three dumps that never end run side by side: the call takes the budget once, and
    each stand-in py-spy is gone (not a zombie) when it returns."""
    kids = [sleeper(start) for _ in range(3)]
    slow = tmp_path / "py-spy"
    slow.write_text(f'#!/bin/sh\necho $$ >> {tmp_path}/spies\nexec sleep 60\n')
    slow.chmod(0o755)
    t0 = time.monotonic()
    d = diagnose([k.pid for k in kids], {}, 0.0, budget_s=1.5, py_spy=str(slow))
    took = time.monotonic() - t0
    assert took < 1.5 + 0.5 and d.took_s <= took
    for pd in d.processes:
        assert pd.python_note.startswith("py-spy timed out after "), pd.python_note
        assert pd.python_note.endswith(" s (killed)")
    assert d.notes == ("budget spent: py-spy killed for pid "
                       + ", ".join(str(k.pid) for k in kids),)
    spies = [int(x) for x in (tmp_path / "spies").read_text().split()]
    assert len(spies) == 3 and not any(os.path.exists(f"/proc/{s}") for s in spies)


DROP_UID = ("os.setgroups([]); os.setresgid(65534, 65534, 65534); "
            "os.setresuid(65534, 65534, 65534)")
# Out of the bounding set, CAP_SYS_PTRACE is missing from what root's programs (py-spy)
# get at exec, as in a container started without it.
DROP_CAP = "import ctypes; assert ctypes.CDLL(None).prctl(24, 19, 0, 0, 0) == 0"  # CAPBSET_DROP


@needs_py_spy
@needs_root
@pytest.mark.parametrize("drop, rule, kernel_note", [
    (DROP_UID, "the target runs as another user, and this process lacks CAP_SYS_PTRACE",
     "needs root"),
    pytest.param(DROP_CAP, "the target holds capabilities this process lacks, and this "
                 "process lacks CAP_SYS_PTRACE", "", marks=pytest.mark.skipif(
                     not HAS_CAP, reason="CAP_SYS_PTRACE is not ours to drop")),
], ids=["other_uid", "no_cap_sys_ptrace"])
def test_ptrace_refused_for_real_names_the_rule(start, drop, rule, kernel_note):
    """A second Python, started as root, drops the uid or the capability after its imports
    and diagnoses a root-owned child of ours."""
    p = sleeper(start)
    code = ("import json, os\nfrom vllm_supervisor.host.diagnose import diagnose\n"
            f"{drop}\n"
            f"print(json.dumps(diagnose([{p.pid}], {{}}, 0.0, 10, {PY_SPY!r}).to_dict()))")
    child = start([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                  env=dict(os.environ, PYTHONPATH=str(REPO)))
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    d = json.loads(out)
    (pd,) = d["processes"]
    assert pd["python_stack"] == [] and pd["python_note"] == f"ptrace not permitted ({rule})"
    assert d["notes"] == [f"no Python stacks: ptrace not permitted ({rule})"]
    assert pd["state"] == "S (sleeping)" and pd["kernel_stack_note"] == kernel_note


@pytest.mark.skipif(PY_SPY is None or not BLOCKED, reason="ptrace is permitted here")
def test_where_ptrace_is_refused_to_us_the_diagnosis_names_the_rule(start):
    p = sleeper(start)
    d = diagnose([p.pid], {}, 0.0, budget_s=10)
    assert d.processes[0].python_note == f"ptrace not permitted ({BLOCKED})"
    assert d.notes == (f"no Python stacks: ptrace not permitted ({BLOCKED})",)
