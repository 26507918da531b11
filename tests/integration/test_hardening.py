"""vLLM-aware hardening with the simulated vLLM: environment hygiene, the startup
watchdog, pre-flight checks, engine death while serving, restarts, who sent the signal
(the logic alone, without processes: tests/unit/test_hardening.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.helpers import sim_gpu
from vllm_supervisor.host.proctree import read_proc

pytestmark = pytest.mark.timeout(120)
DIST = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555",
        "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "job7", "PET_NNODES": "2"}


def test_inherited_dist_env_hangs_startup_without_hygiene(supervise):
    run = supervise("--keep-dist-env", "--stall-timeout", "2", "--grace", "1", env=DIST)
    assert run.finish() == 3
    rep = run.report()
    assert "no progress for 2 s" in rep["exit_meaning"]
    diag = " ".join(rep["diagnosis"])
    assert "RANK=1" in diag and "MASTER_ADDR=127.0.0.1" in diag and "VLLM::EngineCore" in diag
    assert "world_size=2 rank=1" in diag  # the last log lines
    run.assert_all_gone()


def test_hygiene_removes_them_and_the_same_start_succeeds(supervise):
    run = supervise("--stall-timeout", "2", env=DIST)
    run.wait_ready()
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    assert run.report()["env_removed"] == sorted(DIST)
    assert "removed inherited torch.distributed variables" in run.stderr()
    run.assert_all_gone()


def test_startup_timeout_gives_up_with_exit_3(supervise):
    run = supervise("--startup-timeout", "1.5", "--grace", "1",
                    env={"FAKE_VLLM_MISBEHAVE": "slow-startup"})
    assert run.finish() == 3
    assert "not ready after --startup-timeout 1.5 s" in run.report()["exit_meaning"]
    run.assert_all_gone()


def test_port_in_use_is_refused_before_launch(supervise):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        run = supervise("--", vllm_args=("--port", str(port)))
        code = run.finish()
    assert code == 3
    err = run.stderr().strip().splitlines()
    assert err[-1].startswith("vllm-supervise: error: port ")
    assert f"in use by pid {os.getpid()}" in err[-1] and "Traceback" not in run.stderr()
    assert not run.recorder.seen, "nothing may be launched"


def test_gpu_memory_held_before_launch_warns_or_refuses(supervise, tmp_path):
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (gpus / f"alloc-{other.pid}-0.json").write_text(json.dumps(
            {"pid": other.pid, "start_ticks": read_proc(other.pid).start_ticks, "gpu": 0,
             "mib": 5000, "release_delay_s": 0}))
        run = supervise("--gpu-probe", f"sim:{gpus}:1", "--require-free-gpu")
        assert run.finish() == 3
        assert f"pid {other.pid}" in run.stderr() and not run.recorder.seen
        run = supervise("--gpu-probe", f"sim:{gpus}:1")
        run.wait_ready()
        assert f"GPU memory already held before launch: GPU 0: pid {other.pid}" in run.stderr()
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
    finally:
        other.kill()
        other.wait()


def test_engine_death_while_vllm_keeps_serving_is_exit_7(supervise):
    run = supervise("--grace", "2")
    run.wait_ready()
    os.kill(run.tree_pids()["engine"], signal.SIGKILL)
    assert run.finish() == 7
    rep = run.report()
    assert not rep["requested"] and rep["engine_died"]  # process gone or its log line
    run.assert_all_gone()


def test_consecutive_health_failures_count_as_engine_death(supervise):
    run = supervise("--grace", "1", "--health-interval", "0.2", "--health-failures", "3")
    run.wait_ready()
    api = run.tree_pids()["api"]
    os.kill(api, signal.SIGSTOP)  # the server stops answering; every process stays alive
    try:
        assert run.finish(timeout=60) == 7
    finally:
        try:
            os.kill(api, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "/health failed 3 times in a row (no answer)" in run.report()["engine_died"]
    run.assert_all_gone()


def test_sender_of_the_stop_signal_is_named(supervise):
    run = supervise()
    run.wait_ready()
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    got = next(s for s in run.report()["signals"] if s["direction"] == "received")
    assert got["sender_pid"] == os.getpid()
    assert f"pid {os.getpid()}" in run.report()["reason"]


def test_restart_on_failure_until_max_restarts(supervise):
    run = supervise("--restart", "on-failure", "--max-restarts", "2", "--grace", "1",
                    env={"FAKE_VLLM_EXIT_AFTER_S": "1.0", "FAKE_VLLM_EXIT_CODE": "1"})
    assert run.finish(timeout=90) == 1
    rep = run.report()
    assert [r["backoff_s"] for r in rep["restarts"]] == [1, 2]
    assert run.stderr().count("ready: ") == 3
    assert "not restarting: --max-restarts 2 reached" in run.stderr()
    run.assert_all_gone()


def test_no_restart_into_unreleased_vram(supervise, tmp_path):
    probe, env = sim_gpu(tmp_path, vram_mib=100, vram_leak_mib=4000, exit_after_s=1.0,
                         exit_code=1)
    run = supervise("--restart", "always", *probe, "--vram-timeout", "0.3", "--grace", "1",
                    env=env)
    assert run.finish(timeout=60) == 6
    assert run.stderr().count("ready: ") == 1 and "not restarting: exit 6" in run.stderr()
    run.assert_all_gone()


def test_stop_during_restart_backoff_ends_at_once(supervise):
    run = supervise("--restart", "always", "--max-restarts", "5", "--grace", "1",
                    env={"FAKE_VLLM_EXIT_AFTER_S": "1.0", "FAKE_VLLM_EXIT_CODE": "0"})
    run.wait_for("restart 1/5 in 1 s")
    run.wait_for("restart 2/5 in 2 s", timeout=30)
    run.signal(signal.SIGTERM)
    run.finish(timeout=30)
    # The backoff's wait was cut by the signal (no third start), not waited out.
    assert "SIGTERM from" in run.stderr() and "during the restart backoff" in run.stderr()
    assert run.stderr().count("started vLLM") == 2
    run.assert_all_gone()
