"""Deployments: the sd_notify protocol against a real AF_UNIX datagram listener, the
generated systemd unit checked by systemd-analyze, and the supervisor as PID 1 in a new
PID namespace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.conftest import REPO, alive, free_port

pytestmark = pytest.mark.timeout(120)


class Listener(threading.Thread):
    """A real notify socket, as systemd would hold it; records every datagram."""

    def __init__(self, address):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []
        self.running = True

    def run(self):
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.got.append((time.monotonic(), data.decode()))

    def fields(self) -> list[str]:
        return [f for _, msg in self.got for f in msg.split("\n")]

    def close(self):
        self.running = False
        self.join(2)
        self.sock.close()


def _first(fields, prefix):
    return next(i for i, f in enumerate(fields) if f.startswith(prefix))


def test_sd_notify_ready_status_watchdog_stopping_extend(supervise, tmp_path):
    path = str(tmp_path / "notify.sock")
    lst = Listener(path)
    lst.start()
    try:
        run = supervise("--health-interval", "0.1",
                        env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        run.wait_ready()
        time.sleep(1.2)
        api = run.tree_pids()["api"]
        with open(f"/proc/{api}/environ", "rb") as f:
            assert b"NOTIFY_SOCKET=" not in f.read(), "vLLM must not talk to systemd"
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
        time.sleep(0.3)
    finally:
        lst.close()
    fields = lst.fields()
    assert fields[0].startswith("STATUS=starting fake/model")
    ready = _first(fields, "READY=1")
    stopping = _first(fields, "STOPPING=1")
    pings = [i for i, f in enumerate(fields) if f == "WATCHDOG=1"]
    assert ready < pings[0] and len(pings) >= 3 and pings[-1] < stopping
    assert any(f.startswith("EXTEND_TIMEOUT_USEC=") for f in fields[stopping:])
    assert any(f.startswith("EXTEND_TIMEOUT_USEC=") for f in fields[:ready])


def test_sd_notify_abstract_namespace_socket(supervise):
    name = f"vllm-supervise-test-{os.getpid()}-{time.monotonic_ns()}"
    lst = Listener(b"\0" + name.encode())
    lst.start()
    try:
        run = supervise(env={"NOTIFY_SOCKET": "@" + name})
        run.wait_ready()
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
        time.sleep(0.3)
    finally:
        lst.close()
    assert "READY=1" in lst.fields() and "STOPPING=1" in lst.fields()


def test_watchdog_pings_stop_once_vllm_is_unhealthy(supervise, tmp_path):
    path = str(tmp_path / "notify.sock")
    lst = Listener(path)
    lst.start()
    try:
        run = supervise("--health-interval", "0.1", "--health-failures", "100", "--grace", "1",
                        env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        run.wait_ready()
        time.sleep(0.6)
        api = run.tree_pids()["api"]
        os.kill(api, signal.SIGSTOP)  # /health stops answering; nothing exits
        t_stop = time.monotonic()
        time.sleep(5)
        os.kill(api, signal.SIGCONT)
        run.signal(signal.SIGTERM)
        run.finish()
    finally:
        lst.close()
    pings = [t for t, msg in lst.got if "WATCHDOG=1" in msg]
    assert [t for t in pings if t < t_stop], "no pings while healthy"
    # a probe in flight may take its 2.1 s timeout to fail; after that, silence
    assert not [t for t in pings if t > t_stop + 2.5], "pinged while /health was failing"


def _print_unit(*args):
    return subprocess.run([sys.executable, "-m", "vllm_supervisor", "print-unit", *args],
                          cwd=REPO, capture_output=True, text=True, check=False)


def test_generated_unit_budgets_agree_with_the_supervisor_options(tmp_path):
    unit = _print_unit("systemd", "--grace", "40", "--kill-wait", "5", "--vram-timeout", "20",
                       "Qwen/Qwen3-0.6B", "--", "--port", "8001").stdout
    assert "TimeoutStopSec=80\n" in unit  # 40 + 5 + 20 + 15
    assert "ExecStart=/usr/local/bin/vllm-supervise serve --grace 40 --kill-wait 5 " \
           "--vram-timeout 20 Qwen/Qwen3-0.6B -- --port 8001" in unit
    assert "Type=notify" in unit and "KillMode=mixed" in unit
    # vLLM's drain is inside the default grace: 60 + 20, + 10 + 30 + 15
    dk = _print_unit("docker", "m", "--", "--shutdown-timeout", "60").stdout
    assert "--stop-timeout=135" in dk
    k8s = _print_unit("kubernetes", "m", "--", "--shutdown-timeout", "60").stdout
    assert "terminationGracePeriodSeconds: 135" in k8s


def test_generated_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    exe = tmp_path / "vllm-supervise"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "vllm-test.service"
    unit.write_text(_print_unit("--exe", str(exe), "systemd", "m", "--", "--port", "8000").stdout)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def _unshare_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root for unshare --pid"
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                         capture_output=True, check=False)
    return None if res.returncode == 0 else f"unshare failed: {res.stderr.decode()[:200]}"


@pytest.mark.parametrize("exit_after", [None, 3])
def test_as_pid_1_in_a_new_pid_namespace(fake_vllm_env, tmp_path, exit_after):
    why = _unshare_available()
    if why:
        pytest.skip(why)
    report = tmp_path / "report.json"
    env = dict(fake_vllm_env, FAKE_VLLM_ORPHANS="20", FAKE_VLLM_ORPHAN_LIFE_S="0.3")
    if exit_after is not None:
        env |= {"FAKE_VLLM_EXIT_AFTER_S": "1.5", "FAKE_VLLM_EXIT_CODE": str(exit_after)}
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
         "vllm_supervisor", "serve", "--gpu-probe", "none", "--grace", "5", "--report-json",
         str(report), "m", "--port", str(free_port())],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    seen: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 30
        pid1 = None
        while time.monotonic() < deadline and pid1 is None:
            kids = psutil.Process(outer.pid).children()
            pid1 = kids[0].pid if kids else None
            time.sleep(0.05)
        assert pid1, "no PID 1 started"
        with open(f"/proc/{pid1}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()
        assert nspid[-1] == "1", nspid  # PID 1 inside its namespace
        while time.monotonic() < deadline:
            for c in psutil.Process(pid1).children(recursive=True):
                seen.setdefault(c.pid, c.create_time())
            if any("VLLM::Worker" in " ".join(psutil.Process(p).cmdline()) for p in seen
                   if psutil.pid_exists(p)):
                break
            time.sleep(0.05)
        time.sleep(2.0)  # ready, the orphans adopted by PID 1 and reaped
        if exit_after is None:
            os.kill(pid1, signal.SIGTERM)  # from outside, as `docker stop` does
        code = outer.wait(60)
        rep = json.loads(report.read_text())
        assert code == (0 if exit_after is None else exit_after), outer.stderr.read()
        assert rep["requested"] == (exit_after is None) and not rep["escalated"]
        unseen = sum(int(n.split()[0]) for n in rep["log_notes"]
                     if "short-lived processes were adopted and reaped" in n)
        seen_orphans = [p for p in rep["processes"] if "Orphan" in p["title"]]
        assert all(p["reaped_by"] == "supervisor" for p in seen_orphans), seen_orphans
        assert unseen + len(seen_orphans) >= 20, (unseen, seen_orphans)  # all reaped by PID 1
    finally:
        if outer.poll() is None:
            os.killpg(outer.pid, signal.SIGKILL)
            outer.wait(10)
    assert not [p for p, c in seen.items() if alive(p, c)]
