"""The hang diagnosis's pure parts: its text and JSON shapes, the CPU arithmetic, the ptrace
rule, reading py-spy's output (its real messages, as py-spy 0.4 prints them); and a look
at this very process (the real children: tests/integration/test_diagnose.py)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from vllm_supervisor.host import diagnose as diagnose_module
from vllm_supervisor.host.diagnose import (
    EXTRA_HINT,
    SHOW_PY_LINES,
    Diagnosis,
    ProcessDiagnosis,
    cpu_seconds,
    diagnose,
    ptrace_rule,
    read_dump,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
DUMP = """Process 41: /venv/bin/python -c
import time
Python v3.11.7 (/usr/bin/python3.11)

Thread 41 (idle): "MainThread"
    sleeping_in_named_function (<string>:4)
    <module> (<string>:5)

Thread 42 (idle): "Thread-1"
    wait (threading.py:327)
"""
NOT_PYTHON = "Error: Failed to find python version from target process\n"
OTHER_UID = ("Permission Denied: Try running again with elevated permissions by going "
             "'sudo env \"PATH=$PATH\" !!'\n")
NO_CAP = """Error: Failed to get process executable name. Check that the process is running.

Caused by:
    0: Permission denied (os error 13)
    1: Permission denied (os error 13)
"""
GONE = NO_CAP.replace("Permission denied (os error 13)", "No such file or directory (os error 2)")


def proc(pid=7, **kw) -> ProcessDiagnosis:
    base = {"pid": pid, "title": "VLLM::EngineCore", "state": "S (sleeping)",
            "wchan": "futex_wait", "kernel_stack_note": "", "cpu_s": 0.0, "python_stack": (),
            "python_note": "",
            "kernel_stack": ("futex_wait_queue+0x5d/0xa0", "__futex_wait+0x8e/0x100",
                             "futex_wait+0x6b/0x110", "do_futex+0xc5/0x190",
                             "__x64_sys_futex+0x68/0x1c0")}
    return ProcessDiagnosis(**(base | kw))


def test_lines_give_one_line_per_process_then_a_bounded_python_stack():
    stack = tuple(f"    frame_{i} (engine.py:{i})" for i in range(40))
    d = Diagnosis((proc(7, python_stack=("Thread 7 (idle)", *stack), cpu_s=0.004,
                        last_log="(EngineCore_DP0 pid=7) INFO waiting"),
                   proc(8, title="VLLM::Worker_TP0\nx", state="T (stopped)",
                        wchan="do_signal_stop", cpu_s=None, python_note="exited",
                        kernel_stack=(), kernel_stack_note="needs root")),
                  ("no Python stacks: ptrace not permitted (...)",), window_s=5.0, took_s=0.42)
    lines = d.lines()
    assert lines[:2] == ["diagnosis of 2 processes (CPU over 5.0 s, took 0.4 s)",
                         "note: no Python stacks: ptrace not permitted (...)"]
    assert lines[2] == "pid 7 VLLM::EngineCore: S (sleeping), wchan futex_wait, cpu 0.00 s"
    assert lines[3] == "  last log: (EngineCore_DP0 pid=7) INFO waiting"
    assert lines[4] == "  Thread 7 (idle)"
    shown = lines[4:4 + SHOW_PY_LINES]
    assert lines[4 + SHOW_PY_LINES] == f"  ... {41 - SHOW_PY_LINES} more lines"
    assert shown[-1] == f"      frame_{SHOW_PY_LINES - 2} (engine.py:{SHOW_PY_LINES - 2})"
    assert lines[5 + SHOW_PY_LINES] == ("  kernel: futex_wait_queue < __futex_wait < futex_wait"
                                        " < do_futex < ...")
    assert lines[6 + SHOW_PY_LINES:] == [
        "pid 8 VLLM::Worker_TP0 x: T (stopped), wchan do_signal_stop, cpu ?",
        "  python: exited", "  kernel: needs root"]


def test_to_dict_is_json_ready_with_every_field():
    d = Diagnosis((proc(python_stack=("Thread 7 (idle)",)),), ("n",), 5.0, 1.23456)
    back = json.loads(json.dumps(d.to_dict()))
    assert back["window_s"] == 5.0 and back["took_s"] == 1.235 and back["notes"] == ["n"]
    (p,) = back["processes"]
    assert set(p) == {"pid", "title", "state", "wchan", "kernel_stack", "kernel_stack_note",
                      "cpu_s", "python_stack", "python_note", "last_log"}
    assert p["python_stack"] == ["Thread 7 (idle)"] and p["kernel_stack"][0].startswith("futex")


def test_cpu_seconds_are_ticks_over_clk_tck_and_unknown_when_unsure():
    assert cpu_seconds(100, 100 + 3 * CLK_TCK) == pytest.approx(3.0)
    assert cpu_seconds(5, 5) == 0.0
    assert cpu_seconds(None, 10) is None  # not in cpu_before
    assert cpu_seconds(10, None) is None  # gone now
    assert cpu_seconds(500, 20) is None  # fewer ticks than before: a reused pid


NEEDS = "CAP_SYS_PTRACE"


@pytest.mark.parametrize("scope, cap, same, desc, superset, expect", [
    (None, False, True, False, True, ""),  # no Yama, same user: allowed
    (0, False, True, False, True, ""),
    (0, False, False, False, True, "the target runs as another user, and this process lacks"),
    (0, True, False, False, True, ""),  # the capability overrides the uid rule
    (0, False, True, False, False, "the target holds capabilities this process lacks"),
    (1, False, True, True, True, ""),  # a descendant
    (1, False, True, False, True, "Yama ptrace_scope=1 lets a tracer read only its own"),
    (1, True, True, False, True, ""),
    (2, False, True, True, True, "Yama ptrace_scope=2 needs CAP_SYS_PTRACE, which this"),
    (2, True, False, False, False, ""),
    (3, True, True, True, True, "Yama ptrace_scope=3 forbids it to every process"),
])
def test_ptrace_rule_names_the_rule_that_blocks(scope, cap, same, desc, superset, expect):
    rule = ptrace_rule(scope, cap, same, desc, superset)
    assert rule.startswith(expect) if expect else rule == ""
    assert not expect or NEEDS in rule


def test_read_dump_keeps_the_threads_and_drops_the_header():
    stack, note = read_dump(DUMP, "", "", gone=False)
    assert note == ""
    assert stack == ('Thread 41 (idle): "MainThread"', "    sleeping_in_named_function (<string>:4)",
                     "    <module> (<string>:5)", 'Thread 42 (idle): "Thread-1"',
                     "    wait (threading.py:327)")


@pytest.mark.parametrize("err, rule, gone, note", [
    (NOT_PYTHON, "", False,
     "not a Python process (py-spy: Failed to find python version from target process)"),
    (OTHER_UID, "the target runs as another user, and this process lacks CAP_SYS_PTRACE",
     False, ("ptrace not permitted (the target runs as another user, and this process lacks "
             "CAP_SYS_PTRACE)")),
    (NO_CAP, "", False, ("ptrace not permitted (py-spy: Failed to get process executable name."
                         " Check that the process is running.; Permission denied (os error 13);"
                         " no uid, capability or Yama rule explains it: seccomp, an LSM or a "
                         "non-dumpable target?)")),
    (GONE, "", True, "exited"),
    ("", "", False, "py-spy failed: no output"),
])
def test_read_dump_says_why_there_is_no_stack(err, rule, gone, note):
    assert read_dump("", err, rule, gone) == ((), note)


def test_without_py_spy_the_note_names_the_extra():
    me = os.getpid()
    d = diagnose([me], {}, 0.0, budget_s=5, py_spy=None,
                 log_lines=[f"(APIServer pid={me}) INFO up", "plain line"])
    (p,) = d.processes
    assert d.notes == (f"no Python stacks: py-spy is not installed ({EXTRA_HINT})",)
    assert p.python_note == "py-spy is not installed" and p.python_stack == ()
    assert p.state.startswith(("R", "S")) and "python" in p.title.lower()
    assert p.cpu_s is None  # not in cpu_before
    assert p.last_log == f"(APIServer pid={me}) INFO up"
    assert EXTRA_HINT in "\n".join(d.lines())


def test_a_proc_read_that_blocks_costs_its_fact_not_the_deadline(monkeypatch):
    """/proc/PID/stack (say) never answers: the call still returns at the budget, with the
    facts read before it and the reason for the rest."""
    release = threading.Event()
    monkeypatch.setattr(diagnose_module, "_kernel_stack", lambda pid: release.wait(30))
    me = os.getpid()
    try:
        t0 = time.monotonic()
        d = diagnose([me], {}, 0.0, budget_s=0.3, py_spy=None)
        assert time.monotonic() - t0 < 0.3 + 0.2
    finally:
        release.set()
    (p,) = d.processes
    late = f"unknown (reading /proc/{me}/stack did not finish in time)"
    assert p.kernel_stack == () and p.kernel_stack_note == late
    assert p.state.startswith(("R", "S")) and p.wchan != late
    with open(f"/proc/{me}/comm") as f:
        assert p.title == f.read().strip()  # the name from status: cmdline comes after stack
