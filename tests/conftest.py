"""Shared fixtures: a fake `vllm` on PATH, a supervisor run in a real subprocess, and a
leak check that kills (by recorded PID only) and fails on anything a test left alive."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int, create_time: float) -> bool:
    """True when PID is still that very process and not a zombie."""
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class TreeRecorder(threading.Thread):
    """Records every descendant of a PID every 20 ms: the test's own view of the tree."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.seen: dict[int, tuple[float, str]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(0.02)

    def poll(self) -> None:
        try:
            kids = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return
        for k in kids:
            try:
                self.seen.setdefault(k.pid, (k.create_time(), " ".join(k.cmdline())))
            except psutil.Error:
                continue

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


@dataclass
class Run:
    """One supervisor process under test."""

    proc: subprocess.Popen
    tmp: Path
    recorder: TreeRecorder
    report_path: Path
    pidfile: Path
    port: int
    stderr_lines: list[str] = field(default_factory=list)
    stdout_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, text: str, timeout: float = 30) -> None:
        """Wait until the supervisor's stderr shows TEXT."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.stderr_lines):
                return
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not seen; stderr:\n" + "".join(self.stderr_lines[-40:]))

    def wait_ready(self, timeout: float = 30) -> None:
        self.wait_for("ready: ", timeout)

    def tree_pids(self) -> dict:
        """The simulated vLLM's own account of its pids (FAKE_VLLM_PIDFILE)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                return json.loads(self.pidfile.read_text())
            except (OSError, ValueError):
                time.sleep(0.02)
        raise AssertionError("the simulated vLLM wrote no pidfile")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def finish(self, timeout: float = 60) -> int:
        """Wait for the supervisor to exit; return its exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def report(self) -> dict:
        return json.loads(self.report_path.read_text())

    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def start_reader(self) -> None:
        def pump():
            for raw in self.proc.stderr:
                self.stderr_lines.append(raw.decode(errors="replace"))
        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()


def sim_gpu(tmp_path: Path, gpus: int = 1, **knobs) -> tuple[tuple[str, str], dict]:
    """A simulated GPU folder: the supervisor's --gpu-probe option and the simulated vLLM's
    environment (KNOBS: vram_mib=1000 becomes FAKE_VLLM_VRAM_MIB=1000, and so on)."""
    d = tmp_path / "gpus"
    d.mkdir(exist_ok=True)
    env = {"FAKE_VLLM_SIM_GPU_DIR": str(d), "FAKE_VLLM_NUM_GPUS": str(gpus)}
    env |= {f"FAKE_VLLM_{k.upper()}": str(v) for k, v in knobs.items()}
    return ("--gpu-probe", f"sim:{d}:{gpus}"), env


@pytest.fixture
def fake_vllm_env(tmp_path):
    """An environment whose PATH starts with a `vllm` that runs the simulated vLLM."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "vllm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vllm_supervisor.simulated "$@"\n')
    shim.chmod(0o755)
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
    import tempfile

    deadline = time.monotonic() + 5
    while True:
        left = list(Path(tempfile.gettempdir()).glob(f"vllm-supervise-{run.pid}-*"))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for d in left:  # this run's own folder: remove it, and fail the test
        import shutil

        shutil.rmtree(d, ignore_errors=True)
    return [f"folder {d}" for d in left]


def _kill_leftovers(run: Run) -> list[str]:
    """Every process recorded during the run that is still alive: SIGKILL it (by PID,
    identity checked) and name it. Waits briefly first: an orphan may be dying."""
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
    deadline = time.monotonic() + 3
    left = {}
    while time.monotonic() < deadline:
        left = {p: v for p, v in idents.items() if alive(p, v[0])}
        if not left:
            return []
        time.sleep(0.05)
    for pid in left:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    return [f"{pid} {v[1]}" for pid, v in left.items()]
