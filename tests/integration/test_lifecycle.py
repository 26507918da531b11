"""The supervised lifecycle against the simulated vLLM: real processes, real signals.

Each test is named after the failure it covers, asserts the exit code, and (through the
`supervise` fixture) that no process of the tree is left alive."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import kill_all, poll, survivors, wait_until

pytestmark = pytest.mark.timeout(120)


def _sent(report, sig):
    return [s for s in report["signals"] if s["direction"] == "sent" and s["signal"] == sig]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_clean_stop_on_stop_signal(supervise, sig):
    run = supervise("--grace", "10")
    run.wait_ready()
    pids = run.tree_pids()
    assert len(run.recorder.seen) >= 4, run.recorder.seen
    run.signal(sig)
    assert run.finish() == 0
    rep = run.report()
    assert rep["requested"] and not rep["escalated"]
    assert rep["launch"]["pid"] == rep["launch"]["pgid"] == rep["launch"]["sid"] == pids["api"]
    assert rep["reason"].startswith(signal.Signals(sig).name)
    assert not _sent(rep, "SIGKILL")
    ended = {p["pid"] for p in rep["processes"]}
    assert {pids["api"], pids["engine"], *pids["workers"]} <= ended
    run.assert_all_gone()


def test_engine_ignores_sigterm_gets_sigkill_after_grace_and_not_before(supervise):
    grace, kill_wait = 1.5, 10
    run = supervise("--grace", str(grace), "--kill-wait", str(kill_wait),
                    env={"FAKE_VLLM_MISBEHAVE": "engine-ignores-term"})
    run.wait_ready()
    engine = run.tree_pids()["engine"]
    t_term = time.monotonic()
    run.signal(signal.SIGTERM)
    run.wait_for("waiting up to")
    assert not survivors([engine], timeout=60), "the engine outlived the stop"
    # The test's own clock: the engine died (SIGKILL) no sooner than the grace after SIGTERM.
    assert time.monotonic() - t_term >= grace, "SIGKILL came before the grace period ended"
    assert run.finish() == 4
    rep = run.report()
    received = next(s for s in rep["signals"] if s["direction"] == "received")["t"]
    kill_t = _sent(rep, "SIGKILL")[0]["t"]
    assert grace <= kill_t - received < grace + kill_wait
    assert rep["escalated"]
    run.assert_all_gone()


def test_worker_hangs_forever_in_shutdown_like_nccl_destroy(supervise):
    run = supervise("--grace", "1", vllm_args=("--tensor-parallel-size", "2"),
                    env={"FAKE_VLLM_MISBEHAVE": "worker-hangs-shutdown"})
    run.wait_ready()
    workers = run.tree_pids()["workers"]
    run.signal(signal.SIGTERM)
    assert run.finish() == 4
    ends = {p["pid"]: p for p in run.report()["processes"]}
    for w in workers:  # the hung workers ended only through the escalation
        assert "SIGKILL" in ends[w]["signals"], ends[w]
    run.assert_all_gone()


def test_api_server_dies_alone_and_its_orphaned_engine_still_dies(supervise):
    """vllm#55510: SIGKILL of the API server alone leaves EngineCore and workers behind."""
    run = supervise("--grace", "5", vllm_args=("--tensor-parallel-size", "2"))
    run.wait_ready()
    pids = run.tree_pids()
    os.kill(pids["api"], signal.SIGKILL)
    assert run.finish() == 128 + signal.SIGKILL
    rep = run.report()
    assert not rep["requested"]
    assert "by itself while serving" in rep["reason"]
    ended = {p["pid"] for p in rep["processes"]}
    assert {pids["engine"], *pids["workers"]} <= ended
    run.assert_all_gone()


def test_worker_escapes_group_with_setsid_and_still_dies(supervise):
    run = supervise("--grace", "1", vllm_args=("--tensor-parallel-size", "2"),
                    env={"FAKE_VLLM_MISBEHAVE": "worker-setsid,worker-hangs-shutdown"})
    run.wait_ready()
    pids = run.tree_pids()
    for w in pids["workers"]:
        assert os.getpgid(w) != pids["api"], "the worker did not leave the group"
    run.signal(signal.SIGTERM)
    assert run.finish() == 4
    rep = run.report()
    outside = [s for s in _sent(rep, "SIGKILL") if "outside the group" in s["target"]]
    assert {str(w) in " ".join(s["target"] for s in outside) for w in pids["workers"]} == {True}
    run.assert_all_gone()


def test_grandchild_double_forks_into_a_daemon_and_still_dies(supervise):
    run = supervise("--grace", "1", env={"FAKE_VLLM_MISBEHAVE": "grandchild-daemon"})
    run.wait_ready()
    daemon = run.tree_pids("daemon")["daemon"]  # its middle process has exited by then
    run.recorder.poll()
    assert daemon in run.recorder.seen, "the daemon was never seen in the tree"
    assert psutil.Process(daemon).ppid() == run.pid, "the subreaper did not adopt it"
    run.signal(signal.SIGTERM)
    assert run.finish() == 4
    run.assert_all_gone()


def test_grandchild_holding_the_stdout_pipe_does_not_hang_the_stop(supervise):
    run = supervise("--grace", "1", env={"FAKE_VLLM_MISBEHAVE": "grandchild-holds-stdout"})
    run.wait_ready()
    pids = run.tree_pids("holder")
    # The holder's parent (worker TP0) exits by itself; the holder keeps the pipe.
    assert not survivors([pids["workers"][0]], timeout=20), "worker TP0 did not exit"
    assert survivors([pids["holder"]]), "the holder is gone already"
    run.signal(signal.SIGTERM)
    assert run.finish(timeout=20) == 4  # a hung stop would time out here
    run.assert_all_gone()


def test_stop_during_startup_while_api_server_ignores_sigterm(supervise):
    run = supervise("--grace", "1",
                    env={"FAKE_VLLM_MISBEHAVE": "slow-startup,api-ignores-term-during-startup"})
    run.tree_pids()  # the tree exists (the API server ignores SIGTERM from its start on)
    run.signal(signal.SIGTERM)
    assert run.finish() == 4
    rep = run.report()
    assert not rep["ready"] and rep["requested"] and rep["escalated"]
    run.assert_all_gone()


def test_two_ctrl_c_escalate_at_once(supervise):
    grace = 60
    run = supervise("--grace", str(grace), env={"FAKE_VLLM_MISBEHAVE": "engine-ignores-term"})
    run.wait_ready()
    run.signal(signal.SIGINT)
    run.wait_for("waiting up to")
    run.signal(signal.SIGINT)
    assert run.finish(timeout=grace + 30) == 4
    rep = run.report()
    first = next(s for s in rep["signals"] if s["direction"] == "received")["t"]
    assert _sent(rep, "SIGKILL")[0]["t"] - first < grace, "the second Ctrl-C did not cut the grace"
    assert any("second SIGINT" in n for n in rep["log_notes"])
    run.assert_all_gone()


@pytest.mark.parametrize("misbehave", ["", "engine-ignores-term"])
def test_supervisor_sigkilled_takes_the_tree_with_it(supervise, misbehave):
    run = supervise("--grace", "1", "--kill-wait", "2",
                    env={"FAKE_VLLM_MISBEHAVE": misbehave})
    run.wait_ready()
    pids = run.tree_pids()
    tree = {p: psutil.Process(p).create_time() for p in [pids["api"], pids["engine"],
                                                         *pids["workers"]]}
    private_tmp = list(Path(tempfile.gettempdir()).glob(f"vllm-supervise-{run.pid}-*"))
    assert len(private_tmp) == 1
    run.signal(signal.SIGKILL)
    run.finish()
    assert not survivors(tree, timeout=30), "the tree outlived its killed supervisor"
    wait_until(lambda: not private_tmp[0].exists(), 30,
               "the death guard to remove the private TMPDIR")


def test_negative_control_without_guard_and_pdeathsig_tree_outlives_killed_supervisor(supervise):
    run = supervise("--no-guard", "--parent-death-signal", "none")
    run.wait_ready()
    pids = run.tree_pids()
    tree = {p: psutil.Process(p).create_time()
            for p in [pids["api"], pids["engine"], *pids["workers"], pids["tracker"]]}
    run.signal(signal.SIGKILL)
    run.finish()
    # The scenario is that nothing happens, and no event marks "a parent-death signal would
    # have acted by now": the API server's reparenting shows the kernel has processed the
    # supervisor's death (such a signal goes out then), and an obedient tree stops on it in
    # a fraction of the second that follows (the positive test above).
    wait_until(lambda: psutil.Process(pids["api"]).ppid() != run.pid, 10, "the reparenting")
    time.sleep(1.0)
    assert survivors(tree) == tree, "without guard and pdeathsig the tree must live on"
    kill_all(tree)  # this test's own processes, identity checked
    assert not survivors(tree, timeout=10)
    for d in Path(tempfile.gettempdir()).glob(f"vllm-supervise-{run.pid}-*"):
        shutil.rmtree(d)  # this run's private TMPDIR: with no guard nobody else removes it


@pytest.mark.parametrize("code", [0, 1, 137])
def test_vllm_exits_by_itself_code_passed_on_and_leftovers_killed(supervise, code):
    run = supervise("--grace", "1", env={"FAKE_VLLM_EXIT_AFTER_S": "1.0",
                                         "FAKE_VLLM_EXIT_CODE": str(code)})
    run.wait_ready()
    pids = run.tree_pids()
    assert run.finish() == code
    rep = run.report()
    assert rep["vllm_exit"] == code and not rep["requested"]
    assert pids["engine"] in {p["pid"] for p in rep["processes"]}
    run.assert_all_gone()


def test_vllm_dies_during_startup_is_failed_to_start(supervise):
    run = supervise("--grace", "1", env={"FAKE_VLLM_MISBEHAVE": "die-during-startup"})
    assert run.finish() == 3
    rep = run.report()
    assert not rep["ready"] and rep["vllm_exit"] == 1
    run.assert_all_gone()


def _zombies_among(pids):
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() == psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_hundred_orphans_are_adopted_and_reaped_no_zombies(supervise):
    run = supervise("--grace", "5", env={"FAKE_VLLM_ORPHANS": "100",
                                         "FAKE_VLLM_ORPHAN_LIFE_S": "3.0"})
    run.wait_ready()
    orphans = run.tree_pids("orphans")["orphans"]
    assert len(orphans) == 100
    parents = {psutil.Process(p).ppid() for p in orphans}
    assert parents == {run.pid}, "orphans were not reparented to the supervisor"
    # They exit after 3 s; the supervisor reaps them (a zombie still has its PID).
    wait_until(lambda: not [p for p in orphans if psutil.pid_exists(p)], 30,
               lambda: f"the supervisor to reap them; zombies: {_zombies_among(orphans)}")
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    run.assert_all_gone()


def test_negative_control_without_subreaper_orphans_escape_the_tree(supervise):
    run = supervise("--grace", "5", "--no-subreaper",
                    env={"FAKE_VLLM_ORPHANS": "100", "FAKE_VLLM_ORPHAN_LIFE_S": "3.0"})
    run.wait_ready()
    orphans = run.tree_pids("orphans")["orphans"]
    parents = {psutil.Process(p).ppid() for p in orphans if psutil.pid_exists(p)}
    assert run.pid not in parents, "without the subreaper the orphans must not be ours"
    descendants = {c.pid for c in psutil.Process(run.pid).children(recursive=True)}
    assert not descendants & set(orphans), "escaped orphans must be outside the tree"
    assert len(parents) == 1 and parents != {run.pid}
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    kill_all(orphans)  # they are this test's own processes: end them by PID


def test_million_log_lines_and_an_unterminated_last_line_arrive_complete(supervise, tmp_path):
    out = tmp_path / "stdout.txt"
    log = tmp_path / "vllm.log"
    with open(out, "wb") as f:
        run = supervise("--log-file", str(log), stdout=f,
                        env={"FAKE_VLLM_LOG_LINES": "1000000",
                             "FAKE_VLLM_LAST_LINE": "the very last line"})
        run.wait_ready()
        run.wait_for("log flood done", timeout=60)
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
    # The fake's HTTP threads may log between flood writes: compare the flood lines only.
    expected = [b"log line %d" % i for i in range(1, 1_000_001)]
    for data in (out.read_bytes(), log.read_bytes()):
        lines = data.split(b"\n")
        assert [x for x in lines if x.startswith(b"log line ")] == expected
        assert any(x.startswith(b"the very last line") for x in lines)
    run.assert_all_gone()


def test_survivor_of_sigkill_is_named_with_its_state(supervise, tmp_path):
    """A process frozen by the cgroup-v1 freezer sits in D state and survives SIGKILL."""
    freezer = "/sys/fs/cgroup/freezer"
    if os.geteuid() != 0 or not os.path.isdir(freezer):
        pytest.skip("needs root and the cgroup v1 freezer to make an unkillable process")
    cg = f"{freezer}/vllm-supervise-test-{os.getpid()}-{time.monotonic_ns()}"
    run = supervise("--grace", "0.5", "--kill-wait", "1")
    run.wait_ready()
    worker = run.tree_pids()["workers"][0]
    os.mkdir(cg)
    try:
        with open(f"{cg}/cgroup.procs", "w") as f:
            f.write(str(worker))
        with open(f"{cg}/freezer.state", "w") as f:
            f.write("FROZEN")
        run.signal(signal.SIGTERM)
        assert run.finish() == 5
        rep = run.report()
        assert [s["pid"] for s in rep["survivors"]] == [worker]
        assert rep["survivors"][0]["state"].startswith("D")
        kept = next(n for n in rep["log_notes"] if n.startswith("private TMPDIR"))
    finally:
        with open(f"{cg}/freezer.state", "w") as f:
            f.write("THAWED")
        poll(lambda: not psutil.pid_exists(worker), 5)  # the pending SIGKILL ends it now
        os.rmdir(cg)
    shutil.rmtree(kept.split()[2])  # the run's TMPDIR, kept for the survivor: now unused


def test_signal_group_and_stop_signal_options(supervise):
    run = supervise("--signal-group", "--stop-signal", "INT", "--grace", "10")
    run.wait_ready()
    api = run.tree_pids()["api"]
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    sent = _sent(run.report(), "SIGINT")
    assert [s["target"] for s in sent] == [f"group {api}"]
    run.assert_all_gone()
