"""The simulated vLLM serving: requests through the engine's steps, /metrics, the ways an
engine stops serving while /health stays 200 (SIGSTOP, worker-deadlock, long-prefill),
sleep mode, pooling models, the API key, --disable-log-stats, and the drain on SIGTERM.
Real processes and signals; the `sim` fixture is in tests/sim/conftest.py."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from tests.helpers import alive, signal_ignored, wait_until
from vllm_supervisor.host.proctree import read_proc
from vllm_supervisor.sim.batching import CHUNK_TOKENS
from vllm_supervisor.sim.config import UsageError, parse_args

pytestmark = pytest.mark.timeout(120)

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
SUCCESS, STEPS = "vllm:request_success_total", "vllm:iteration_tokens_total_count"
PROMPT, GENERATED = "vllm:prompt_tokens_total", "vllm:generation_tokens_total"


def in_thread(fn, *args, **kwargs) -> dict:
    """Run FN in a thread; the returned dict gets "result" (and the thread) when it ends."""
    box: dict = {}

    def run():
        box["result"] = fn(*args, **kwargs)
    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


def vllm_lines(s) -> list[str]:
    """The vllm: sample lines of /metrics."""
    return [x for x in s.get("/metrics")[1].decode().splitlines() if x.startswith("vllm:")]


def test_concurrent_requests_are_batched_into_shared_steps(sim):
    s = sim(env={"FAKE_VLLM_STEP_S": "0.1"})
    s.wait_ready()
    assert s.metric(STEPS) == 0 and s.metric(RUNNING) == 0
    boxes = [in_thread(s.complete, max_tokens=5) for _ in range(4)]
    wait_until(lambda: s.metric(RUNNING) == 4, 5, "four requests in one batch")
    for box in boxes:
        box["thread"].join(10)
        status, body = box["result"]
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7,
                                 "prompt_tokens_details": None}
    wait_until(lambda: s.metric(RUNNING) == 0, 5, "the batch to drain")
    assert s.metric(GENERATED) == 20 and s.metric(PROMPT) == 8
    assert s.metric(SUCCESS, finished_reason="length") == 4
    assert 5 <= s.metric(STEPS) <= 8  # 4 x 5 tokens in shared steps, not 20 steps
    assert s.metric("vllm:iteration_tokens_total_sum") == 28


def test_sigstopped_engine_health_200_requests_hang_metrics_frozen(sim):
    s = sim()
    s.wait_ready()
    assert s.complete()[0] == 200
    engine = s.pids()["engine"]
    frozen = vllm_lines(s)
    os.kill(engine, signal.SIGSTOP)
    assert s.complete(timeout=1.0) == (None, None)  # no answer: it hangs
    assert s.get("/health")[0] == 200
    assert vllm_lines(s) == frozen
    os.kill(engine, signal.SIGCONT)  # the request it held is served after all
    wait_until(lambda: s.metric(SUCCESS, finished_reason="length") == 2, 5, "the held request")


def test_worker_deadlock_blocks_the_engine_in_its_step(sim):
    s = sim(tp=2, env={"FAKE_VLLM_MISBEHAVE": "worker-deadlock",
                       "FAKE_VLLM_HANG_AFTER_S": "0.5"})
    s.wait_ready()
    tp0, tp1 = s.pids()["workers"]
    wait_until(lambda: "stops answering the engine" in s.err(), 5, "the deadlock")
    frozen = vllm_lines(s)
    assert s.complete(timeout=1.0) == (None, None)
    assert s.get("/health")[0] == 200 and vllm_lines(s) == frozen
    assert read_proc(tp1).state == "S" and signal_ignored(tp1, signal.SIGTERM)
    assert alive(tp0) and alive(s.pids()["engine"])


def test_worker_deadlock_ends_in_vllms_execute_model_timeout(sim):
    s = sim(tp=2, env={"FAKE_VLLM_MISBEHAVE": "worker-deadlock",
                       "FAKE_VLLM_HANG_AFTER_S": "0", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "1"})
    s.wait_ready()
    engine, (_, tp1) = s.pids()["engine"], s.pids()["workers"]
    status, body = s.complete(timeout=20)  # timeout, then the stuck worker's 5 s to stop
    assert status == 500 and "EngineCore encountered an issue" in body["error"]["message"]
    assert "RPC call to execute_model timed out." in s.err()
    wait_until(lambda: s.get("/health")[0] == 503, 5, "/health 503")
    assert not alive(engine) and not alive(tp1)


@pytest.mark.parametrize("counting", ["vllm", "chunks"])
def test_long_prefill_makes_others_wait(sim, counting):
    s = sim(env={"FAKE_VLLM_MISBEHAVE": "long-prefill", "FAKE_VLLM_PREFILL_S": "2",
                 "FAKE_VLLM_PREFILL_METRICS": counting})
    s.wait_ready()
    first = in_thread(s.complete, max_tokens=2, timeout=20)
    wait_until(lambda: s.metric(RUNNING) == 1, 5, "the first prefill")
    second = in_thread(s.complete, max_tokens=2, timeout=20)
    wait_until(lambda: s.metric(WAITING) == 1, 5, "the second request to wait")
    kv = s.metric("vllm:kv_cache_usage_perc")
    wait_until(lambda: s.metric("vllm:kv_cache_usage_perc") > kv, 5, "the prefill's KV cache")
    if counting == "vllm":  # vLLM counts prompt tokens and steps only from outputs
        assert s.metric(PROMPT) == 0 and s.metric(STEPS) == 0
    else:
        wait_until(lambda: 0 < s.metric(PROMPT) < 8 * CHUNK_TOKENS and s.metric(STEPS) > 1, 5,
                   "chunk-by-chunk counts")
    assert s.metric(WAITING) == 1 and "result" not in second
    for box in (first, second):
        box["thread"].join(20)
        status, body = box["result"]
        assert status == 200 and body["usage"]["prompt_tokens"] == 8 * CHUNK_TOKENS
    assert s.metric(PROMPT) == 16 * CHUNK_TOKENS and s.metric(GENERATED) == 4


def test_sleep_aborts_requests_queues_new_ones_until_wake_up(sim):
    s = sim("--enable-sleep-mode", env={"VLLM_SERVER_DEV_MODE": "1"})
    s.wait_ready()
    assert json.loads(s.get("/is_sleeping")[1]) == {"is_sleeping": False}
    running = in_thread(s.complete, max_tokens=100000, timeout=20)
    wait_until(lambda: s.metric(RUNNING) == 1, 5, "a running request")
    status, body = s.post("/sleep?level=1")
    assert (status, json.loads(body)) == (200, {"status": "sleeping", "level": 1})
    running["thread"].join(5)
    status, body = running["result"]  # mode=abort: vLLM ends it, finish reason "abort"
    assert status == 200 and body["choices"][0]["finish_reason"] == "abort"
    assert s.metric(SUCCESS, finished_reason="abort") == 1
    assert [s.metric("vllm:engine_sleep_state", sleep_state=x)
            for x in ("awake", "weights_offloaded", "discard_all")] == [0, 1, 0]
    assert json.loads(s.get("/is_sleeping")[1]) == {"is_sleeping": True}
    assert s.complete(timeout=1.0) == (None, None)  # held until the wake-up
    status, body = s.post("/wake_up")
    assert (status, json.loads(body)) == (200, {"status": "awake", "tags": None})
    wait_until(lambda: s.metric(SUCCESS, finished_reason="length") == 1, 5, "the held request")
    assert s.metric("vllm:engine_sleep_state", sleep_state="awake") == 1
    assert s.post("/sleep?level=2")[0] == 200
    assert s.metric("vllm:engine_sleep_state", sleep_state="discard_all") == 1
    assert s.post("/sleep?level=3")[0] == 400
    assert "Sleep mode freed" in s.out()


@pytest.mark.parametrize("mode", ["wait", "keep"])
def test_sleep_mode_wait_drains_first_keep_holds_until_wake_up(sim, mode):
    s = sim(env={"VLLM_SERVER_DEV_MODE": "1", "FAKE_VLLM_STEP_S": "0.05"})
    s.wait_ready()
    box = in_thread(s.complete, max_tokens=40, timeout=20)
    wait_until(lambda: s.metric(RUNNING) == 1, 5, "a running request")
    assert s.post(f"/sleep?level=1&mode={mode}", timeout=10)[0] == 200
    if mode == "wait":  # the answer came once the request had run to its end
        assert s.metric(SUCCESS, finished_reason="length") == 1
    else:  # kept in the engine, not stepped: two round trips through the engine, no token
        generated = s.metric(GENERATED)
        for _ in range(2):
            assert json.loads(s.get("/is_sleeping")[1]) == {"is_sleeping": True}
        assert s.metric(GENERATED) == generated and "result" not in box
        assert s.post("/wake_up")[0] == 200
    box["thread"].join(10)
    status, body = box["result"]
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"


def test_sleep_routes_need_dev_mode(sim):
    s = sim("--enable-sleep-mode")
    s.wait_ready()
    assert s.post("/sleep")[0] == 404 and s.get("/is_sleeping")[0] == 404


@pytest.mark.parametrize("args", [("--runner", "pooling"), ("--task", "embed"),
                                  ("--convert=embed",)])
def test_pooling_model_serves_embeddings_not_completions(sim, args):
    s = sim(*args)
    s.wait_ready()
    status, body = s.post("/v1/embeddings", {"model": "m", "input": ["a b", "c"]})
    body = json.loads(body)
    assert status == 200 and body["object"] == "list" and len(body["data"]) == 2
    assert body["usage"]["prompt_tokens"] == 3 and body["data"][0]["embedding"]
    assert s.post("/v1/completions", {"prompt": "x"}) == (404, b'{"detail":"Not Found"}')
    assert s.metric(SUCCESS, finished_reason="stop") == 2 and s.metric(GENERATED) == 0


@pytest.mark.parametrize("how", ["option", "env"])
def test_api_key_guards_v1_only(sim, how):
    s = sim(*(("--api-key", "k1") if how == "option" else ()),
            env={"VLLM_API_KEY": "k1"} if how == "env" else {})
    s.wait_ready()
    assert s.get("/v1/models") == (401, b'{"error":"Unauthorized"}')
    assert s.post("/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer k2"}
                  )[0] == 401
    status, _ = s.post("/v1/completions", {"prompt": "x", "max_tokens": 1},
                       headers={"Authorization": "Bearer k1"})
    assert status == 200
    assert s.get("/health")[0] == 200 and s.get("/metrics")[0] == 200


def test_disable_log_stats_exports_no_vllm_metrics(sim):
    s = sim("--disable-log-stats")
    s.wait_ready()
    assert s.complete()[0] == 200
    status, body = s.get("/metrics")
    assert status == 200 and b"python_info" in body and b"vllm:" not in body


def test_model_name_served_name_and_errors(sim):
    s = sim("--served-model-name", "alias", "other")
    s.wait_ready()
    assert [m["id"] for m in json.loads(s.get("/v1/models")[1])["data"]] == ["alias", "other"]
    status, body = s.complete(model="m")
    assert status == 404 and body["error"]["type"] == "NotFoundError"
    assert s.complete(model="other")[0] == 200
    assert 'model_name="alias"' in s.get("/metrics")[1].decode()
    assert s.post("/v1/completions", {"max_tokens": 1})[0] == 400
    assert s.complete(max_tokens=0)[0] == 400
    os.kill(s.pids()["engine"], signal.SIGKILL)
    status, body = s.complete()
    assert status == 500 and body["error"]["type"] == "InternalServerError"


def test_drain_finishes_requests_in_flight_and_aborts_new_ones(sim):
    s = sim("--shutdown-timeout", "20", env={"FAKE_VLLM_STEP_S": "0.05"})
    s.wait_ready()
    short = [in_thread(s.complete, max_tokens=10, timeout=20) for _ in range(2)]
    long = in_thread(s.complete, max_tokens=60, timeout=20)
    wait_until(lambda: s.metric(RUNNING) == 3, 5, "three requests in flight")
    os.kill(s.pid, signal.SIGTERM)
    wait_until(lambda: "draining in-flight requests count=3" in s.out(), 5, "the drain")
    assert s.get("/health")[0] == 200
    status, body = s.complete(timeout=5)  # a new request: vLLM's engine rejects it at once
    assert status == 200 and body["choices"][0]["finish_reason"] == "abort"
    assert body["usage"]["completion_tokens"] == 0
    wait_until(lambda: s.metric(SUCCESS, finished_reason="length") == 2, 5, "the short ones")
    assert s.metric(SUCCESS, finished_reason="abort") == 1 and "result" not in long
    assert s.proc.wait(20) == 0
    for box in (*short, long):
        box["thread"].join(5)
        status, body = box["result"]
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    out = s.out()
    assert "[shutdown] API server: stopping engine client mode=drain timeout=20s" in out
    assert out.index("[shutdown] EngineCore: request processing complete") < \
        out.index("[shutdown] API server: engine client stopped") < \
        out.index("INFO:     Shutting down")


def test_abort_mode_fails_requests_in_flight(sim):
    s = sim()
    s.wait_ready()
    box = in_thread(s.complete, max_tokens=100000, timeout=10)
    wait_until(lambda: s.metric(RUNNING) == 1, 5, "a running request")
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0
    box["thread"].join(5)
    status, body = box["result"]
    assert status != 200  # a 500 (EngineDeadError) or a broken connection
    assert status is None or "EngineCore encountered an issue" in body["error"]["message"]
    assert "[shutdown] EngineCore: aborting in-flight requests count=1" in s.out()


def test_vllm_options_the_simulation_reads():
    cfg = parse_args(["serve", "--enable-sleep-mode", "m", "--api-key", "a", "b",
                      "--served-model-name=x", "--disable-log-stats", "--no-enable-sleep-mode",
                      "--runner", "pooling", "--max-num-seqs", "4"])
    assert (cfg.model, cfg.api_keys, cfg.served_name, cfg.disable_log_stats) == \
        ("m", ["a", "b"], "x", True)
    assert not cfg.enable_sleep_mode and cfg.pooling and cfg.max_num_seqs == 4
    cfg.fill_from_env({"VLLM_API_KEY": "env", "VLLM_SERVER_DEV_MODE": "1"})
    assert cfg.api_keys == ["a", "b"] and cfg.dev_mode  # --api-key wins, as in vLLM
    assert not parse_args(["serve", "m", "--task", "generate"]).pooling
    with pytest.raises(UsageError):
        parse_args(["serve", "m", "--api-key"])
