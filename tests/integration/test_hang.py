"""The progress probe against the simulated vLLM, whose requests go through its engine and
workers and whose /metrics counts their work: a worker deadlocked behind a healthy
/health, a frozen engine, an engine busy with a long prefill (not hung), a sleeping engine
(not hung), a pooling model, an API key, counters switched off; and the drain."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request

from tests.helpers import cli, http_get, wait_until
from vllm_supervisor.host.vllm_http import parse_metrics

FAST = ("--probe-interval", "0.5", "--probe-timeout", "1", "--probe-failures", "2",
        "--grace", "3")


def _post(port: int, path: str, obj=None, timeout: float = 60, key: str | None = None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(obj).encode() if obj is not None else b""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read() or b"null")


def _engine(run) -> int:
    return run.tree_pids("engine")["engine"]


def test_a_worker_deadlocked_behind_a_healthy_health_is_found_hung(supervise):
    run = supervise(*FAST, vllm_args=("-tp", "2"),
                    env={"FAKE_VLLM_MISBEHAVE": "worker-deadlock", "FAKE_VLLM_HANG_AFTER_S": "1"})
    run.wait_ready()
    run.wait_for("hang suspected", timeout=30)
    assert http_get(run.port)[0] == 200  # /health still says healthy
    assert run.finish(timeout=60) == 7
    rep = run.report()
    assert rep["reason"].startswith("engine died while serving: hung: 2 canary requests"), rep
    titles = [p["title"] for p in rep["hang"]["processes"]]
    assert any(t.startswith("VLLM::Worker_TP1") for t in titles), titles
    assert rep["diagnosis"] and rep["engine_died"].startswith("hung:")
    run.assert_all_gone()


def test_a_frozen_engine_without_counters_is_found_hung_by_the_canary_alone(supervise):
    run = supervise(*FAST, vllm_args=("--disable-log-stats",))
    run.wait_ready()
    os.kill(_engine(run), signal.SIGSTOP)
    assert run.finish(timeout=60) == 7
    rep = run.report()
    assert "hung:" in rep["reason"] and "is stopped (T)" in rep["reason"], rep["reason"]
    run.assert_all_gone()


def test_an_engine_busy_with_a_long_prefill_is_not_hung(supervise):
    # One request holds the engine in prefill for 6 s; canaries wait behind it and time out
    # after 1 s, but the prefill's steps move the counters: suspected, never hung.
    run = supervise(*FAST, env={"FAKE_VLLM_MISBEHAVE": "long-prefill",
                                "FAKE_VLLM_PREFILL_S": "6"})
    run.wait_ready()
    done = []
    t = threading.Thread(target=lambda: done.append(
        _post(run.port, "/v1/completions", {"model": "fake/model", "prompt": "x",
                                            "max_tokens": 2})))
    t.start()
    t.join(60)
    assert done and done[0][0] == 200
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    text = run.stderr()
    assert "hang suspected" in text and "engine hung" not in text, text[-3000:]
    run.assert_all_gone()


def test_a_sleeping_engine_is_not_hung(supervise):
    run = supervise(*FAST, vllm_args=("--enable-sleep-mode",),
                    env={"VLLM_SERVER_DEV_MODE": "1"})
    run.wait_ready()
    assert _post(run.port, "/sleep?level=1")[0] == 200
    wait_until(lambda: run.report_path.exists() or "sleeping" in _status(run), 30,
               "the probe to see the engine asleep")
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    assert "engine hung" not in run.stderr()
    run.assert_all_gone()


def _status(run) -> str:
    out = cli("status", "--json", env=dict(os.environ, VLLM_SUPERVISE_STATE_DIR=str(
        run.tmp / "state"), VLLM_SUPERVISE_GPU_PROBE="none"))
    rows = json.loads(out.stdout)["instances"] if out.returncode == 0 else []
    return " ".join(str(r.get("probe")) for r in rows)


def test_status_shows_the_probes_last_result_and_latency(supervise):
    run = supervise(*FAST)
    run.wait_ready()
    wait_until(lambda: "canary ok" in _status(run), 30, "a canary in `status`")
    assert " ms" in _status(run)
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_a_pooling_model_gets_an_embedding_canary_and_a_frozen_one_is_hung(supervise):
    run = supervise(*FAST, vllm_args=("--runner", "pooling"))
    run.wait_ready()
    wait_until(lambda: "canary ok" in _status(run), 30, "an embedding canary")
    os.kill(_engine(run), signal.SIGSTOP)
    assert run.finish(timeout=60) == 7
    assert "hung:" in run.report()["reason"]
    run.assert_all_gone()


def test_the_api_key_goes_with_the_canary(supervise):
    run = supervise(*FAST, vllm_args=("--api-key", "sekrit"))
    run.wait_ready()
    wait_until(lambda: "canary ok" in _status(run), 30, "a canary with the key")
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    assert "refused" not in _status(run)


def test_the_drain_is_counted_in_the_report(supervise):
    run = supervise("--grace", "20", vllm_args=("--shutdown-timeout", "10"),
                    env={"FAKE_VLLM_STEP_S": "0.02"})
    run.wait_ready()
    results = []
    threads = [threading.Thread(target=lambda: results.append(_post(
        run.port, "/v1/completions", {"model": "fake/model", "prompt": "x",
                                      "max_tokens": 150}))) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: _running(run.port) >= 3, 30, "three requests running")
    run.signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert run.finish() == 0 and len(results) == 3
    drain = run.report()["drain"]
    assert drain["in_flight"] == 3 and drain["finished"] == 3, drain
    assert "draining 3 requests" in run.stderr()
    run.assert_all_gone()


def _running(port: int) -> int:
    return parse_metrics(http_get(port, "/metrics")[1].decode()).running or 0
