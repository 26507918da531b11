"""Operating instances: records, `status`, `stop`, `cleanup`, names, --reclaim."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, alive

pytestmark = pytest.mark.timeout(120)


def _cli(env, *args, timeout=90):
    return subprocess.run([sys.executable, "-m", "vllm_supervisor", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def _env(fake_vllm_env):
    return dict(fake_vllm_env, VLLM_SUPERVISE_GPU_PROBE="none")


def _wait_gone(run, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p, (c, _) in run.recorder.seen.items() if alive(p, c)]:
            return
        time.sleep(0.1)
    raise AssertionError("the tree is still alive")


def _orphan(supervise, *args):
    """A supervised tree whose supervisor was SIGKILLed with no guard and no pdeathsig."""
    run = supervise("--no-guard", "--parent-death-signal", "none", *args)
    run.wait_ready()
    run.recorder.poll()
    run.signal(signal.SIGKILL)
    run.finish()
    return run


def test_status_then_stop_through_the_live_supervisor(supervise, fake_vllm_env):
    env = _env(fake_vllm_env)
    run = supervise("--name", "alpha")
    run.wait_ready()
    st = json.loads(_cli(env, "status", "--json").stdout)
    (inst,) = st["instances"]
    assert inst["name"] == "alpha" and inst["state"] == "ready" and inst["supervisor_alive"]
    assert any("VLLM::EngineCore" in p["title"] for p in inst["processes"])
    assert "alpha  ready" in _cli(env, "status").stdout
    res = _cli(env, "stop", "alpha", "--grace", "7")
    assert res.returncode == 0, res.stderr
    assert "stop report" in res.stderr and "exit code   0" in res.stderr
    assert run.finish() == 0
    assert run.report()["grace_s"] == 7.0
    assert "alpha  " not in _cli(env, "status").stdout


def test_serve_refuses_a_name_already_running(supervise):
    run = supervise("--name", "beta")
    run.wait_ready()
    second = supervise("--name", "beta")
    assert second.finish() == 3
    assert "instance 'beta' is already running" in second.stderr()
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_sigkilled_supervisor_record_lets_stop_finish_its_work(supervise, fake_vllm_env):
    env = _env(fake_vllm_env)
    run = _orphan(supervise)
    tmpdirs = list(Path(tempfile.gettempdir()).glob(f"vllm-supervise-{run.pid}-*"))
    st = json.loads(_cli(env, "status", "--json").stdout)["instances"][0]
    assert st["state"] == "orphaned (supervisor gone)" and st["processes"]
    res = _cli(env, "stop", st["name"], "--grace", "2", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    (out,) = json.loads(res.stdout)
    assert out["complete"] and out["stopped_pids"]
    _wait_gone(run)
    assert tmpdirs and not tmpdirs[0].exists()
    assert json.loads(_cli(env, "status", "--json").stdout)["instances"] == []


def test_sigkilled_supervisor_record_lets_cleanup_finish_its_work(supervise, fake_vllm_env):
    env = _env(fake_vllm_env)
    run = _orphan(supervise)
    shown = json.loads(_cli(env, "cleanup", "--json").stdout)
    assert shown["found"] and not shown["killed"]  # nothing killed without --yes
    assert [p for p, (c, _) in run.recorder.seen.items() if alive(p, c)]
    res = _cli(env, "cleanup", "--yes", "--grace", "2", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(k["complete"] for k in json.loads(res.stdout)["killed"])
    _wait_gone(run)


def test_reclaim_stops_a_dead_predecessors_tree_first(supervise):
    old = _orphan(supervise, "--name", "gamma")
    refused = supervise("--name", "gamma")
    assert refused.finish() == 3
    assert "pass --reclaim" in refused.stderr()
    assert [p for p, (c, _) in old.recorder.seen.items() if alive(p, c)]
    new = supervise("--name", "gamma", "--reclaim", "--grace", "5")
    new.wait_ready(timeout=60)
    _wait_gone(old)
    new.signal(signal.SIGTERM)
    assert new.finish() == 0


def test_record_whose_pids_were_reused_leaves_those_processes_alone(fake_vllm_env, tmp_path):
    env = _env(fake_vllm_env)
    state = Path(env["VLLM_SUPERVISE_STATE_DIR"])
    state.mkdir(mode=0o700, exist_ok=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ct = psutil.Process(bystander.pid).create_time()
        wrong = round(ct - 1000, 2)  # the record's processes were other, older processes
        ident = {"pid": bystander.pid, "create_time": wrong}
        (state / "old.json").write_text(json.dumps({
            "name": "old", "supervisor": ident, "model": "m", "port": 1,
            "vllm": {**ident, "pgid": bystander.pid, "sid": bystander.pid},
            "tree": [{**ident, "title": "VLLM::EngineCore"}]}))
        assert _cli(env, "stop", "old", "--grace", "1").returncode == 0
        _cli(env, "cleanup", "--yes", "--grace", "1")
        time.sleep(0.5)
        assert bystander.poll() is None, "an unrelated process with a reused PID was killed"
    finally:
        bystander.kill()
        bystander.wait()


def test_corrupted_or_truncated_record_gives_a_clear_message(fake_vllm_env):
    env = _env(fake_vllm_env)
    state = Path(env["VLLM_SUPERVISE_STATE_DIR"])
    state.mkdir(mode=0o700, exist_ok=True)
    (state / "broken.json").write_text('{"name": "broken", "supervi')
    res = _cli(env, "status")
    assert res.returncode == 0 and "record broken.json is corrupted or truncated" in res.stdout
    res = _cli(env, "stop", "broken")
    assert res.returncode == 1 and "corrupted or truncated" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr


def test_two_concurrent_stops_are_safe(supervise, fake_vllm_env):
    env = _env(fake_vllm_env)
    run = supervise("--name", "delta")
    run.wait_ready()
    argv = [sys.executable, "-m", "vllm_supervisor", "stop", "delta", "--json"]
    procs = [subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert run.finish() == 0
    _wait_gone(run)


def test_cleanup_stops_an_unsupervised_vllm_but_not_a_live_instance(supervise, fake_vllm_env,
                                                                    tmp_path):
    env = _env(fake_vllm_env)
    live = supervise("--name", "live")
    live.wait_ready()
    pidfile = tmp_path / "stray.json"
    stray = subprocess.Popen([sys.executable, "-m", "vllm_supervisor.simulated", "serve", "m",
                              "--port", "0"], env=dict(env, FAKE_VLLM_PIDFILE=str(pidfile)),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # titles are set
        stray_pids = json.loads(pidfile.read_text())
        live_before = {p: c for p, (c, _) in live.recorder.seen.items() if alive(p, c)}
        res = _cli(env, "cleanup", "--yes", "--grace", "2", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        killed = {pid for k in json.loads(res.stdout)["killed"] for pid in k["stopped_pids"]}
        assert {stray_pids["api"], stray_pids["engine"]} <= killed
        assert not killed & set(live_before), "cleanup touched a live supervised tree"
        assert all(alive(p, c) for p, c in live_before.items())
        live.signal(signal.SIGTERM)
        assert live.finish() == 0
    finally:
        for pid in [stray.pid]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stray.wait(10)


def test_cleanup_leaves_another_users_process_alone(fake_vllm_env):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    env = _env(fake_vllm_env)
    other = subprocess.Popen(["bash", "-c", "exec -a VLLM::EngineCore sleep 60"],
                             user=65534, group=65534, extra_groups=[],
                             start_new_session=True)
    try:
        time.sleep(0.3)
        assert psutil.Process(other.pid).uids().real == 65534
        found = json.loads(_cli(env, "cleanup", "--json").stdout)["found"]
        assert other.pid not in {p["pid"] for t in found for p in t["processes"]}
        _cli(env, "cleanup", "--yes", "--grace", "1")
        assert other.poll() is None
        found = json.loads(_cli(env, "cleanup", "--all-users", "--json").stdout)["found"]
        assert other.pid in {p["pid"] for t in found for p in t["processes"]}
    finally:
        other.kill()
        other.wait()
