"""Shared fixtures: a fake `vllm` on PATH, a supervisor run in a real subprocess, and a
leak check that kills (by recorded PID only) and fails on anything a test left alive.
The helpers they use are in tests/helpers.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.helpers import (
    REPO,
    Run,
    TreeRecorder,
    free_port,
    kill_all,
    poll,
    still_alive,
    write_vllm_script,
)


@pytest.fixture(autouse=True)
def private_reservations(tmp_path, monkeypatch):
    """Every test gets its own GPU reservation table (the simulated GPUs of all tests share
    their UUIDs): nothing is written to the host's shared /run/vllm-supervise-gpu."""
    d = tmp_path / "reservations"
    monkeypatch.setenv("VLLM_SUPERVISE_RESERVATIONS_DIR", str(d))
    return d


@pytest.fixture
def fake_vllm_env(tmp_path):
    """An environment whose PATH starts with a `vllm` that runs the simulated vLLM."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    write_vllm_script(bindir / "vllm")
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["FAKE_VLLM_STARTUP_S"] = "0.3"
    env["VLLM_SUPERVISE_STATE_DIR"] = str(tmp_path / "state")
    env.pop("VLLM_SUPERVISE_VLLM_BIN", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


@pytest.fixture
def supervise(tmp_path, fake_vllm_env):
    """Start `vllm-supervise serve` in a real subprocess; reap everything at the end."""
    runs: list[Run] = []

    def start(*sup_args: str, vllm_args=(), env=None, stdout=None, model="fake/model") -> Run:
        port = free_port()
        report = tmp_path / f"report-{len(runs)}.json"
        pidfile = tmp_path / f"pids-{len(runs)}.json"
        e = dict(fake_vllm_env, FAKE_VLLM_PIDFILE=str(pidfile), **(env or {}))
        argv = [sys.executable, "-m", "vllm_supervisor", "serve", "--report-json", str(report),
                "--gpu-probe", "none", *sup_args, model, "--port", str(port), *vllm_args]
        proc = subprocess.Popen(argv, env=e, stdin=subprocess.DEVNULL,
                                stdout=stdout if stdout is not None else subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        rec = TreeRecorder(proc.pid)
        rec.start()
        run = Run(proc, tmp_path, rec, report, pidfile, port)
        run.start_reader()
        runs.append(run)
        return run

    yield start
    leaks = []
    for run in runs:
        if run.proc.poll() is None:
            os.kill(run.proc.pid, signal.SIGKILL)
            run.proc.wait(10)
        run.recorder.stop()
        leaks += _kill_leftovers(run)
        leaks += _leftover_tmpdirs(run)
    assert not leaks, f"processes or folders left by the test: {leaks}"


def _leftover_tmpdirs(run: Run) -> list[str]:
    """The run's private TMPDIR must be gone (the guard may take a moment to remove it)."""
    def left():
        return list(Path(tempfile.gettempdir()).glob(f"vllm-supervise-{run.pid}-*"))
    poll(lambda: not left(), 5)  # no event marks the guard's removal: look until it is done
    folders = left()
    for d in folders:  # this run's own folder: remove it, and fail the test
        shutil.rmtree(d, ignore_errors=True)
    return [f"folder {d}" for d in folders]


def _kill_leftovers(run: Run) -> list[str]:
    """Every process recorded during the run that is still alive: SIGKILL it (by PID,
    identity checked) and name it. Waits up to 3 s first: an orphan may be dying."""
    idents = dict(run.recorder.seen)
    try:
        for name, pid in json.loads(run.pidfile.read_text()).items():
            for p in pid if isinstance(pid, list) else [pid]:
                if p and p not in idents:
                    try:
                        idents[p] = (psutil.Process(p).create_time(), name)
                    except psutil.Error:
                        pass
    except (OSError, ValueError):
        pass
    left = still_alive(idents, timeout=3)
    kill_all({p: idents[p][0] for p in left})
    return [f"{pid} {idents[pid][1]}" for pid in left]
