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

from tests.helpers import REPO, cli, free_port, http_get, survivors, wait_until

pytestmark = pytest.mark.timeout(120)


class Listener(threading.Thread):
    """A real notify socket, as systemd would hold it; records every datagram in order."""

    def __init__(self, address):
        super().__init__(daemon=True)
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.got: list[str] = []

    def run(self):
        while data := self.sock.recv(4096):  # b"" once close() shut the socket
            self.got.append(data.decode())

    def mark(self, text: str) -> None:
        """Put TEXT into the stream: what arrives later was sent later."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(text.encode(), self.address)

    def fields(self) -> list[str]:
        return [f for msg in self.got for f in msg.split("\n")]

    def close(self):
        """Stop, after taking every datagram still queued (a sender that exited has sent
        everything it will)."""
        self.sock.shutdown(socket.SHUT_RD)
        self.join(5)
        self.sock.close()


def _first(fields, prefix):
    return next(i for i, f in enumerate(fields) if f.startswith(prefix))


def _pings(msgs: list[str]) -> int:
    return sum("WATCHDOG=1" in m.split("\n") for m in msgs)


def test_sd_notify_ready_status_watchdog_stopping_extend(supervise, tmp_path):
    path = str(tmp_path / "notify.sock")
    lst = Listener(path)
    lst.start()
    try:
        run = supervise("--health-interval", "0.1",
                        env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        run.wait_ready()
        wait_until(lambda: _pings(lst.got) >= 3, 30, "three watchdog pings")
        api = run.tree_pids()["api"]
        with open(f"/proc/{api}/environ", "rb") as f:
            assert b"NOTIFY_SOCKET=" not in f.read(), "vLLM must not talk to systemd"
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
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
    finally:
        lst.close()
    assert "READY=1" in lst.fields() and "STOPPING=1" in lst.fields()


def _accept_queue(port: int) -> int:
    """Connections waiting to be accepted on the TCP port PORT listens on (/proc/net/tcp*:
    a listening socket's rx_queue is its accept queue)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    n += int(cols[4].split(":")[1], 16)
    return n


def test_watchdog_pings_stop_once_vllm_is_unhealthy(supervise, tmp_path):
    path = str(tmp_path / "notify.sock")
    lst = Listener(path)
    lst.start()
    try:
        run = supervise("--health-interval", "0.1", "--health-failures", "100", "--grace", "1",
                        env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        run.wait_ready()
        wait_until(lambda: _pings(lst.got), 30, "a watchdog ping while healthy")
        lst.mark("STOPPED")
        api = run.tree_pids()["api"]
        os.kill(api, signal.SIGSTOP)  # /health stops answering; nothing exits
        try:
            # The probes of the stopped server wait in its accept queue, one after the
            # other: a second one there means the first has failed. From then on, silence.
            wait_until(lambda: _accept_queue(run.port) >= 2, 30, "a failed /health probe")
            lst.mark("FAILED")
            wait_until(lambda: _accept_queue(run.port) >= 3, 30, "one more failed probe")
            lst.mark("FAILED AGAIN")
        finally:
            os.kill(api, signal.SIGCONT)
        run.signal(signal.SIGTERM)
        run.finish()
    finally:
        lst.close()
    got = lst.got
    assert _pings(got[:got.index("STOPPED")]), "no pings while healthy"
    assert not _pings(got[got.index("FAILED"):got.index("FAILED AGAIN")]), \
        "pinged while /health was failing"


def _print_unit(*args):
    return cli("print-unit", *args)


def test_generated_unit_budgets_agree_with_the_supervisor_options(tmp_path):
    unit = _print_unit("systemd", "--grace", "40", "--kill-wait", "5", "--vram-timeout", "20",
                       "Qwen/Qwen3-0.6B", "--", "--port", "8001").stdout
    assert "TimeoutStopSec=80\n" in unit  # 40 + 5 + 20 + 15
    assert "ExecStart=/usr/local/bin/vllm-supervise serve --grace 40 --kill-wait 5 " \
           "--vram-timeout 20 --name Qwen3-0.6B-8001 Qwen/Qwen3-0.6B -- --port 8001" in unit
    assert "ExecStopPost=/usr/local/bin/vllm-supervise stop --missing-ok -- Qwen3-0.6B-8001" \
        in unit and "SuccessExitStatus=4\n" in unit
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


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


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
         str(report), "m", "--port", str(free_port())],  # the port last: read back below
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    seen: dict[int, float] = {}
    port = int(outer.args[-1])

    def tree_with_workers():
        for c in psutil.Process(pid1).children(recursive=True):
            try:
                seen.setdefault(c.pid, c.create_time())
                if c.name().startswith("VLLM::Worker"):
                    return True
            except psutil.Error:
                continue
        return False

    def orphans_left():
        return [c.pid for c in psutil.Process(pid1).children(recursive=True)
                if _name(c) == "VLLM::Orphan"]  # a zombie keeps its name until reaped

    try:
        kids = wait_until(lambda: psutil.Process(outer.pid).children(), 30, "PID 1 to start")
        pid1 = kids[0].pid
        with open(f"/proc/{pid1}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()
        assert nspid[-1] == "1", nspid  # PID 1 inside its namespace
        wait_until(tree_with_workers, 30, "the tree's workers")
        if exit_after is None:
            # vLLM made its orphans before it answers /health; PID 1 adopts and reaps them.
            wait_until(lambda: http_get(port)[0] == 200, 30, "/health to answer")
            wait_until(lambda: not orphans_left(), 30, "PID 1 to reap the orphans")
            os.kill(pid1, signal.SIGTERM)  # from outside, as `docker stop` does
        code = outer.wait(60)
        rep = json.loads(report.read_text())
        assert code == (0 if exit_after is None else exit_after), outer.stderr.read()
        assert rep["requested"] == (exit_after is None) and not rep["escalated"]
        if exit_after is None:  # the sender is in the parent namespace: si_pid 0, SI_USER
            assert "outside this PID namespace" in rep["reason"], rep["reason"]
        unseen = sum(int(n.split()[0]) for n in rep["log_notes"]
                     if "short-lived processes were adopted and reaped" in n)
        seen_orphans = [p for p in rep["processes"] if "Orphan" in p["title"]]
        assert all(p["reaped_by"] == "supervisor" for p in seen_orphans), seen_orphans
        assert unseen + len(seen_orphans) >= 20, (unseen, seen_orphans)  # all reaped by PID 1
    finally:
        if outer.poll() is None:
            os.killpg(outer.pid, signal.SIGKILL)
            outer.wait(10)
    assert not survivors(seen)
