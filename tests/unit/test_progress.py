"""The progress probe: its judgement alone, then the whole run over the fake host and
clock (hang verdict to the exact fake second, diagnosis before the first signal, a busy
engine never called hung, the drain counted)."""

import pytest
from fakehost import Spec
from lifecycle_kit import kit

from vllm_supervisor.host.vllm_http import MetricsSample, parse_metrics
from vllm_supervisor.lifecycle.progress import ProbeSettings, ProgressJudge, model_kind

S = ProbeSettings("completion", interval_s=5, timeout_s=15, failures=2, kind="generate",
                  api_key=None)


def sample(progress, running=0, waiting=0, sleeping=False):
    return MetricsSample(progress, running, waiting, 0.0, sleeping)


def test_a_hang_needs_n_failed_canaries_with_no_progress_in_between():
    j = ProgressJudge(S, 0)
    assert not j.on_metrics(0, sample(100))  # the first look has nothing to compare
    j.on_canary(15, None, 15, "no answer within 15 s")
    assert j.hung is None and j.suspect.startswith("hang suspected: 1/2")
    assert j.on_metrics(20, sample(110))  # progress: the count starts again
    assert j.fails == 0 and j.suspect is None
    assert not j.on_metrics(25, sample(110))
    j.on_canary(40, None, 15, "no answer within 15 s")
    assert not j.on_metrics(45, sample(110))
    j.on_canary(60, None, 15, "no answer within 15 s")
    assert j.hung.startswith("2 canary requests in a row failed (no answer within 15 s)")
    assert "did not move for 40 s" in j.hung  # since the look at 20 s


def test_a_busy_engine_whose_canaries_time_out_is_never_hung():
    j = ProgressJudge(S, 0)
    for t in range(0, 600, 20):  # the queue is long: every canary times out ...
        j.on_metrics(t, sample(t * 7))  # ... but the counters move between looks
        j.on_canary(t + 15, None, 15, "no answer within 15 s")
        assert j.hung is None


def test_refused_canaries_make_the_probe_passive_and_never_hung():
    for status in (400, 401, 404, 405, 422):
        j = ProgressJudge(S, 0)
        for t in range(0, 100, 20):
            j.on_metrics(t, sample(1))
            if j.wants_canary():
                j.on_canary(t + 1, status, 0.01, "")
        assert j.hung is None and not j.canary_usable and str(status) in j.unusable_why


def test_busy_answers_and_a_sleeping_engine_are_not_failures():
    j = ProgressJudge(S, 0)
    j.on_metrics(0, sample(5))
    j.on_canary(1, 429, 0.01, "")
    j.on_canary(2, 429, 0.01, "")
    assert j.fails == 0 and j.hung is None
    j.on_canary(20, None, 15, "x")
    assert j.on_metrics(25, sample(5, sleeping=True)) and j.fails == 0


def test_without_counters_the_canary_alone_judges():
    j = ProgressJudge(S, 0)
    assert not j.on_metrics(0, sample(None))
    j.on_canary(15, 503, 0.1, "")
    assert not j.on_metrics(20, None)  # /metrics itself did not answer
    j.on_canary(35, None, 15, "connection refused")
    assert j.hung is not None


def test_the_worst_case_verdict_time_is_the_documented_formula():
    assert S.worst_verdict_s() == 3 * 5 + 2 * 15 == 45


def test_model_kind_from_vllms_arguments():
    assert model_kind(("--port", "8000")) == "generate"
    assert model_kind(("--runner", "pooling")) == "pooling"
    assert model_kind(("--task=embed",)) == "pooling"
    assert model_kind(("--convert", "classify")) == "pooling"
    assert model_kind(("--task", "generate")) == "generate"


def test_parse_metrics_reads_vllms_names_summed_over_engines():
    text = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 120.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 30.0
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 7.0
# TYPE vllm:engine_sleep_state gauge
vllm:engine_sleep_state{engine="0",model_name="m",sleep_state="awake"} 1.0
"""
    s = parse_metrics(text)
    assert (s.progress, s.running, s.waiting, s.finished, s.sleeping) == (150, 3, 4, 7, False)
    assert parse_metrics("process_cpu_seconds_total 3.0\n").progress is None
    assert parse_metrics("{{{ not prometheus").progress is None


# -- the whole run -------------------------------------------------------------------------
def test_a_frozen_engine_is_declared_hung_diagnosed_then_stopped_with_exit_7():
    k = kit(Spec(), grace_s=5.0)
    k.host.server.busy = True
    frozen_at = k.clock.t + 60.0
    k.host.at(60.0, setattr, k.host.server, "hung", True)
    report = k.run()
    assert report.exit_code == 7 and "hung: 2 canary requests in a row failed" in report.reason
    (diag_t, pids), = k.host.diagnosed
    first_signal = min(t for t, _target, _s in k.host.sent)
    assert diag_t <= first_signal and len(pids) >= 3
    assert 0 < diag_t - frozen_at <= S.worst_verdict_s()
    assert "VLLM::EngineCore pid" in report.reason  # the process evidence, as support
    assert report.hang and report.diagnosis
    assert any("hang suspected: 1/2" in m for _t, m in k.notifier.sent)
    assert any(m.startswith("WATCHDOG=1\nSTATUS=engine hung") for _t, m in k.notifier.sent)
    assert report.probe["result"] == "canary failed"


def test_a_busy_engine_with_hanging_canaries_serves_on_until_stopped():
    k = kit(Spec(), grace_s=5.0)
    k.host.server.busy, k.host.server.canary_status = True, None
    k.host.send_supervisor(900.0)
    report = k.run()
    assert report.exit_code == 0 and not k.host.diagnosed
    assert k.host.progress.rounds > 100


def test_an_idle_engine_gets_canaries_and_is_fine():
    k = kit(Spec(), grace_s=5.0)
    k.host.send_supervisor(300.0)
    report = k.run()
    assert report.exit_code == 0 and k.host.server.canaries > 20
    assert report.probe["result"] == "canary ok"
    from vllm_supervisor.lifecycle.report import render_text

    assert "probe       last: canary ok, 10 ms\n" in render_text(report)


@pytest.mark.parametrize("probe", ["health", "off"])
def test_probe_health_or_off_sends_nothing_but_what_it_says(probe):
    k = kit(Spec(), grace_s=5.0, probe=probe)
    k.host.server.hung = True
    k.host.send_supervisor(300.0)
    report = k.run()
    assert report.exit_code == 0 and k.host.progress is None and report.probe is None


def test_a_requested_stop_counts_the_requests_in_flight_and_those_that_finished():
    k = kit(Spec(api_term_delay=1.0), grace_s=5.0)  # vLLM drains for 1 s
    k.host.server.running, k.host.server.waiting, k.host.server.finished = 2, 1, 10

    def drained():
        k.host.server.running, k.host.server.waiting, k.host.server.finished = 0, 0, 13

    k.host.send_supervisor(30.0)
    k.host.at(30.5, drained)
    report = k.run()
    assert report.drain["in_flight"] == 3 and report.drain["finished"] == 3
    assert report.drain["text"] == "3 requests in flight at the stop; 3 finished before vLLM exited"
    assert any("draining 3 requests" in m for _t, m in k.notifier.sent)


def test_sigkill_cutting_a_drain_short_is_said():
    k = kit(Spec(engine_term_delay=None), grace_s=5.0)
    k.host.server.running = 2
    k.host.send_supervisor(30.0)
    report = k.run()
    assert report.exit_code == 4 and report.drain["cut_by_sigkill"] == 2
    assert "SIGKILL cut off up to 2" in report.drain["text"]


def test_a_prefill_that_only_fills_the_kv_cache_is_progress():
    # Real vLLM counts prompt tokens only at the first output token; a chunked prefill
    # shows as KV cache use growing while the counters stand still.
    j = ProgressJudge(S, 0)
    j.on_metrics(0, MetricsSample(100, 1, 3, 0.0, False, kv_usage=0.10))
    assert j.on_metrics(5, MetricsSample(100, 1, 3, 0.0, False, kv_usage=0.12))
    assert not j.on_metrics(10, MetricsSample(100, 1, 3, 0.0, False, kv_usage=0.12))


def test_vllms_shutdown_lines_say_whether_the_drain_finished_or_aborted():
    from vllm_supervisor.lifecycle.probes import ShutdownLog

    log = ShutdownLog()
    log.feed("stdout", b"(EngineCore pid=9) INFO [core.py:1636] [shutdown] EngineCore: start "
                       b"mode=drain timeout=20s\nINFO noise\n")
    assert not log.complete and log.aborted is None and log.draining is None
    log.feed("stdout", b"INFO [shutdown] EngineCore: draining in-flight requests count=6 "
                       b"timeout=40s\n")
    assert log.draining == 6
    log.feed("stdout", b"x\n(EngineCore pid=9) INFO [shutdown] EngineCore: request processing "
                       b"complete; starting resource teardown\n")
    assert log.complete
    aborting = ShutdownLog()
    aborting.feed("stderr", b"INFO [shutdown] EngineCore: aborting in-flight requests count=3\n")
    assert aborting.aborted == 3 and not aborting.complete
