"""The supervised lifecycle, driven through a fake host and a fake clock: the whole
TERM -> grace -> KILL -> VRAM path, engine death, startup failures, in milliseconds."""

from __future__ import annotations

import itertools
import signal

import pytest
from fakehost import SENDER, Spec
from lifecycle_kit import FakeRegistry, kit

from vllm_supervisor.errors import SupervisorError
from vllm_supervisor.lifecycle.machine import State

FULL = ["admitting", "launching", "starting", "ready", "stopping", "awaiting-vram", "done"]


def test_clean_stop_on_sigterm_takes_every_edge_once_and_exits_0():
    k = kit()
    k.host.send_supervisor(3.0)
    r = k.run()
    assert r.exit_code == 0 and not r.escalated and r.requested
    assert k.edges.states() == FULL
    assert [target for _, target in k.sent("SIGTERM")] == [f"pid {k.host.launch.pid}"]
    assert k.sent("SIGKILL") == []
    assert f"SIGTERM from pid {SENDER}" in r.reason
    assert r.time_to_ready_s == pytest.approx(1.0, abs=0.3)


def test_stop_signal_goes_to_the_main_process_only_and_the_tree_shuts_itself_down():
    k = kit()
    k.host.send_supervisor(2.0)
    k.run()
    assert k.host.signals_to("VLLM::EngineCore") == ["SIGTERM"]  # from its API server
    assert all(p.reaped for p in k.host.procs.values())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_every_stop_signal_starts_the_stop(sig):
    k = kit()
    k.host.send_supervisor(2.0, sig)
    r = k.run()
    assert r.exit_code == 0 and r.reason.startswith(signal.Signals(sig).name)


def test_engine_ignores_sigterm_gets_sigkill_exactly_at_the_grace_not_before():
    k = kit(Spec(engine_term_delay=None), grace_s=5.0)
    k.host.send_supervisor(2.0)
    r = k.run()
    stop_at = k.edges.at(State.STOPPING)
    kills = k.sent("SIGKILL")
    assert kills[0] == (stop_at + 5.0, f"group {k.host.launch.pid}")
    assert r.exit_code == 4 and r.escalated
    assert k.edges.states() == ["admitting", "launching", "starting", "ready", "stopping", "killing",
                                "awaiting-vram", "done"]


def test_grace_from_a_stop_request_is_data_and_leaves_config_alone():
    reg = FakeRegistry(stop_grace=1.5)
    k = kit(Spec(engine_term_delay=None), grace_s=20.0, registry=reg)
    k.host.send_supervisor(2.0)
    r = k.run()
    assert k.sent("SIGKILL")[0][0] == k.edges.at(State.STOPPING) + 1.5
    assert r.grace_s == 1.5 and k.cfg.grace_s == 20.0
    assert ("grace", 1.5) in k.host.guard.calls  # the guard knows the grace in force


def test_second_ctrl_c_escalates_at_once():
    k = kit(Spec(engine_term_delay=None), grace_s=30.0)
    k.host.send_supervisor(2.0, signal.SIGINT)
    k.host.send_supervisor(2.5, signal.SIGINT)
    r = k.run()
    assert k.sent("SIGKILL")[0][0] == pytest.approx(k.edges.at(State.STOPPING) + 0.5)
    assert r.exit_code == 4 and "second SIGINT" in " ".join(r.log_notes)


def test_second_sigterm_is_ignored_while_stopping():
    k = kit(Spec(engine_term_delay=None), grace_s=3.0)
    k.host.send_supervisor(2.0)
    k.host.send_supervisor(2.5)
    k.run()
    assert k.sent("SIGKILL")[0][0] == k.edges.at(State.STOPPING) + 3.0
    assert "SIGTERM ignored: already stopping" in k.ui.text()


def test_worker_escaped_with_setsid_is_killed_by_pid_not_only_by_group():
    k = kit(Spec(worker_setsid=True, worker_term_delay=None), grace_s=2.0)
    k.host.send_supervisor(2.0)
    r = k.run()
    targets = [s.target for s in r.signals if s.signal == "SIGKILL"]
    assert f"group {k.host.launch.pid}" in targets
    assert sum("outside the group" in t for t in targets) == 2
    assert r.exit_code == 4 and not r.survivors


def test_process_forked_during_the_kill_wait_is_killed_on_the_next_tick():
    k = kit(Spec(worker_killable=False, worker_term_delay=None), grace_s=1.0, kill_wait_s=2.0)
    k.host.send_supervisor(2.0)
    worker = 103
    k.host.fork_at(3.5, worker, "late-daemon", setsid=True)  # while KILLING
    r = k.run()
    late = k.host.pid_of("late-daemon")
    assert k.host.procs[late].dead and k.host.signals_to("late-daemon") == ["SIGKILL"]
    assert {s.title for s in r.survivors} == {"VLLM::Worker_TP0", "VLLM::Worker_TP1"}


def test_survivor_of_sigkill_is_exit_5_named_with_state_and_its_tmpdir_kept():
    k = kit(Spec(worker_killable=False, worker_term_delay=None), grace_s=1.0, kill_wait_s=2.0)
    k.host.send_supervisor(2.0)
    r = k.run()
    assert r.exit_code == 5
    assert {s.title for s in r.survivors} == {"VLLM::Worker_TP0", "VLLM::Worker_TP1"}
    assert all(s.state.startswith("D ") for s in r.survivors)
    assert not k.host.leftovers.removed
    assert any("TMPDIR /fake/tmpdir kept" in n for n in r.log_notes)
    done = k.edges.at(State.AWAITING_VRAM)
    assert done == pytest.approx(k.edges.at(State.KILLING) + 2.0, abs=0.02)


def test_vram_released_late_is_waited_for_and_reported_released():
    k = kit(Spec(worker_vram_mib=30000, vram_release_s=0.5), gpus=2)
    k.host.send_supervisor(2.0)
    r = k.run()
    assert r.exit_code == 0 and r.vram.status == "released"
    assert r.vram.waited_s == pytest.approx(0.5, abs=0.05)
    assert {p["title"] for p in r.vram.peak_by_process} == {"VLLM::Worker_TP0",
                                                            "VLLM::Worker_TP1"}


def test_vram_never_released_times_out_with_exit_6_after_exactly_the_vram_timeout():
    k = kit(Spec(worker_vram_mib=30000, vram_release_s=1e9), gpus=2, vram_timeout_s=4.0)
    k.host.send_supervisor(2.0)
    r = k.run()
    assert r.exit_code == 6 and r.vram.timed_out and r.vram.status == "held"
    assert r.vram.waited_s == pytest.approx(4.0, abs=0.02)


def test_vram_timeout_zero_does_not_wait_and_says_so():
    k = kit(Spec(worker_vram_mib=30000, vram_release_s=1e9), gpus=2, vram_timeout_s=0.0)
    k.host.send_supervisor(2.0)
    r = k.run()
    assert r.exit_code == 0 and r.vram.status == "not-waited" and r.vram.waited_s == 0


def test_ctrl_c_during_the_vram_wait_gives_it_up_as_not_verified():
    k = kit(Spec(worker_vram_mib=30000, vram_release_s=1e9), gpus=2, vram_timeout_s=30.0)
    k.host.send_supervisor(2.0)
    k.host.send_supervisor(3.0, signal.SIGINT)
    r = k.run()
    assert r.vram.status == "interrupted" and r.exit_code == 6


def test_a_co_tenant_that_took_memory_while_serving_does_not_hold_up_our_release():
    """On a shared GPU "released" means the tree's own processes hold nothing: another
    tenant's visible process that took 5000 MiB meanwhile is not ours (the total against
    the baseline would have said "held" and waited the whole VRAM timeout)."""
    k = kit(Spec(worker_vram_mib=1000), gpus=2, vram_timeout_s=1.0)
    probe = k.sup.ledger.probe
    k.host.add_foreign(7777, "python other_job.py")
    k.host.at(1.5, probe.extra.append, (0, 7777, 5000.0))  # someone else's, while serving
    k.host.send_supervisor(2.0)
    r = k.run()
    assert r.exit_code == 0 and r.vram.status == "released", r.vram
    assert r.vram.waited_s < 0.1  # no wait for the co-tenant's memory


def test_memory_of_a_process_we_cannot_see_keeps_the_verdict_from_released():
    """Where attribution is impossible (NVML lists a PID of another PID namespace: a
    container without --pid=host), the total against the baseline decides: never a false
    "released"."""
    k = kit(Spec(worker_vram_mib=1000), gpus=2, vram_timeout_s=1.0)
    probe = k.sup.ledger.probe
    k.host.at(1.5, probe.extra.append, (0, 7777, 5000.0))  # 7777: not visible here
    k.host.send_supervisor(2.0)
    r = k.run()
    assert r.exit_code == 6 and r.vram.status == "unattributable", r.vram
    assert [(h.pid, h.ours) for h in r.vram.holders] == [(7777, False)]
    assert r.vram.waited_s == pytest.approx(1.0, abs=0.02)


def test_vllm_exits_by_itself_while_serving_passes_its_code_on_and_kills_leftovers():
    k = kit(Spec(api_term_delay=0.05))
    api = 100
    k.host.exit_at(3.0, api, code=1)  # the engine and workers are orphaned
    r = k.run()
    assert r.exit_code == 1 and not r.requested
    assert "by itself while serving" in r.reason
    assert k.host.signals_to("VLLM::EngineCore") == ["SIGTERM"]  # group: still ours
    assert all(p.reaped for p in k.host.procs.values())


def test_vllm_killed_by_a_signal_by_itself_is_128_plus_the_signal():
    k = kit()
    k.host.exit_at(3.0, 100, sig=signal.SIGKILL)
    assert k.run().exit_code == 137


def test_engine_gone_while_the_server_keeps_running_is_engine_death_exit_7():
    k = kit()
    k.host.exit_at(3.0, 101, code=1)  # VLLM::EngineCore alone
    r = k.run()
    assert r.exit_code == 7 and "engine process" in r.engine_died
    assert k.edges.states() == FULL


def test_engine_died_and_vllm_exited_0_is_still_exit_7():
    k = kit()
    k.host.exit_at(3.0, 101, code=1)
    k.host.exit_at(3.0, 100, code=0)
    assert k.run().exit_code == 7


def test_health_failing_is_engine_death_exit_7():
    k = kit()
    k.host.unhealthy_at(4.0)
    r = k.run()
    assert r.exit_code == 7 and "/health failed" in r.engine_died


def test_engine_death_log_line_with_no_stop_requested_is_exit_7():
    k = kit()
    line = b"ERROR [core_client.py:1] Engine core proc EngineCore_DP0 died unexpectedly\n"
    k.host.at(3.0, k.sup.classifier.feed, "stderr", line)
    k.host.at(3.0, k.host._wake)
    r = k.run()
    assert r.exit_code == 7 and "logged the engine's death" in r.engine_died


def test_the_same_log_line_after_a_requested_stop_is_noise_exit_0():
    k = kit()
    line = b"ERROR [core_client.py:1] Engine core proc EngineCore_DP0 died unexpectedly\n"
    k.host.send_supervisor(2.0)
    k.host.at(2.01, k.sup.classifier.feed, "stderr", line)
    r = k.run()
    assert r.exit_code == 0 and not r.log.crash


def test_vllm_dies_during_startup_is_failed_to_start_exit_3():
    k = kit(Spec(ready_after=None))
    k.host.exit_at(0.5, 100, code=1)
    r = k.run()
    assert r.exit_code == 3 and not r.ready and "during startup" in r.reason
    assert "ready" not in k.edges.states()


def test_startup_timeout_gives_up_with_exit_3_and_a_diagnosis():
    k = kit(Spec(ready_after=None), startup_timeout_s=10.0)
    r = k.run()
    assert r.exit_code == 3 and "--startup-timeout 10" in r.exit_meaning
    assert k.edges.at(State.STOPPING) == pytest.approx(1010.0, abs=0.3)
    assert any("VLLM::EngineCore" in d and "wchan fake_wait" in d for d in r.diagnosis)


def test_a_start_with_no_progress_is_a_stall_exit_3():
    k = kit(Spec(ready_after=None), stall_timeout_s=6.0)
    r = k.run()
    assert r.exit_code == 3 and "no progress for 6 s" in r.exit_meaning


def test_stop_during_startup_when_the_api_server_ignores_sigterm_escalates():
    k = kit(Spec(ready_after=None, api_term_delay=None), grace_s=2.0)
    k.host.send_supervisor(0.5)
    r = k.run()
    assert r.exit_code == 4 and not r.ready and r.requested


def test_port_in_use_is_refused_before_anything_is_launched():
    k = kit()
    k.host.port_busy = True
    with pytest.raises(SupervisorError) as e:
        k.run()
    assert e.value.exit_code == 3 and not k.host.spawned


def test_gpu_memory_already_held_refuses_with_require_free_gpu():
    k = kit(gpus=1, require_free_gpu=True)
    k.sup.ledger.probe.extra.append((0, 7777, 2000.0))
    with pytest.raises(SupervisorError) as e:
        k.run()
    assert e.value.exit_code == 3 and "pid 7777" in e.value.message and not k.host.spawned


def test_gpu_memory_already_held_only_warns_by_default():
    k = kit(gpus=1)
    k.sup.ledger.probe.extra.append((0, 7777, 2000.0))
    k.host.send_supervisor(2.0)
    k.run()
    assert "GPU memory already held before launch: GPU 0: pid 7777" in k.ui.text()


def test_inherited_distributed_variables_are_removed_unless_kept():
    env = {"RANK": "1", "MASTER_ADDR": "10.0.0.1", "NCCL_DEBUG": "INFO", "PATH": "/bin"}
    k = kit(env=env)
    k.host.send_supervisor(2.0)
    r = k.run()
    assert r.env_removed == ("MASTER_ADDR", "RANK")
    assert "RANK" not in k.host.spawn_env and k.host.spawn_env["NCCL_DEBUG"] == "INFO"
    k2 = kit(env=env, keep_dist_env=True)
    k2.host.send_supervisor(2.0)
    assert k2.run().env_removed == () and k2.host.spawn_env["RANK"] == "1"


def test_signal_group_and_stop_signal_options():
    k = kit(signal_group=True, stop_signal=signal.SIGINT)
    k.host.send_supervisor(2.0)
    k.run()
    assert [t for _, t in k.sent("SIGINT")] == [f"group {k.host.launch.pid}"]


def test_the_guard_is_told_the_tree_every_process_and_done_at_the_end():
    k = kit()
    k.host.send_supervisor(2.0)
    k.run()
    calls = k.host.guard.calls
    assert calls[0] == ("start", 5.0, 10.0)
    token = k.host.spawn_env["VLLM_SUPERVISE_INSTANCE"]
    assert token.startswith("10:1:") and ("tree", 100, token) in calls
    tracked = {c[1].pid for c in calls if c[0] == "track"}
    assert tracked == {100, 101, 102, 103}
    assert calls[-1] == ("done",)
    k.sup.reap_guard(1.0)  # collected at the very end, bounded
    assert k.host.guard.calls[-1] == ("waited", 1.0)


def test_with_a_restart_policy_the_guard_is_waited_for_before_the_run_returns():
    k = kit(restart="on-failure")
    k.host.send_supervisor(2.0)
    k.run()
    assert k.host.guard.calls[-2:] == [("done",), ("waited", None)]


def test_an_internal_error_leaves_the_unfinished_stop_to_the_guard():
    k = kit()
    k.host.send_supervisor(2.0)

    def broken(*a, **kw):
        raise RuntimeError("bug")

    k.sup.ledger.check = broken
    with pytest.raises(RuntimeError):
        k.run()
    assert k.host.guard.calls[-1] == ("close",)


def test_the_record_follows_the_lifecycle():
    reg = FakeRegistry()
    k = kit(registry=reg)
    k.host.send_supervisor(2.0)
    k.run()
    assert reg.calls[0][0] == "launched" and reg.calls[0][1]["vllm"].pid == 100
    assert reg.states() == ["ready", "stopping"]
    trees = [kw["tree"] for m, kw in reg.calls if m == "update" and kw.get("tree")]
    assert {i.pid for i, _ in trees[-1]} == {100, 101, 102, 103}


def test_systemd_is_told_ready_stopping_and_fed_the_watchdog_only_while_healthy():
    k = kit(watchdog_s=2.0, idle_poll_s=5.0)
    k.host.unhealthy_at(8.0)
    k.run()
    sent = k.notifier.sent
    ready_t = next(t for t, m in sent if "READY=1" in m)
    pings = [t for t, m in sent if m == "WATCHDOG=1"]
    assert ready_t == pytest.approx(1001.0, abs=0.3)
    assert pings and all(ready_t <= t < 1008.0 for t in pings)
    assert all(b - a <= 1.0 + 1e-6 for a, b in itertools.pairwise(pings))
    assert any("STOPPING=1" in m for _, m in sent)


def test_a_listener_sees_every_edge_in_order_with_its_time():
    k = kit(Spec(engine_term_delay=None), grace_s=1.0)
    k.host.send_supervisor(2.0)
    k.run()
    S = State
    assert [(a, b) for a, b, _ in k.edges.edges] == [
        (S.ADMITTING, S.LAUNCHING), (S.LAUNCHING, S.STARTING), (S.STARTING, S.READY), (S.READY, S.STOPPING),
        (S.STOPPING, S.KILLING), (S.KILLING, S.AWAITING_VRAM), (S.AWAITING_VRAM, S.DONE)]
    assert k.edges.at(S.KILLING) == k.edges.at(S.STOPPING) + 1.0
