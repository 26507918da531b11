"""The simulated vLLM server on its own (no supervisor): real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from vllm_supervisor.simulated import UsageError, parse_args

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Running (a zombie counts as dead: whoever adopted it may reap it late)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def comm(pid: int) -> str:
    """The kernel's 15-character process name (psutil's name() expands it from cmdline)."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def wait_until(pred, timeout: float = 5.0):
    """Poll ``pred`` until truthy or ``timeout``; its last value."""
    deadline = time.monotonic() + timeout
    while not (value := pred()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


class Sim:
    """One launched `python -m vllm_supervisor.simulated serve m ...` in its own session."""

    def __init__(self, tmp_path: Path, idx: int, args, env: dict, tp: int, startup: float):
        self.port = free_port()
        self.pidfile = tmp_path / f"pids{idx}.json"
        self.out_path, self.err_path = tmp_path / f"out{idx}.log", tmp_path / f"err{idx}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_VLLM_")}
        full_env.update(PYTHONPATH=str(REPO), FAKE_VLLM_STARTUP_S=str(startup),
                        FAKE_VLLM_PIDFILE=str(self.pidfile), **env)
        cmd = [sys.executable, "-m", "vllm_supervisor.simulated", "serve", "m",
               "--port", str(self.port), "-tp", str(tp), *args]
        self.started = time.time()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)
        self.pid = self.proc.pid

    def pids(self, key: str = "workers", timeout: float = 5.0) -> dict:
        """The pidfile once it holds ``key``."""
        def read():
            try:
                data = json.loads(self.pidfile.read_text())
            except (OSError, ValueError):
                return None
            return data if key in data else None
        data = wait_until(read, timeout)
        assert data, f"no pidfile with {key!r}; stderr: {self.err()}"
        return data

    def tree(self) -> list[int]:
        """API, tracker, engine and worker pids."""
        p = self.pids()
        return [p["api"], p["tracker"], p["engine"], *p["workers"]]

    def get(self, path: str):
        """(status, body) of GET ``path``; status None when nothing listens."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError):
            return None, b""

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until /health answers 200."""
        assert wait_until(lambda: self.get("/health")[0] == 200, timeout), self.err()

    def out(self) -> str:
        """Everything on stdout so far."""
        return self.out_path.read_text()

    def err(self) -> str:
        """Everything on stderr so far."""
        return self.err_path.read_text()

    def cleanup(self) -> None:
        """SIGKILL the session's group and every pid the pidfile names (if still ours)."""
        pids = {self.pid}
        if self.pidfile.exists():
            for value in json.loads(self.pidfile.read_text()).values():
                pids.update(value if isinstance(value, list) else [value])
        try:  # the API server is unreaped until proc.wait(), so its group id cannot be reused
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                if psutil.Process(pid).create_time() >= self.started - 1:
                    os.kill(pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        self.proc.wait(5)
        assert wait_until(lambda: not any(alive(p) for p in pids)), "leftover processes"


@pytest.fixture
def sim(tmp_path):
    """Factory launching simulated servers; everything they started is killed afterwards."""
    sims: list[Sim] = []

    def start(*args, env=None, tp=1, startup=0.2) -> Sim:
        s = Sim(tmp_path, len(sims), args, env or {}, tp, startup)
        sims.append(s)
        return s

    yield start
    for s in sims:
        s.cleanup()


def test_version():
    out = subprocess.run([sys.executable, "-m", "vllm_supervisor.simulated", "--version"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0.0.0-simulated"


@pytest.mark.parametrize(("argv", "expected"), [
    ("serve m --port 9 -tp 2", ("m", "0.0.0.0", 9, 2, 0.0)),
    ("serve --dtype=auto m --port=9 --tensor-parallel-size=4", ("m", "0.0.0.0", 9, 4, 0.0)),
    ("serve --host 127.0.0.1 --enforce-eager --model x --shutdown-timeout 5",
     ("x", "127.0.0.1", 8000, 1, 5.0)),
])
def test_parse_args(argv, expected):
    cfg = parse_args(argv.split())
    assert (cfg.model, cfg.host, cfg.port, cfg.tp, cfg.shutdown_timeout) == expected


@pytest.mark.parametrize("argv", ["", "run m", "serve", "serve m --port", "serve m -tp zero"])
def test_parse_args_rejects(argv):
    with pytest.raises(UsageError):
        parse_args(argv.split())


def test_unknown_misbehaviour_exits_2(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "engine-ignores-term,no-such-thing"})
    assert s.proc.wait(5) == 2
    assert "no-such-thing" in s.err()


def test_tree_shape_titles_and_groups(sim):
    s = sim("--host", "127.0.0.1", "--dtype=auto", "--gpu-memory-utilization", "0.5",
            "--tensor-parallel-size=2", "--shutdown-timeout=0", "--enforce-eager")
    s.wait_ready()
    pids = s.pids()
    api = psutil.Process(s.pid)
    kids = {p.pid: p for p in api.children()}
    assert set(kids) == {pids["engine"], pids["tracker"]}
    engine = kids[pids["engine"]]
    assert comm(engine.pid) == "VLLM::EngineCor"  # what ps shows
    assert " ".join(engine.cmdline()).strip() == "VLLM::EngineCore"
    assert "multiprocessing.resource_tracker" in " ".join(kids[pids["tracker"]].cmdline())
    workers = sorted(engine.children(), key=lambda p: p.pid)
    assert [p.pid for p in workers] == pids["workers"]
    assert [" ".join(p.cmdline()).strip() for p in workers] == [
        "VLLM::Worker_TP0", "VLLM::Worker_TP1"]
    for pid in s.tree():
        assert os.getpgid(pid) == s.pid and os.getsid(pid) == s.pid
    assert f"Uvicorn running on http://127.0.0.1:{s.port}" in s.out()


def test_port_closed_during_startup_then_serves(sim):
    s = sim(startup=1.0)
    s.pids()  # the tree exists, the model is still "loading"
    assert s.get("/health")[0] is None
    assert "Application startup complete." not in s.out()
    s.wait_ready()
    assert "INFO:     Application startup complete." in s.out()
    status, body = s.get("/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "m"
    req = urllib.request.Request(f"http://127.0.0.1:{s.port}/v1/completions",
                                 data=b'{"prompt": "hi", "max_tokens": 2}', method="POST")
    with urllib.request.urlopen(req, timeout=2) as r:
        completion = json.loads(r.read())
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"]
    assert wait_until(lambda: '"POST /v1/completions HTTP/1.1" 200 OK' in s.out())
    assert 'INFO:     127.0.0.1:' in s.out() and '"GET /health HTTP/1.1" 200 OK' in s.out()


def test_request_delay(sim):
    s = sim(env={"FAKE_VLLM_REQUEST_S": "0.3"})
    s.wait_ready()
    req = urllib.request.Request(f"http://127.0.0.1:{s.port}/v1/completions", data=b"{}")
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=3) as r:
        assert r.status == 200
    assert time.monotonic() - t0 >= 0.3
    assert s.get("/nope")[0] == 404


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_whole_tree_with_exit_0(sim, sig):
    s = sim(tp=2)
    s.wait_ready()
    tree = s.tree()
    os.kill(s.pid, sig)
    assert s.proc.wait(5) == 0
    assert wait_until(lambda: not any(alive(p) for p in tree), 2)
    out = s.out()
    for line in ("INFO:     Shutting down", "INFO:     Application shutdown complete.",
                 f"INFO:     Finished server process [{s.pid}]"):
        assert line in out


def test_sigterm_to_the_whole_group(sim):
    s = sim(tp=2)
    s.wait_ready()
    tree = s.tree()
    os.killpg(s.pid, signal.SIGTERM)  # the tracker ignores it and leaves at EOF instead
    assert s.proc.wait(5) == 0
    assert wait_until(lambda: not any(alive(p) for p in tree), 2)


def test_term_exit_code_override(sim):
    s = sim(env={"FAKE_VLLM_TERM_EXIT_CODE": "3"})
    s.wait_ready()
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 3


def test_sigkill_of_api_leaves_engine_and_workers(sim):
    s = sim(tp=2)
    s.wait_ready()
    p = s.pids()
    os.kill(s.pid, signal.SIGKILL)
    s.proc.wait(5)
    assert wait_until(lambda: not alive(p["tracker"]), 2)  # its pipe reached EOF
    time.sleep(1.0)
    assert alive(p["engine"]) and all(alive(w) for w in p["workers"])  # vllm#55510
    os.kill(p["engine"], signal.SIGKILL)  # now the workers notice through their pipe
    assert wait_until(lambda: not any(alive(w) for w in p["workers"]), 3)
    assert s.out().count("Parent process exited, terminating worker queues") == 2


def test_health_503_after_engine_death(sim):
    s = sim()
    s.wait_ready()
    os.kill(s.pids()["engine"], signal.SIGKILL)
    assert wait_until(lambda: s.get("/health")[0] == 503, 3)
    assert alive(s.pid)


def test_abort_mode_kills_a_stuck_engine_after_2s(sim):
    s = sim()
    s.wait_ready()
    p = s.pids()
    os.kill(p["engine"], signal.SIGSTOP)  # cannot act on SIGTERM
    t0 = time.monotonic()
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(6) == 0
    assert time.monotonic() - t0 >= 1.9
    assert wait_until(lambda: not any(alive(x) for x in s.tree()), 3)


def test_engine_ignores_term(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "engine-ignores-term"})
    s.wait_ready()
    os.kill(s.pid, signal.SIGTERM)
    time.sleep(2.5)  # longer than the 2 s abort grace
    assert all(alive(x) for x in s.tree() if x != s.pids()["tracker"])
    assert "INFO:     Shutting down" in s.out()
    os.kill(s.pids()["engine"], signal.SIGINT)
    time.sleep(0.2)
    assert alive(s.pids()["engine"])


def test_worker_hangs_shutdown_on_term(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "worker-hangs-shutdown"})
    s.wait_ready()
    p = s.pids()
    os.kill(s.pid, signal.SIGTERM)
    time.sleep(2.5)
    assert alive(s.pid) and alive(p["engine"]) and alive(p["workers"][0])
    assert "destroy_process_group() ..." in s.out()
    os.kill(p["workers"][0], signal.SIGTERM)
    time.sleep(0.2)
    assert alive(p["workers"][0])


def test_worker_hangs_shutdown_on_engine_death(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "worker-hangs-shutdown"})
    s.wait_ready()
    p = s.pids()
    os.kill(p["engine"], signal.SIGKILL)
    assert wait_until(lambda: "destroy_process_group() ..." in s.out(), 2)
    assert "Parent process exited, terminating worker queues" in s.out()
    time.sleep(0.3)
    assert alive(p["workers"][0])


def test_api_ignores_term_during_startup(sim):
    s = sim(startup=1.0, env={"FAKE_VLLM_MISBEHAVE": "api-ignores-term-during-startup"})
    s.pids()
    os.kill(s.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert alive(s.pid)
    s.wait_ready()
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0


def test_term_during_startup_stops_tree(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "slow-startup"})
    tree = s.tree()
    time.sleep(0.5)
    assert s.get("/health")[0] is None
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0
    assert wait_until(lambda: not any(alive(x) for x in tree), 2)


def test_worker_setsid(sim):
    s = sim(tp=2, env={"FAKE_VLLM_MISBEHAVE": "worker-setsid"})
    s.wait_ready()
    p = s.pids()
    assert os.getpgid(p["engine"]) == s.pid
    for w in p["workers"]:
        assert os.getsid(w) == w and os.getpgid(w) == w
    os.kill(s.pid, signal.SIGTERM)  # the engine still stops them by pid
    assert s.proc.wait(5) == 0
    assert wait_until(lambda: not any(alive(w) for w in p["workers"]), 2)


def test_grandchild_daemon(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "grandchild-daemon"})
    s.wait_ready()
    p = s.pids()
    daemon = psutil.Process(p["daemon"])
    assert comm(daemon.pid) == "VLLM::Daemon"
    assert os.getsid(daemon.pid) != s.pid and os.getpgid(daemon.pid) != s.pid
    assert daemon.ppid() not in s.tree()
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0
    time.sleep(0.3)
    assert alive(daemon.pid)  # survives the tree and its SIGTERM
    os.kill(daemon.pid, signal.SIGTERM)
    time.sleep(0.2)
    assert alive(daemon.pid)


def test_grandchild_holds_stdout(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "grandchild-holds-stdout"})
    s.wait_ready()
    p = s.pids()
    holder, tp0 = p["holder"], p["workers"][0]
    assert comm(holder) == "VLLM::StdoutHol"
    assert os.readlink(f"/proc/{holder}/fd/1") == os.readlink(f"/proc/{s.pid}/fd/1")
    assert wait_until(lambda: not alive(tp0), 3)  # the worker leaves by itself
    assert alive(holder)
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0
    assert alive(holder)


def test_die_during_startup(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "die-during-startup"})
    p = s.pids()
    assert s.proc.wait(5) == 1
    assert "die-during-startup" in s.err()
    time.sleep(0.3)
    assert alive(p["engine"]) and alive(p["workers"][0])


@pytest.mark.parametrize(("code", "returncode"), [(3, 3), (137, -signal.SIGKILL)])
def test_exit_after(sim, code, returncode):
    s = sim(env={"FAKE_VLLM_EXIT_AFTER_S": "0.3", "FAKE_VLLM_EXIT_CODE": str(code)})
    p = s.pids()
    assert s.proc.wait(5) == returncode
    assert "Application startup complete." in s.out()
    time.sleep(0.3)
    assert alive(p["engine"]) and alive(p["workers"][0])


def test_orphans(sim):
    s = sim(env={"FAKE_VLLM_ORPHANS": "3", "FAKE_VLLM_ORPHAN_LIFE_S": "1.5"})
    orphans = s.pids("orphans")["orphans"]
    assert len(orphans) == 3
    for pid in orphans:
        proc = psutil.Process(pid)
        assert comm(pid) == "VLLM::Orphan" and proc.ppid() != s.pid
        assert os.getpgid(pid) == s.pid
    assert wait_until(lambda: not any(alive(x) for x in orphans), 3)


def test_log_flood(sim):
    s = sim(env={"FAKE_VLLM_LOG_LINES": "20000", "FAKE_VLLM_LAST_LINE": "partial"})
    assert wait_until(lambda: "INFO fake: log flood done" in s.err(), 10)
    out = s.out()
    assert out.count("log line ") == 20000
    assert "\nlog line 1\n" in out and out.endswith("\nlog line 20000\npartial")


def test_simulated_vram_files(sim, tmp_path):
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    s = sim(tp=2, env={"FAKE_VLLM_SIM_GPU_DIR": str(gpu_dir), "FAKE_VLLM_VRAM_MIB": "100",
                       "FAKE_VLLM_NUM_GPUS": "1", "FAKE_VLLM_VRAM_LEAK_MIB": "50",
                       "FAKE_VLLM_VRAM_RELEASE_DELAY_S": "0.5"})
    s.wait_ready()
    for w in s.pids()["workers"]:
        alloc = json.loads((gpu_dir / f"alloc-{w}-0.json").read_text())
        assert alloc == {"pid": w, "create_time": psutil.Process(w).create_time(), "gpu": 0,
                         "mib": 100, "release_delay_s": 0.5}
    leak = json.loads((gpu_dir / "alloc-leak-0.json").read_text())
    assert leak["pid"] is None and leak["mib"] == 50 and leak["gpu"] == 0
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0
    assert len(list(gpu_dir.glob("alloc-*.json"))) == 3  # never deleted by the fake


def test_bind_failure_exits_1_and_stops_engine(sim):
    s = sim()
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", s.port))
        blocker.listen()
        tree = s.tree()
        assert s.proc.wait(5) == 1
    assert "error while attempting to bind" in s.err()
    assert wait_until(lambda: not any(alive(x) for x in tree), 2)
