"""Never harm what is not ours: cleanup finds vLLM trees exactly, records cannot point the
supervisor at other processes or files, and the death guard survives what kills the
supervisor. Each attack runs in a private PID namespace with bystanders that must survive:
a shell with a job, a `sleep` in the same session, a process of uid 65534, precious files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import alive, cli, free_port, survivors, wait_until

ROOT = os.geteuid() == 0
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def _env(fake_vllm_env, tmp_path, **extra) -> dict:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    return dict(fake_vllm_env, VLLM_SUPERVISE_STATE_DIR=str(state), **extra)


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _precious(tmp_path: Path) -> list[Path]:
    """Files nobody but the test made: one in the test's folder, one in /dev/shm named like
    a multiprocessing segment."""
    a = tmp_path / "precious.txt"
    a.write_text("keep me")
    b = Path(f"/dev/shm/psm_precious_{os.getpid()}")
    b.write_text("keep me")
    return [a, b]


@pytest.mark.private_pid_namespace
def test_cleanup_spares_the_shell_that_started_vllm_and_the_jobs_of_its_session(
        fake_vllm_env, tmp_path):
    pidfile = tmp_path / "pids.json"
    env = _env(fake_vllm_env, tmp_path, FAKE_VLLM_PIDFILE=str(pidfile))
    nobody = " ".join(NOBODY) + " sleep 1000 &" if ROOT else ""
    shell = subprocess.Popen(["sh", "-c", f"vllm serve m --port 0 & sleep 1000 & {nobody} wait"],
                             env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    files = _precious(tmp_path)
    try:
        tree = wait_until(lambda: pidfile.exists() and json.loads(pidfile.read_text()), 20,
                          "the simulated vLLM's pidfile")
        bystanders = [shell.pid] + [p for p in _children(shell.pid) if _comm(p) == "sleep"]
        assert len(bystanders) == (3 if ROOT else 2)
        session = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                   if os.getsid(p) == shell.pid]
        # What the old rule (every member of vLLM's session) would have stopped: the shell.
        assert set(bystanders) <= set(session)
        res = cli("cleanup", "--yes", "--grace", "2", "--json", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        killed = {p for k in json.loads(res.stdout)["killed"] for p in k["stopped_pids"]}
        vllm = {tree["api"], tree["engine"], *tree["workers"]}
        assert vllm <= killed and not killed & set(bystanders)
        assert not survivors(vllm, 10)
        assert all(alive(p) for p in bystanders), "a bystander of the session was killed"
        assert all(f.exists() for f in files)
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(10)
        files[1].unlink(missing_ok=True)


@pytest.mark.private_pid_namespace
def test_the_words_vllm_serve_in_arguments_do_not_make_a_process_vllm(fake_vllm_env, tmp_path):
    env = _env(fake_vllm_env, tmp_path)
    impostor = tmp_path / "impostor" / "vllm"
    impostor.parent.mkdir()
    impostor.write_text("#!/bin/sh\nexec sleep 1000\n")  # named vllm, but not vLLM's script
    impostor.chmod(0o755)
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)",
                               "vllm", "serve", "m"], start_new_session=True),
             subprocess.Popen(["sh", str(impostor), "serve", "m"], start_new_session=True)]
    try:
        wait_until(lambda: all(Path(f"/proc/{p.pid}/cmdline").read_bytes() for p in procs), 5)
        res = cli("cleanup", "--yes", "--json", env=env)
        assert res.returncode == 0 and json.loads(res.stdout)["found"] == [], res.stdout
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


@pytest.mark.private_pid_namespace
def test_a_live_supervisor_started_through_a_renamed_link_keeps_its_tree(fake_vllm_env,
                                                                         tmp_path):
    env = _env(fake_vllm_env, tmp_path)
    keeper = tmp_path / "bin" / "llm-keeper"  # no "vllm-supervise" anywhere in its argv
    keeper.write_text(f"#!{sys.executable}\nfrom vllm_supervisor.cli.app import main\nmain()\n")
    keeper.chmod(0o755)
    sup = subprocess.Popen([str(keeper), "serve", "--name", "kept", "--gpu-probe", "none",
                            "m", "--port", str(free_port())], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        wait_until(lambda: lines.append(sup.stderr.readline()) or "ready: " in lines[-1], 30,
                   lambda: "".join(lines))
        res = cli("cleanup", "--yes", "--json", env=env)
        assert res.returncode == 0 and json.loads(res.stdout)["found"] == [], res.stdout
        status = json.loads(cli("status", "--json", env=env).stdout)["instances"]
        assert [(i["name"], i["state"]) for i in status] == [("kept", "ready")]
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(30) == 0
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait(10)


@pytest.mark.private_pid_namespace
def test_the_guard_survives_a_sigkill_of_the_supervisors_process_group(supervise):
    run = supervise("--grace", "1", "--kill-wait", "2",
                    env={"FAKE_VLLM_MISBEHAVE": "engine-ignores-term"})
    run.wait_ready()
    tree = run.tree_pids()
    pids = {tree["api"], tree["engine"], *tree["workers"]}
    guard = _guard_of(run.pid)
    os.killpg(run.pid, signal.SIGKILL)  # `kill -9 -PGID`, as timeout -k or a CI runner does
    assert run.finish() == -signal.SIGKILL
    assert not survivors(pids, 15), "the tree outlived its supervisor's group"
    assert not survivors({guard}, 15)  # and the guard, its work done, is gone too


@pytest.mark.private_pid_namespace
def test_without_the_guard_that_sigkill_leaves_the_tree_running(supervise):
    """Negative control: the same kill with --no-guard leaves the engine (deaf to
    SIGTERM) and its workers running, holding what they hold."""
    run = supervise("--grace", "1", "--no-guard",
                    env={"FAKE_VLLM_MISBEHAVE": "engine-ignores-term"})
    run.wait_ready()
    tree = run.tree_pids()
    tmpdirs = list(Path(tempfile.gettempdir()).glob(f"vllm-supervise-{run.pid}-*"))
    os.killpg(run.pid, signal.SIGKILL)
    run.finish()
    assert survivors({tree["engine"]}, 3) == {tree["engine"]: None}
    for pid in (tree["api"], tree["engine"], *tree["workers"]):  # ours: this test's tree
        os.kill(pid, signal.SIGKILL)
    for d in tmpdirs:  # nobody removes a guardless tree's TMPDIR: this test does
        shutil.rmtree(d)


@pytest.mark.private_pid_namespace
def test_the_guard_knows_a_daemon_forked_just_before_the_supervisor_died(supervise,
                                                                         tmp_path):
    late = tmp_path / "late.json"
    run = supervise("--grace", "1", "--kill-wait", "2",
                    env={"FAKE_VLLM_LATE_DAEMON_FILE": str(late),
                         "FAKE_VLLM_LATE_DAEMON_S": "0.5"})
    run.wait_ready()
    daemon = wait_until(lambda: late.exists() and json.loads(late.read_text())["pid"], 10)
    guard = _guard_of(run.pid)
    assert not Path(f"/proc/{daemon}/environ").read_bytes()  # no token, own session
    # The guard walks the tree every 0.25 s; the supervisor itself looks only every 2 s
    # while serving. No event marks the guard's walk: give it two.
    survivors({daemon}, 0.5)
    os.kill(run.pid, signal.SIGKILL)
    run.finish()
    assert not survivors({daemon}, 15), "the guard did not know the late daemon"
    assert not survivors({guard}, 15)


@pytest.mark.private_pid_namespace
def test_a_planted_record_cannot_point_stop_or_cleanup_at_other_processes_or_files(
        fake_vllm_env, tmp_path):
    from vllm_supervisor.host.identity import BOOT_ID
    from vllm_supervisor.host.proctree import read_proc
    from vllm_supervisor.instances import records as R

    env = _env(fake_vllm_env, tmp_path)
    state = Path(env["VLLM_SUPERVISE_STATE_DIR"])
    shell = subprocess.Popen(["sh", "-c", "sleep 1000 & wait"], start_new_session=True)
    others = [subprocess.Popen([*NOBODY, "sleep", "1000"])] if ROOT else []
    files = _precious(tmp_path)
    folder = tmp_path / f"vllm-supervise-{shell.pid}-precious"  # the supervisor's prefix
    folder.mkdir()
    (folder / "keep").write_text("keep me")
    try:
        wait_until(lambda: _children(shell.pid), 5, "the shell's job")
        job = _children(shell.pid)[0]
        victims = [1, shell.pid, job, *(p.pid for p in others)]
        refs = [read_proc(p, cmdline=False) for p in victims]
        tree = tuple(R.ProcRef(i.pid, i.start_ticks, "VLLM::EngineCore") for i in refs)
        rec = R.InstanceRecord(
            name="planted", boot_id=BOOT_ID,
            supervisor=R.ProcRef(shell.pid, refs[1].start_ticks, "vllm-supervise"),
            vllm=R.VllmRef(job, shell.pid, shell.pid, refs[2].start_ticks),
            model="m", port=8000, url="http://127.0.0.1:8000", argv=("vllm", "serve", "m"),
            state="ready", started_wall=0.0, updated_wall=0.0, tree=tree,
            tmpdir=str(folder), shm=(str(files[1]),),
            budget=R.Budget(1.0, 1.0, 0.0, 256.0))
        R.write_record(state, rec)
        for args in (("stop", "planted", "--json"), ("cleanup", "--yes", "--json")):
            cli(*args, env=env)
            assert all(alive(p) for p in victims), f"`{' '.join(args)}` hit a bystander"
            assert all(f.exists() for f in files) and (folder / "keep").exists()
    finally:
        for p in [*others]:
            p.kill()
            p.wait(10)
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(10)
        files[1].unlink(missing_ok=True)


def _guard_of(supervisor: int) -> int:
    guards = [p for p in _children(supervisor)
              if "death guard" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(guards) == 1
    return guards[0]


def test_the_guard_is_in_a_session_of_its_own(supervise):
    run = supervise()
    run.wait_ready()
    guard = _guard_of(run.pid)
    assert os.getsid(guard) == guard != os.getsid(run.pid)
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_the_kernel_shows_a_childs_token_and_only_its_own():
    from vllm_supervisor.host import ownership
    from vllm_supervisor.host.procinfo import ProcId

    token = ownership.new_token(ProcId(os.getpid(), 1))
    env = dict(os.environ, **{ownership.TOKEN_VAR: token})
    env_less = {k: v for k, v in env.items() if k != ownership.TOKEN_VAR}
    kids = [subprocess.Popen(["sleep", "60"], env=e) for e in (env, env_less)]
    try:
        assert ownership.environ_token(kids[0].pid) == token
        assert ownership.carries_token(kids[0].pid, ProcId(os.getpid(), 1))
        assert not ownership.carries_token(kids[0].pid, ProcId(os.getpid(), 2))
        assert ownership.environ_token(kids[1].pid) is None
    finally:
        for k in kids:
            k.kill()
            k.wait(10)
