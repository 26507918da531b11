"""The Prometheus exposition (lifecycle/metrics.py) for each lifecycle state and each way a
run ends, driven through the fake host and clock: what a scrape would read at that moment."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from fakehost import FakeClock, FakeHost, Spec
from lifecycle_kit import RecordingUi, kit
from prometheus_client import generate_latest

from tests.helpers import exposition, states_on
from vllm_supervisor import __version__
from vllm_supervisor.lifecycle.config import Config
from vllm_supervisor.lifecycle.metrics import GPU_METRICS, STATES, RunMetrics, release_seconds
from vllm_supervisor.lifecycle.progress import ProbeResult
from vllm_supervisor.lifecycle.restart import run_with_restarts

MIB = 1 << 20


def scrape(metrics: RunMetrics) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, parsed back from the text exposition."""
    return exposition(generate_latest(metrics.registry).decode())


def value(samples: dict, metric: str, /, **labels) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


class Scraper:
    """A lifecycle listener (after the metrics) that scrapes at every change of state."""

    def __init__(self, metrics: RunMetrics):
        self.metrics = metrics
        self.seen: list[tuple[str, dict]] = [("admitting", scrape(metrics))]

    def on_transition(self, old, new):
        self.seen.append((new.value, scrape(self.metrics)))


def run(spec=None, **kw):
    metrics = RunMetrics("llama", "fake/model", "http://127.0.0.1:8000")
    scraper = Scraper(metrics)
    k = kit(spec, metrics=metrics, listeners=(scraper,), **kw)
    scraper.seen = [("admitting", scrape(metrics))]  # the kit's run begins: admitting
    return k, metrics, scraper


def test_the_state_set_shows_exactly_the_state_entered_at_every_change():
    k, _, scraper = run(Spec(engine_term_delay=None), gpus=2, grace_s=3.0)
    k.host.send_supervisor(2.0)
    k.run()
    states = [s for s, _ in scraper.seen]
    assert states == ["admitting", "launching", "starting", "ready", "stopping", "killing",
                      "awaiting-vram", "done"]
    for entered, samples in scraper.seen:
        assert states_on(samples) == [entered], entered
        shown = {dict(k[1])["vllm_supervise_state"] for k in samples
                 if k[0] == "vllm_supervise_state"}
        assert shown == set(STATES)  # every state present, 0 but one
        assert value(samples, "vllm_supervise_instance_info", name="llama",
                     model="fake/model", url="http://127.0.0.1:8000",
                     version=__version__) == 1
    launched = dict(scraper.seen)["launching"]
    assert value(launched, "vllm_supervise_launches_total") == 1
    assert math.isnan(value(dict(scraper.seen)["starting"], "vllm_supervise_time_to_ready_seconds"))


def test_ready_time_stop_duration_and_release_time_are_the_reports_figures():
    k, metrics, scraper = run(Spec(worker_vram_mib=30000, vram_release_s=0.5), gpus=2)
    k.host.send_supervisor(3.0)
    r = k.run()
    after = scrape(metrics)
    assert r.exit_code == 0 and r.vram.status == "released"
    assert value(after, "vllm_supervise_time_to_ready_seconds") == pytest.approx(
        r.time_to_ready_s, abs=1e-3)
    assert value(after, "vllm_supervise_last_stop_duration_seconds") == r.stop_duration_s
    assert value(after, "vllm_supervise_last_stop_escalated") == 0
    assert value(after, "vllm_supervise_stops_total") == 1
    assert value(after, "vllm_supervise_stop_escalations_total") == 0
    assert value(after, "vllm_supervise_last_vram_verdict",
                 vllm_supervise_last_vram_verdict="released") == 1
    # The memory comes back 0.5 s after the workers died, which was at the stop signal's
    # 0.05 s + their own 0.05 s teardown.
    assert value(after, "vllm_supervise_last_vram_release_seconds") == pytest.approx(0.6, abs=0.05)
    assert value(after, "vllm_supervise_last_stop_timestamp_seconds") == r.vram.verdict_wall
    assert value(after, "vllm_supervise_tree_processes") == 0
    ready = dict(scraper.seen)["ready"]
    assert value(ready, "vllm_supervise_tree_processes") == 4  # api, engine, 2 workers
    assert value(ready, "vllm_supervise_tree_resident_memory_bytes") > 0


def test_an_escalated_stop_is_counted_and_its_release_timed_from_the_sigkill():
    k, metrics, _ = run(Spec(engine_term_delay=None, worker_vram_mib=1000,
                             vram_release_s=0.3), gpus=2, grace_s=4.0)
    k.host.send_supervisor(2.0)
    r = k.run()
    after = scrape(metrics)
    assert r.exit_code == 4 and r.escalated
    assert value(after, "vllm_supervise_last_stop_escalated") == 1
    assert value(after, "vllm_supervise_stop_escalations_total") == 1
    assert value(after, "vllm_supervise_last_vram_release_seconds") == pytest.approx(0.3, abs=0.05)
    assert release_seconds(r) == value(after, "vllm_supervise_last_vram_release_seconds")


def test_vram_not_released_leaves_no_release_time_and_says_held():
    k, metrics, _ = run(Spec(worker_vram_mib=30000, vram_release_s=1e9), gpus=2,
                        vram_timeout_s=2.0)
    k.host.send_supervisor(2.0)
    assert k.run().exit_code == 6
    after = scrape(metrics)
    assert value(after, "vllm_supervise_last_vram_verdict",
                 vllm_supervise_last_vram_verdict="held") == 1
    assert math.isnan(value(after, "vllm_supervise_last_vram_release_seconds"))


def _log_death(k) -> None:
    line = b"ERROR [core_client.py:1] Engine core proc EngineCore_DP0 died unexpectedly\n"
    k.host.at(3.0, k.sup.classifier.feed, "stderr", line)
    k.host.at(3.0, k.host._wake)


def _hang(k) -> None:
    k.host.server.busy = True
    k.host.at(60.0, setattr, k.host.server, "hung", True)


@pytest.mark.parametrize("reason, script", [
    ("engine-gone", lambda k: k.host.exit_at(3.0, 101, code=1)),
    ("health", lambda k: k.host.unhealthy_at(3.0)),
    ("exit", lambda k: k.host.exit_at(3.0, 100, code=1)),
    ("log", _log_death),
    ("hung", _hang),
])
def test_engine_deaths_are_counted_by_how_they_were_found(reason, script):
    k, metrics, _ = run()
    script(k)
    r = k.run()
    after = scrape(metrics)
    assert r.engine_death_reason == reason
    deaths = {dict(k[1])["reason"]: v for k, v in after.items()
              if k[0] == "vllm_supervise_engine_deaths_total"}
    assert deaths == {"exit": 0, "engine-gone": 0, "health": 0, "hung": 0, "log": 0} | {reason: 1}
    assert value(after, "vllm_supervise_start_failures_total") == 0


def test_a_start_that_fails_is_a_start_failure_not_an_engine_death():
    k, metrics, _ = run(Spec(ready_after=None))
    k.host.exit_at(2.0, 100, code=1)
    r = k.run()
    after = scrape(metrics)
    assert r.exit_code == 3 and r.engine_death_reason is None
    assert value(after, "vllm_supervise_start_failures_total") == 1
    assert value(after, "vllm_supervise_engine_deaths_total", reason="exit") == 0


def test_restarts_are_counted_by_the_reason_the_previous_run_ended_and_shown_as_restarting():
    clock, ui = FakeClock(), RecordingUi()
    host = FakeHost(clock)
    metrics = RunMetrics("llama", "fake/model")
    states = []

    def once():
        states.append(states_on(scrape(metrics)))  # between runs: restarting
        k = kit(metrics=metrics)
        k.host.exit_at(2.0, 101 if len(states) == 1 else 100, code=1)
        return k.run()

    cfg = Config(model="m", vllm_args=(), vllm_cmd=("vllm",), grace_s=5.0,
                 restart="on-failure", max_restarts=2)
    run_with_restarts(cfg, once, ui, host, clock, metrics)
    after = scrape(metrics)
    assert states == [["admitting"], ["restarting"], ["restarting"]]
    assert value(after, "vllm_supervise_restarts_total", reason="engine-gone") == 1
    assert value(after, "vllm_supervise_restarts_total", reason="exit") == 1
    assert value(after, "vllm_supervise_launches_total") == 3
    assert states_on(after) == ["done"]


def test_per_gpu_memory_of_the_tree_and_the_baseline_with_uuid_and_index_labels():
    k, _, scraper = run(Spec(worker_vram_mib=1000), gpus=2)
    k.host.send_supervisor(3.0)
    k.run()
    ready = dict(scraper.seen)["ready"]
    for i in (0, 1):
        gpu = {"uuid": f"GPU-fake-{i}", "index": str(i)}
        assert value(ready, "vllm_supervise_gpu_memory_baseline_bytes", **gpu) == 600 * MIB
        assert value(ready, "vllm_supervise_gpu_memory_used_bytes", **gpu) == 1600 * MIB
        assert value(ready, "vllm_supervise_gpu_memory_tree_bytes", **gpu) == 1000 * MIB
        assert value(ready, "vllm_supervise_gpu_memory_total_bytes", **gpu) == 81559 * MIB
    done = dict(scraper.seen)["done"]
    assert value(done, "vllm_supervise_gpu_memory_tree_bytes", uuid="GPU-fake-0",
                 index="0") == 0


def test_no_gpu_probe_means_no_gpu_series_at_all():
    k, metrics, _ = run()
    k.host.send_supervisor(2.0)
    k.run()
    assert not [key for key in scrape(metrics) if key[0].startswith("vllm_supervise_gpu_")]


@pytest.mark.parametrize("result, latency, fails, shown", [
    ("canary ok", 0.012, 0, "canary-ok"),
    ("canary failed", 15.0, 1, "canary-failed"),
    ("progress", None, 0, "progress"),
    ("sleeping", None, 0, "sleeping"),
])
def test_the_probe_result_latency_and_failed_canaries(result, latency, fails, shown):
    metrics = RunMetrics("llama", "m")
    metrics.probe(ProbeResult(result, latency, 10.0), fails)
    after = scrape(metrics)
    assert value(after, "vllm_supervise_probe_last_result",
                 vllm_supervise_probe_last_result=shown) == 1
    got = value(after, "vllm_supervise_probe_last_latency_seconds")
    assert (math.isnan(got) if latency is None else got == latency)
    assert value(after, "vllm_supervise_probe_failed_canaries") == fails


def test_docs_metrics_md_lists_every_metric_and_nothing_that_is_not_exported():
    k, metrics, _ = run(Spec(worker_vram_mib=1000), gpus=2)
    k.host.send_supervisor(2.0)
    k.run()
    exported = {name for name, _ in scrape(metrics)} | {f"vllm_supervise_gpu_{g}"
                                                         for g in GPU_METRICS}
    doc = (Path(__file__).parents[2] / "docs/metrics.md").read_text()
    documented = set(re.findall(r"`(vllm_supervise_[a-z_]+)`", doc))
    assert exported - documented == set(), "exported but not in docs/metrics.md"
    assert documented - exported == set(), "in docs/metrics.md but not exported"
