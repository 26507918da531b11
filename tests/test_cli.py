"""The command line: bad input, missing binaries, the exit-code table, the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, sim_gpu
from vllm_supervisor.config import default_grace, health_target
from vllm_supervisor.errors import UsageError


def _cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "vllm_supervisor", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("args", [
    ("serve", "--bogus-option", "m"),
    ("serve", "--grace", "-3", "m"),
    ("serve", "--grace", "soon", "m"),
    ("serve",),
    ("serve", "--stop-signal", "SIGNOPE", "m"),
    ("serve", "m", "--port", "eighty"),
    ("frobnicate",),
])
def test_bad_input_is_one_line_and_exit_2(args, fake_vllm_env):
    res = _cli(*args, env=fake_vllm_env)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vllm-supervise: error:"), res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_missing_vllm_binary_exit_127_with_hint(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    res = _cli("serve", "m", env=env)
    assert res.returncode == 127
    assert len(res.stderr.strip().splitlines()) == 1
    assert "hint:" in res.stderr and "--vllm-bin" in res.stderr


def test_vllm_binary_not_executable_exit_126(tmp_path, fake_vllm_env):
    f = tmp_path / "vllm-noexec"
    f.write_text("#!/bin/sh\n")
    res = _cli("serve", "--vllm-bin", str(f), "m", env=fake_vllm_env)
    assert res.returncode == 126 and "not executable" in res.stderr


def test_vllm_bin_from_environment_variable(tmp_path, fake_vllm_env):
    env = dict(fake_vllm_env, VLLM_SUPERVISE_VLLM_BIN=str(tmp_path / "nowhere" / "vllm"))
    res = _cli("serve", "m", env=env)
    assert res.returncode == 127 and "nowhere" in res.stderr


def test_help_and_module_entry_point():
    res = _cli("serve", "--help")
    assert res.returncode == 0 and "--grace" in res.stdout
    assert _cli("--version").stdout.strip().endswith("0.1.0")


def test_vram_not_released_exit_6_with_simulated_leak(supervise, tmp_path):
    probe, env = sim_gpu(tmp_path, vram_mib=1000, vram_leak_mib=2048)
    run = supervise(*probe, "--vram-timeout", "0.5", "--grace", "5", env=env)
    run.wait_ready()
    run.signal(signal.SIGTERM)
    assert run.finish() == 6
    vram = run.report()["vram"]
    assert vram["status"] == "held" and "over baseline" in vram["detail"]
    assert vram["waited_s"] >= 0.5


def test_simulated_vram_released_late_is_waited_for(supervise, tmp_path):
    probe, env = sim_gpu(tmp_path, gpus=2, vram_mib=4096, vram_release_delay_s=0.6)
    run = supervise(*probe, "--grace", "5", vllm_args=("--tensor-parallel-size", "2"), env=env)
    run.wait_ready()
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    vram = run.report()["vram"]
    assert vram["status"] == "released" and vram["waited_s"] >= 0.5
    assert {p["gpu"] for p in vram["peak_by_process"]} == {0, 1}


def test_demo_runs_the_whole_lifecycle(tmp_path):
    report = tmp_path / "demo.json"
    env = dict(os.environ, VLLM_SUPERVISE_STATE_DIR=str(tmp_path / "state"))
    res = _cli("demo", "--serve-for", "0.5", "--report-json", str(report), timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    rep = json.loads(report.read_text())
    assert rep["ready"] and rep["requested"] and rep["vram"]["status"] == "released"
    titles = " ".join(p["title"] for p in rep["processes"])
    assert "VLLM::EngineCore" in titles and "VLLM::Worker_TP" in titles
    assert "stop report" in res.stderr and "\x1b[" not in res.stderr  # no TTY: no ANSI


def test_health_target_and_default_grace():
    assert health_target(()) == ("http", "127.0.0.1", 8000)
    assert health_target(("--host", "::", "--port=9001")) == ("http", "::1", 9001)
    assert health_target(("--ssl-keyfile", "k", "--host", "10.0.0.5")) == \
        ("https", "10.0.0.5", 8000)
    with pytest.raises(UsageError):
        health_target(("--port", "70000"))
    assert default_grace(()) == 20.0
    assert default_grace(("--shutdown-timeout", "60")) == 80.0


def test_vram_timeout_zero_skips_the_wait_and_says_so(supervise, tmp_path):
    probe, env = sim_gpu(tmp_path, vram_mib=1000, vram_leak_mib=2048)
    run = supervise(*probe, "--vram-timeout", "0", env=env)
    run.wait_ready()
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    vram = run.report()["vram"]
    assert vram["status"] == "not-waited" and not vram["timed_out"]
    assert "over baseline" in vram["detail"]


def test_shm_files_the_tree_never_used_are_reported_not_removed(supervise, tmp_path):
    """A psm_* file made during the run by someone else: named in the report, left alone."""
    run = supervise()
    run.wait_ready()
    stranger = Path(f"/dev/shm/psm_not_the_trees_{os.getpid()}")
    stranger.write_text("x")
    try:
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
        rep = run.report()
        assert str(stranger) in rep["leftovers_unattributed"]
        assert str(stranger) not in rep["leftovers_removed"] and stranger.exists()
    finally:
        stranger.unlink(missing_ok=True)
