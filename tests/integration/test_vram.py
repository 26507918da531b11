"""The VRAM verdict end to end, through the simulated GPU (FAKE_VLLM_SIM_GPU_DIR): a leak,
a late release, a foreign holder, the wait switched off."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.helpers import sim_gpu
from vllm_supervisor.host.proctree import read_proc

pytestmark = pytest.mark.timeout(120)


def test_vram_not_released_exit_6_with_simulated_leak(supervise, tmp_path):
    probe, env = sim_gpu(tmp_path, vram_mib=1000, vram_leak_mib=2048)
    run = supervise(*probe, "--vram-timeout", "0.5", "--grace", "5", env=env)
    run.wait_ready()
    run.signal(signal.SIGTERM)
    assert run.finish() == 6
    vram = run.report()["vram"]
    assert vram["status"] == "held" and "over baseline" in vram["detail"]
    assert vram["waited_s"] >= 0.5  # the whole --vram-timeout: behaviour, not speed


def test_simulated_vram_released_late_is_waited_for(supervise, tmp_path):
    probe, env = sim_gpu(tmp_path, gpus=2, vram_mib=4096, vram_release_delay_s=0.6)
    run = supervise(*probe, "--grace", "5", vllm_args=("--tensor-parallel-size", "2"), env=env)
    run.wait_ready()
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    vram = run.report()["vram"]
    assert vram["status"] == "released" and vram["waited_s"] >= 0.5  # it did wait for it
    assert {p["gpu"] for p in vram["peak_by_process"]} == {0, 1}


def test_vram_timeout_zero_skips_the_wait_and_says_so(supervise, tmp_path):
    probe, env = sim_gpu(tmp_path, vram_mib=1000, vram_leak_mib=2048)
    run = supervise(*probe, "--vram-timeout", "0", env=env)
    run.wait_ready()
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    vram = run.report()["vram"]
    assert vram["status"] == "not-waited" and not vram["timed_out"]
    assert "over baseline" in vram["detail"]


def test_a_co_tenant_taking_simulated_vram_does_not_hold_up_the_release(supervise, tmp_path):
    """End to end with the simulated GPU: memory on GPU 0 taken during the run by a visible
    process outside the tree (another tenant) is not ours: the verdict is "released" at
    once, with the co-tenant's memory left alone and still in use."""
    probe, env = sim_gpu(tmp_path, vram_mib=1000)
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = supervise(*probe, "--vram-timeout", "5", env=env)
        run.wait_ready()
        (tmp_path / "gpus" / f"alloc-{foreign.pid}-0.json").write_text(json.dumps(
            {"pid": foreign.pid, "start_ticks": read_proc(foreign.pid).start_ticks,
             "gpu": 0, "mib": 3000, "release_delay_s": 0}))
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
        vram = run.report()["vram"]
        assert vram["status"] == "released" and not vram["timed_out"], vram
        assert vram["per_gpu"][0]["used_mib"] >= 3000 + 615  # the co-tenant's, still held
        assert foreign.poll() is None  # and the co-tenant untouched
    finally:
        foreign.kill()
        foreign.wait()
