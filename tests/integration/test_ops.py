"""Operating instances: records, `status`, `stop`, `cleanup`, names, --reclaim.

`cleanup --yes` stops any unsupervised vLLM-like tree of this user on the machine: the tests
that run it run in a PID namespace of their own (tests/integration/conftest.py), where the
only such trees are their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, alive, cli, untouched, wait_until
from vllm_supervisor.host import identity
from vllm_supervisor.host.proctree import read_proc
from vllm_supervisor.instances.records import Budget, InstanceRecord, ProcRef, VllmRef, write_record

pytestmark = pytest.mark.timeout(120)


def _env(fake_vllm_env):
    return dict(fake_vllm_env, VLLM_SUPERVISE_GPU_PROBE="none")


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
    st = json.loads(cli("status", "--json", env=env).stdout)
    (inst,) = st["instances"]
    assert inst["name"] == "alpha" and inst["state"] == "ready" and inst["supervisor_alive"]
    assert any("VLLM::EngineCore" in p["title"] for p in inst["processes"])
    assert "alpha  ready" in cli("status", env=env).stdout
    res = cli("stop", "alpha", "--grace", "7", env=env)
    assert res.returncode == 0, res.stderr
    assert "stop report" in res.stderr and "exit code   0" in res.stderr
    assert run.finish() == 0
    assert run.report()["grace_s"] == 7.0
    assert "alpha  " not in cli("status", env=env).stdout


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
    st = json.loads(cli("status", "--json", env=env).stdout)["instances"][0]
    assert st["state"] == "orphaned (supervisor gone)" and st["processes"]
    res = cli("stop", st["name"], "--grace", "2", "--json", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    (out,) = json.loads(res.stdout)
    assert out["complete"] and out["stopped_pids"]
    run.assert_all_gone(15)
    assert tmpdirs and not tmpdirs[0].exists()
    assert json.loads(cli("status", "--json", env=env).stdout)["instances"] == []


@pytest.mark.private_pid_namespace
def test_sigkilled_supervisor_record_lets_cleanup_finish_its_work(supervise, fake_vllm_env):
    env = _env(fake_vllm_env)
    run = _orphan(supervise)
    shown = json.loads(cli("cleanup", "--json", env=env).stdout)
    assert shown["found"] and not shown["killed"]  # nothing killed without --yes
    assert [p for p, (c, _) in run.recorder.seen.items() if alive(p, c)]
    res = cli("cleanup", "--yes", "--grace", "2", "--json", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(k["complete"] for k in json.loads(res.stdout)["killed"])
    run.assert_all_gone(15)


def test_reclaim_stops_a_dead_predecessors_tree_first(supervise):
    old = _orphan(supervise, "--name", "gamma")
    refused = supervise("--name", "gamma")
    assert refused.finish() == 3
    assert "pass --reclaim" in refused.stderr()
    assert [p for p, (c, _) in old.recorder.seen.items() if alive(p, c)]
    new = supervise("--name", "gamma", "--reclaim", "--grace", "5")
    new.wait_ready(timeout=60)
    old.assert_all_gone(15)
    new.signal(signal.SIGTERM)
    assert new.finish() == 0


@pytest.mark.private_pid_namespace
def test_record_whose_pids_were_reused_leaves_those_processes_alone(fake_vllm_env, tmp_path):
    env = _env(fake_vllm_env)
    state = Path(env["VLLM_SUPERVISE_STATE_DIR"])
    state.mkdir(mode=0o700, exist_ok=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ticks = read_proc(bystander.pid).start_ticks
        wrong = ticks - 100_000  # the record's processes were other, older processes
        pid = bystander.pid
        write_record(state, InstanceRecord(
            name="old", boot_id=identity.BOOT_ID, supervisor=ProcRef(pid, wrong),
            vllm=VllmRef(pid, pid, pid, wrong), model="m", port=1, url="http://127.0.0.1:1",
            argv=("vllm", "serve", "m"), state="ready", started_wall=1.0, updated_wall=1.0,
            budget=Budget(1.0, 1.0, 1.0, 256.0),
            tree=(ProcRef(pid, wrong, "VLLM::EngineCore"),)))
        assert cli("stop", "old", "--grace", "1", env=env).returncode == 0
        cli("cleanup", "--yes", "--grace", "1", env=env)
        # Any signal would have been sent before the commands returned.
        assert untouched(bystander.pid), "an unrelated process with a reused PID was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def test_corrupted_or_truncated_record_gives_a_clear_message(fake_vllm_env):
    env = _env(fake_vllm_env)
    state = Path(env["VLLM_SUPERVISE_STATE_DIR"])
    state.mkdir(mode=0o700, exist_ok=True)
    (state / "broken.json").write_text('{"name": "broken", "supervi')
    res = cli("status", env=env)
    assert res.returncode == 0 and "record broken.json is corrupted or truncated" in res.stdout
    res = cli("stop", "broken", env=env)
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
    run.assert_all_gone(15)


@pytest.mark.private_pid_namespace
def test_cleanup_stops_an_unsupervised_vllm_but_not_a_live_instance(supervise, fake_vllm_env,
                                                                    tmp_path):
    env = _env(fake_vllm_env)
    live = supervise("--name", "live")
    live.wait_ready()
    pidfile = tmp_path / "stray.json"
    # `vllm serve` from PATH: the test's stand-in for vLLM's console script.
    stray = subprocess.Popen(["vllm", "serve", "m", "--port", "0"],
                             env=dict(env, FAKE_VLLM_PIDFILE=str(pidfile)),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        # The pidfile names the tree once every process in it has set its title.
        stray_pids = wait_until(lambda: pidfile.exists() and json.loads(pidfile.read_text()),
                                20, "the stray server's pidfile")
        assert " ".join(psutil.Process(stray_pids["engine"]).cmdline()).startswith("VLLM::")
        live_before = {p: c for p, (c, _) in live.recorder.seen.items() if alive(p, c)}
        res = cli("cleanup", "--yes", "--grace", "2", "--json", env=env)
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


# A marker, decided before the test moves into its PID namespace: without root, that comes
# with a user namespace in which we are root and no other user exists.
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
@pytest.mark.private_pid_namespace
def test_cleanup_leaves_another_users_process_alone(fake_vllm_env):
    env = _env(fake_vllm_env)
    other = subprocess.Popen(["bash", "-c", "exec -a VLLM::EngineCore sleep 60"],
                             user=65534, group=65534, extra_groups=[],
                             start_new_session=True)
    try:
        wait_until(lambda: psutil.Process(other.pid).cmdline()[:1] == ["VLLM::EngineCore"], 10,
                   "the other user's process to take its title")
        assert psutil.Process(other.pid).uids().real == 65534
        found = json.loads(cli("cleanup", "--json", env=env).stdout)["found"]
        assert other.pid not in {p["pid"] for t in found for p in t["processes"]}
        cli("cleanup", "--yes", "--grace", "1", env=env)
        assert untouched(other.pid), "cleanup signalled another user's process"
        found = json.loads(cli("cleanup", "--all-users", "--json", env=env).stdout)["found"]
        assert other.pid in {p["pid"] for t in found for p in t["processes"]}
    finally:
        other.kill()
        other.wait()


def test_stop_missing_ok_is_quiet_about_a_name_with_no_record_but_not_about_a_bad_name(
        tmp_path):
    # The unit's ExecStopPost=: after a normal stop the record is gone and nothing is wrong.
    env = dict(os.environ, VLLM_SUPERVISE_STATE_DIR=str(tmp_path / "state"))
    plain = cli("stop", "nosuch", env=env)
    assert plain.returncode == 1 and "no such instance" in plain.stderr
    ok = cli("stop", "--missing-ok", "--", "nosuch", env=env)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    bad = cli("stop", "--missing-ok", "--", "../x", env=env)
    assert bad.returncode == 1 and "not an instance name" in bad.stderr
