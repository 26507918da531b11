"""The unit exactly as `print-unit systemd` prints it, run by a real systemd 252 (PID 1 of
a private nspawn machine) with the simulated vLLM. What a test changes is a drop-in, as an
operator would. Every test stops its unit and ends with no process of it left."""

from __future__ import annotations

import re
import time

import pytest

from tests.deploy_real import systems
from tests.helpers import REPO, wait_until

REASON = systems.skip_reason()
pytestmark = [pytest.mark.deploy_real, pytest.mark.timeout(240),
              pytest.mark.skipif(REASON is not None, reason=REASON or "")]
EXE = f"{systems.VENV}/bin/vllm-supervise"
BASE_PROCESSES = {"systemd", "systemd-journal", "dbus-daemon", "systemd-logind"}


class Unit:
    """One service in the machine, made from print-unit's output plus a drop-in."""

    def __init__(self, machine, name: str, port: int, serve_args=(), dropin: str = ""):
        self.m, self.name, self.port = machine, name, port
        args = " ".join(["--vllm-bin", f"{systems.VENV}/bin/vllm", *serve_args])
        self.text = machine.sh(f"vllm-supervise print-unit --exe {EXE} systemd {args} "
                               f"fake/model -- --port {port}").stdout
        path = f"/etc/systemd/system/{name}.service"
        machine.sh(f"cat > {path}", input=self.text)
        gpu = f"/run/vs-gpu-{name}"  # the simulated GPU of this unit (one device)
        machine.sh(f"mkdir -p {path}.d {gpu} && cat > {path}.d/test.conf", input=(
            "[Service]\n"
            f"Environment=VLLM_SUPERVISE_GPU_PROBE=sim:{gpu}:1 FAKE_VLLM_SIM_GPU_DIR={gpu} "
            "FAKE_VLLM_VRAM_MIB=3000 FAKE_VLLM_STARTUP_S=1\n" + dropin))
        machine.sh("systemctl daemon-reload")

    def show(self, *props: str) -> dict[str, str]:
        out = self.m.sh(f"systemctl show {self.name} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def state(self) -> str:
        return self.m.sh(f"systemctl is-active {self.name}", check=False).stdout.strip()

    def health(self) -> int | None:
        out = self.m.sh(
            "python3 -c 'import urllib.request as u, sys\n"
            f"try: print(u.urlopen(\"http://127.0.0.1:{self.port}/health\", timeout=2).status)\n"
            "except Exception: print(0)'", check=False).stdout.strip()
        return int(out) if out.isdigit() and out != "0" else None

    def journal(self) -> str:
        return self.m.sh(f"journalctl -u {self.name} -o cat --no-pager").stdout

    def pids(self) -> list[int]:
        """The PIDs in the unit's cgroup (inside the machine's PID namespace)."""
        cg = self.show("ControlGroup")["ControlGroup"]
        out = self.m.sh(f"cat /sys/fs/cgroup/systemd{cg}/cgroup.procs 2>/dev/null", check=False)
        return [int(p) for p in out.stdout.split()]

    def title(self, pid: int) -> str:
        """PID's command line as the kernel shows it (a VLLM::* process title)."""
        out = self.m.sh(f"tr '\\0' ' ' < /proc/{pid}/cmdline", check=False)
        return out.stdout.strip()

    def engine(self) -> int:
        """The unit's VLLM::EngineCore (a PID inside the machine)."""
        found = [p for p in self.pids() if self.title(p).startswith("VLLM::EngineCore")]
        assert len(found) == 1, found
        return found[0]

    def wait_restarted(self) -> None:
        """Until systemd has restarted the unit once and it is active and healthy again."""
        wait_until(lambda: self.show("NRestarts")["NRestarts"] == "1", 60, "the restart")
        wait_until(lambda: self.state() == "active", 30, "the restarted unit")
        assert self.health() == 200

    def remove(self) -> None:
        self.m.sh(f"systemctl stop {self.name}; systemctl reset-failed {self.name}; "
                  f"rm -rf /etc/systemd/system/{self.name}.service*; systemctl daemon-reload",
                  check=False, timeout=120)


@pytest.fixture
def units(machine):
    made: list[Unit] = []

    def make(*args, **kw) -> Unit:
        made.append(Unit(machine, *args, **kw))
        return made[-1]

    yield make
    for u in made:
        u.remove()
    left = machine.sh("ps -eo comm=").stdout.split()
    assert set(left) - BASE_PROCESSES <= {"ps", "sh"}, f"left in the machine: {left}"


def test_the_unit_verifies_is_active_only_when_serving_and_stops_clean(machine, units):
    u = units("plain", 8001, dropin="Environment=FAKE_VLLM_STARTUP_S=2\n")
    verify = machine.sh(f"systemd-analyze verify /etc/systemd/system/{u.name}.service",
                        check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, ""), verify
    machine.sh(f"systemctl start --no-block {u.name}")
    seen = []  # (unit state, /health status) as the start goes on

    def active():
        state, health = u.state(), u.health()
        seen.append((state, health))
        return state == "active"

    wait_until(active, 30, lambda: f"the unit to become active: {seen[-5:]}")
    assert ("activating", None) in seen, seen  # systemd waited for READY=1
    assert all(h == 200 for s, h in seen if s == "active"), seen
    assert u.health() == 200
    props = u.show("StatusText", "MainPID")
    assert props["StatusText"] == f"serving fake/model at http://127.0.0.1:{u.port}", props
    assert 'Status: "serving fake/model' in machine.sh(
        f"systemctl status --no-pager {u.name}", check=False).stdout
    tree = u.pids()
    assert len(tree) >= 5, tree  # supervisor, guard, API server, engine, worker
    t0 = time.monotonic()
    machine.sh(f"systemctl stop {u.name}")
    stop_s = time.monotonic() - t0
    after = u.show("Result", "ExecMainStatus", "ActiveState")
    assert after == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}
    assert u.pids() == []
    alive = machine.sh(" ".join(f"test -e /proc/{p} && echo {p};" for p in tree) + " true")
    assert alive.stdout.split() == [], alive.stdout
    log = u.journal()
    assert "SIGTERM from pid 1 (/usr/lib/systemd/systemd): stopping vLLM" in log
    assert "every process of the tree is gone and reaped" in log
    assert re.search(r"VRAM +released", log), log[-2000:]
    assert "exit code   0: requested stop" in log
    # journald gets plain lines: no colour, no cursor movement, no carriage returns.
    assert "\x1b" not in log and "\r" not in log
    print(f"systemctl stop took {stop_s:.2f} s")


def test_the_docs_name_our_exit_codes_with_systemds_own_words(machine):
    table = re.findall(r"^\| `status=(\d)/([A-Z]+)` \|", (REPO / "docs/systemd.md").read_text(),
                       re.MULTILINE)
    assert len(table) == 7, table
    out = machine.sh("systemd-analyze exit-status " + " ".join(c for c, _ in table)).stdout
    words = dict(re.findall(r"^([A-Z]+)\s+(\d)\s", out, re.MULTILINE))
    assert {c: w for w, c in words.items()} == dict(table), out


def test_extend_timeout_carries_a_start_and_a_stop_longer_than_the_unit_allows(machine,
                                                                             units):
    # Start: 6 s against TimeoutStartSec=3. Stop: a tree that ignores SIGTERM, grace 4 s,
    # against TimeoutStopSec=2. Our EXTEND_TIMEOUT_USEC messages carry both; we end the
    # tree, not systemd. WatchdogSec=2 does not fire either: systemd arms the watchdog at
    # READY=1 and disarms it when the stop begins.
    u = units("slow", 8002, serve_args=("--grace", "4"), dropin=(
        "Environment=FAKE_VLLM_STARTUP_S=6 "
        "FAKE_VLLM_MISBEHAVE=engine-ignores-term,worker-hangs-shutdown\n"
        "TimeoutStartSec=3\nTimeoutStopSec=2\nWatchdogSec=2\n"))
    t0 = time.monotonic()
    machine.sh(f"systemctl start {u.name}", timeout=60)
    start_s = time.monotonic() - t0
    assert u.state() == "active" and u.health() == 200
    assert start_s > 3, start_s
    t0 = time.monotonic()
    machine.sh(f"systemctl stop {u.name}", timeout=60)
    stop_s = time.monotonic() - t0
    log = u.journal()
    assert "grace of 4 s is over: SIGKILL" in log, log[-3000:]
    assert "exit code   4: requested stop; SIGKILL was needed" in log
    assert "timed out" not in log and "with signal SIGKILL" not in log, log[-3000:]
    assert "Watchdog timeout" not in log
    # SuccessExitStatus=4: a stop that needed SIGKILL but completed is a stop.
    assert u.show("Result", "ActiveState") == {"Result": "success",
                                                "ActiveState": "inactive"}, log[-1500:]
    assert 4 <= stop_s < 4 + 10, stop_s
    print(f"start {start_s:.2f} s (TimeoutStartSec=3), stop {stop_s:.2f} s (TimeoutStopSec=2)")


def test_without_success_exit_status_a_forced_stop_leaves_the_unit_failed(machine, units):
    # The negative control for SuccessExitStatus=4, and systemd's words for our codes.
    u = units("forced", 8003, serve_args=("--grace", "1"), dropin=(
        "Environment=FAKE_VLLM_MISBEHAVE=engine-ignores-term,worker-hangs-shutdown\n"
        "SuccessExitStatus=\n"))
    machine.sh(f"systemctl start {u.name}")
    machine.sh(f"systemctl stop {u.name}", timeout=60)
    assert u.show("Result", "ActiveState") == {"Result": "exit-code", "ActiveState": "failed"}
    assert "status=4/NOPERMISSION" in u.journal()


def test_the_watchdog_restarts_a_frozen_supervisor_and_exec_stop_post_finishes_its_stop(
        machine, units):
    u = units("frozen", 8004, dropin="WatchdogSec=2\nRestartSec=1\n")
    machine.sh(f"systemctl start {u.name}")
    first = u.show("MainPID")["MainPID"]
    old_tree = u.pids()
    machine.sh(f"kill -STOP {first}")
    u.wait_restarted()
    assert u.show("MainPID")["MainPID"] != first
    log = u.journal()
    assert "Watchdog timeout (limit 2s)!" in log and "Failed with result 'watchdog'" in log
    assert f"Killing process {first} (vllm-supervise) with signal SIGABRT" in log
    # ExecStopPost= ran `vllm-supervise stop` on the dead supervisor's record before the
    # restart: whatever the parent-death SIGTERM and the death guard had not ended yet, it
    # stopped; then it checked the GPU memory.
    post = [line for line in log.splitlines() if line.startswith('{"name": "model-8004"')]
    assert post, log[-3000:]
    assert '"complete": true' in post[0] and '"vram": "released' in post[0], post
    print("ExecStopPost:", post[0])
    gone = machine.sh(" ".join(f"test -e /proc/{p} && echo {p};" for p in old_tree) + " true")
    assert gone.stdout.split() == [] or set(map(int, gone.stdout.split())) <= set(u.pids())


def test_engine_death_exits_7_and_restart_on_failure_serves_again(machine, units):
    u = units("enginedeath", 8005, dropin="RestartSec=1\n")
    machine.sh(f"systemctl start {u.name}")
    machine.sh(f"kill -9 {u.engine()}")
    u.wait_restarted()
    log = u.journal()
    assert "status=7/NOTRUNNING" in log, log[-3000:]
    assert "exit code   7: the engine died" in log


def test_a_hung_engine_is_ours_to_end_not_the_watchdogs(machine, units):
    # SIGSTOP of VLLM::EngineCore: /health stays 200, so WATCHDOG=1 goes on; the progress
    # probe finds the hang, the diagnosis runs with the watchdog fed, the stop disarms it:
    # exit 7 and Restart=on-failure, never systemd's SIGABRT, even under WatchdogSec=4.
    u = units("hung", 8006, serve_args=("--grace", "3", "--probe-interval", "1",
                                        "--probe-timeout", "2", "--probe-failures", "2"),
              dropin="WatchdogSec=4\nRestartSec=1\n")
    machine.sh(f"systemctl start {u.name}")
    machine.sh(f"kill -STOP {u.engine()}")
    u.wait_restarted()
    log = u.journal()
    assert "engine died while serving: hung: 2 canary requests" in log, log[-3000:]
    assert "is stopped (T)" in log and "status=7/NOTRUNNING" in log
    assert "Watchdog timeout" not in log and "SIGABRT" not in log
