"""The simulated vLLM server on its own (no supervisor): real processes, real signals.
The `sim` fixture is in tests/sim/conftest.py; its command line alone: tests/unit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from tests.helpers import REPO, alive, comm, signal_ignored, survivors, wait_until
from vllm_supervisor.host.proctree import read_proc
from vllm_supervisor.sim.gpu import SimulatedGpuProbe


def test_version():
    out = subprocess.run([sys.executable, "-m", "vllm_supervisor.sim", "--version"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0.0.0-simulated"


def test_unknown_misbehaviour_exits_2(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "engine-ignores-term,no-such-thing"})
    assert s.proc.wait(5) == 2
    assert "no-such-thing" in s.err()


def test_negative_stop_s_exits_2(sim):
    s = sim(env={"FAKE_VLLM_STOP_S": "-1"})
    assert s.proc.wait(5) == 2
    assert "FAKE_VLLM_STOP_S must be >= 0" in s.err()


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
    wait_until(lambda: '"POST /v1/completions HTTP/1.1" 200 OK' in s.out(), 5, "the access log")
    assert 'INFO:     127.0.0.1:' in s.out() and '"GET /health HTTP/1.1" 200 OK' in s.out()


def test_request_delay(sim):
    s = sim(env={"FAKE_VLLM_REQUEST_S": "0.3"})
    s.wait_ready()
    req = urllib.request.Request(f"http://127.0.0.1:{s.port}/v1/completions",
                                 data=b'{"prompt": "hi", "max_tokens": 1}')
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=3) as r:
        assert r.status == 200
    assert time.monotonic() - t0 >= 0.3  # the knob's delay: behaviour, not speed
    assert s.get("/nope")[0] == 404


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_whole_tree_with_exit_0(sim, sig):
    s = sim(tp=2)
    s.wait_ready()
    tree = s.tree()
    os.kill(s.pid, sig)
    assert s.proc.wait(5) == 0
    assert not survivors(tree, 2)
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
    assert not survivors(tree, 2)


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
    assert not survivors([p["tracker"]], 2)  # its pipe reached EOF
    # The scenario is that nothing happens (vllm#55510): the engine watches nothing that the
    # API server's death changes, so no event marks "it would have died by now".
    time.sleep(1.0)
    assert alive(p["engine"]) and all(alive(w) for w in p["workers"])
    os.kill(p["engine"], signal.SIGKILL)  # now the workers notice through their pipe
    assert not survivors(p["workers"], 3)
    assert s.out().count("Parent process exited, terminating worker queues") == 2


def test_health_503_after_engine_death(sim):
    s = sim()
    s.wait_ready()
    os.kill(s.pids()["engine"], signal.SIGKILL)
    wait_until(lambda: s.get("/health")[0] == 503, 3, "/health to answer 503")
    assert alive(s.pid)


def test_abort_mode_kills_a_stuck_engine_after_2s(sim):
    s = sim()
    s.wait_ready()
    p = s.pids()
    os.kill(p["engine"], signal.SIGSTOP)  # cannot act on SIGTERM
    t0 = time.monotonic()
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(6) == 0
    assert time.monotonic() - t0 >= 1.9  # not before its 2 s abort grace: behaviour
    assert not survivors(s.tree(), 3)


def test_engine_ignores_term(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "engine-ignores-term"})
    s.wait_ready()
    engine = s.pids()["engine"]
    os.kill(s.pid, signal.SIGTERM)
    wait_until(lambda: "[shutdown] API server: stopping engine client" in s.out(), 5,
               "the API server's shutdown")
    # The scenario: its 2 s abort grace passes and nothing is killed (a hung engine is waited
    # for forever, as in vLLM). No event marks an abort that does not happen.
    time.sleep(2.5)
    assert all(alive(x) for x in s.tree() if x != s.pids()["tracker"])
    assert signal_ignored(engine, signal.SIGTERM) and signal_ignored(engine, signal.SIGINT)
    os.kill(engine, signal.SIGINT)  # an ignored signal is discarded as it is sent
    assert alive(engine)


def test_worker_hangs_shutdown_on_term(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "worker-hangs-shutdown"})
    s.wait_ready()
    p = s.pids()
    worker = p["workers"][0]
    os.kill(s.pid, signal.SIGTERM)
    wait_until(lambda: "destroy_process_group() ..." in s.out(), 5, "the worker's hang")
    # The scenario: the API server's 2 s abort grace passes and nothing is killed (as above).
    time.sleep(2.5)
    assert alive(s.pid) and alive(p["engine"]) and alive(worker)
    wait_until(lambda: signal_ignored(worker, signal.SIGTERM), 5, "the worker to go deaf")
    os.kill(worker, signal.SIGTERM)  # discarded as it is sent
    assert alive(worker)


def test_worker_hangs_shutdown_on_engine_death(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "worker-hangs-shutdown"})
    s.wait_ready()
    p = s.pids()
    os.kill(p["engine"], signal.SIGKILL)
    wait_until(lambda: "destroy_process_group() ..." in s.out(), 5, "the worker's hang")
    assert "Parent process exited, terminating worker queues" in s.out()
    # It hangs deaf to SIGTERM (instead of exiting), from where only SIGKILL gets it out.
    wait_until(lambda: signal_ignored(p["workers"][0], signal.SIGTERM), 5, "the worker's hang")
    assert alive(p["workers"][0])


def test_api_ignores_term_during_startup(sim):
    s = sim(startup=1.0, env={"FAKE_VLLM_MISBEHAVE": "api-ignores-term-during-startup"})
    s.pids()
    assert signal_ignored(s.pid, signal.SIGTERM)  # from its start until it serves
    os.kill(s.pid, signal.SIGTERM)  # discarded as it is sent
    assert alive(s.pid)
    s.wait_ready()
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0


def test_term_during_startup_stops_tree(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "slow-startup"})
    tree = s.tree()
    assert s.get("/health")[0] is None  # still starting (slow-startup: for an hour)
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0
    assert not survivors(tree, 2)


def test_worker_setsid(sim):
    s = sim(tp=2, env={"FAKE_VLLM_MISBEHAVE": "worker-setsid"})
    s.wait_ready()
    p = s.pids()
    assert os.getpgid(p["engine"]) == s.pid
    for w in p["workers"]:
        assert os.getsid(w) == w and os.getpgid(w) == w
    os.kill(s.pid, signal.SIGTERM)  # the engine still stops them by pid
    assert s.proc.wait(5) == 0
    assert not survivors(p["workers"], 2)


def test_grandchild_daemon(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "grandchild-daemon"})
    s.wait_ready()
    p = s.pids()
    daemon = psutil.Process(p["daemon"])
    assert comm(daemon.pid) == "VLLM::Daemon"
    assert os.getsid(daemon.pid) != s.pid and os.getpgid(daemon.pid) != s.pid
    assert daemon.ppid() not in s.tree()
    tree = s.tree()
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0
    assert not survivors(tree, 5)
    assert alive(daemon.pid)  # survives the tree and its SIGTERM
    assert signal_ignored(daemon.pid, signal.SIGTERM)
    os.kill(daemon.pid, signal.SIGTERM)  # discarded as it is sent
    assert alive(daemon.pid)


def test_grandchild_holds_stdout(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "grandchild-holds-stdout"})
    s.wait_ready()
    p = s.pids()
    holder, tp0 = p["holder"], p["workers"][0]
    assert comm(holder) == "VLLM::StdoutHol"
    assert os.readlink(f"/proc/{holder}/fd/1") == os.readlink(f"/proc/{s.pid}/fd/1")
    assert not survivors([tp0], 3)  # the worker leaves by itself
    assert alive(holder)
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0
    assert alive(holder)


def test_die_during_startup(sim):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "die-during-startup"})
    p = s.pids()
    assert s.proc.wait(5) == 1
    assert "die-during-startup" in s.err()
    # Nothing happens to the engine: see test_sigkill_of_api_leaves_engine_and_workers.
    time.sleep(0.3)
    assert alive(p["engine"]) and alive(p["workers"][0])


@pytest.mark.parametrize(("code", "returncode"), [(3, 3), (137, -signal.SIGKILL)])
def test_exit_after(sim, code, returncode):
    s = sim(env={"FAKE_VLLM_EXIT_AFTER_S": "0.3", "FAKE_VLLM_EXIT_CODE": str(code)})
    p = s.pids()
    assert s.proc.wait(5) == returncode
    assert "Application startup complete." in s.out()
    # Nothing happens to the engine: see test_sigkill_of_api_leaves_engine_and_workers.
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
    assert not survivors(orphans, 3)


def test_log_flood(sim):
    s = sim(env={"FAKE_VLLM_LOG_LINES": "20000", "FAKE_VLLM_LAST_LINE": "partial"})
    wait_until(lambda: "INFO fake: log flood done" in s.err(), 10, "the end of the flood")
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
        assert alloc == {"pid": w, "start_ticks": read_proc(w).start_ticks, "gpu": 0,
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
    assert not survivors(tree, 2)


def _leak(gpu_dir, mib: int, gpu: int = 0) -> None:
    """Memory held by no process on simulated GPU ``gpu`` (as FAKE_VLLM_VRAM_LEAK_MIB)."""
    (gpu_dir / f"alloc-leak-{gpu}.json").write_text(json.dumps({
        "pid": None, "start_ticks": None, "gpu": gpu, "mib": mib, "release_delay_s": 0.0}))


def test_check_free_fails_startup_when_the_gpu_is_taken(sim, tmp_path):
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    _leak(gpu_dir, 80000)  # GPU 0: 615 + 80000 of 81559 MiB used, 944 MiB free; GPU 1 free
    s = sim(tp=2, env={"FAKE_VLLM_CHECK_FREE": "1", "FAKE_VLLM_SIM_GPU_DIR": str(gpu_dir),
                       "FAKE_VLLM_VRAM_MIB": "2000", "FAKE_VLLM_NUM_GPUS": "2"})
    assert s.proc.wait(10) == 1
    err = s.err()
    assert ("ValueError: Free memory on device (0.92/79.65 GiB) on startup is less than "
            "desired GPU memory utilization (1.95 GiB). Decrease GPU memory utilization or "
            "reduce GPU memory used by other processes.\n") in err, err
    assert err.count("Free memory on device") == 1  # TP0 only: TP1's GPU 1 has room
    assert "Worker TP0 died during startup" in err
    assert "Application startup complete." not in s.out()  # /health never answered
    assert not list(gpu_dir.glob("alloc-[0-9]*-0.json"))  # TP0 failed before allocating


def test_check_free_starts_with_enough_free_memory(sim, tmp_path):
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    _leak(gpu_dir, 70000)  # 10944 MiB free on the one GPU: room for both workers' 2000
    s = sim(tp=2, env={"FAKE_VLLM_CHECK_FREE": "1", "FAKE_VLLM_SIM_GPU_DIR": str(gpu_dir),
                       "FAKE_VLLM_VRAM_MIB": "2000", "FAKE_VLLM_NUM_GPUS": "1"})
    s.wait_ready()
    for w in s.pids()["workers"]:
        assert (gpu_dir / f"alloc-{w}-0.json").exists()
    assert "Free memory on device" not in s.err()
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0


def test_stop_s_keeps_workers_and_memory_while_stopping(sim, tmp_path):
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    s = sim(tp=2, env={"FAKE_VLLM_STOP_S": "1.5", "FAKE_VLLM_SIM_GPU_DIR": str(gpu_dir),
                       "FAKE_VLLM_VRAM_MIB": "100", "FAKE_VLLM_NUM_GPUS": "1"})
    s.wait_ready()
    tree, workers = s.tree(), s.pids()["workers"]
    probe = SimulatedGpuProbe(gpu_dir, 1)
    assert probe.read()[0].used_mib == 615 + 200
    t0 = time.monotonic()
    os.kill(s.pid, signal.SIGTERM)
    held = []  # seconds after the signal at which both workers and their memory were there

    def server_exited() -> bool:
        if s.proc.poll() is not None:
            return True
        # The server had not exited just now, and it exits only after its workers.
        if all(alive(w) for w in workers) and probe.read()[0].used_mib == 615 + 200:
            held.append(time.monotonic() - t0)
        return False

    wait_until(server_exited, 10, lambda: f"the server to exit; stderr: {s.err()}")
    assert s.proc.returncode == 0
    assert held and max(held) >= 1.0, held  # the workers outlived the signal by >= 1 s
    out = s.out()
    assert out.count("shutdown: taking 1.5 s (FAKE_VLLM_STOP_S)") == 1
    assert "Application shutdown complete." in out and "force killing" not in s.err()
    assert not survivors(tree, 2)
    assert probe.read()[0].used_mib == 615  # freed with the workers
