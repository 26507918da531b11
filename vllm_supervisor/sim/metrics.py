"""The simulated API server's GET /metrics: a few of vLLM's Prometheus metrics, with its
names, help texts, labels and number format (v1/metrics/loggers.py PrometheusStatLogger,
written out as prometheus_client's generate_latest does, ``_created`` samples included).

The values live in the API server, as in vLLM, and move only when the engine pushes the
stats of a step (or of a batch of abort outputs), and when a sleep or wake-up call returns.
An engine that is stopped or stuck pushes nothing: /metrics keeps answering with the last
numbers.

--disable-log-stats: vLLM then creates no stat logger at all (v1/engine/async_llm.py:
``logger_manager`` stays None without log_stats) and its scheduler makes no stats, so none
of the ``vllm:`` metrics exist; /metrics still answers 200 with the process-level ones
(here just ``python_info``).
"""

from __future__ import annotations

import platform
import threading
import time

# v1/metrics/buckets.py ITERATION_TOKENS_BUCKETS
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# v1/engine/__init__.py FINISH_REASON_STRINGS: vLLM makes every label up front
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"  # prometheus_client 0.26's latest


def go_float(value: float) -> str:
    """A number as prometheus_client writes it (its floatToGoString)."""
    d = float(value)
    if d == float("inf"):
        return "+Inf"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _labels(**labels: str) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    """vLLM's per-engine metrics for engine 0, fed by the engine's stats."""

    def __init__(self, model_name: str, enabled: bool):
        self.model, self.enabled = model_name, enabled
        self.lock = threading.Lock()
        self.created = time.time()
        self.running = self.waiting = 0
        self.kv = 0.0
        self.sleep_state = {"awake": 1, "weights_offloaded": 0, "discard_all": 0}
        self.prompt = self.generation = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.buckets = [0] * len(ITERATION_BUCKETS)
        self.steps = self.step_tokens = 0

    def record(self, stats: dict) -> None:
        """One push of the engine: scheduler gauges and/or an iteration's counts."""
        with self.lock:
            if sched := stats.get("sched"):
                self.running, self.waiting = sched["running"], sched["waiting"]
                self.kv = sched["kv"]
            if it := stats.get("it"):
                self.prompt += it["prompt"]
                self.generation += it["gen"]
                for reason in it["finished"]:
                    self.success[reason] += 1
                self.steps += 1
                self.step_tokens += it["tokens"]
                for i, bound in enumerate(ITERATION_BUCKETS):
                    if it["tokens"] <= bound:
                        self.buckets[i] += 1

    def record_sleep_state(self, sleeping: bool, level: int) -> None:
        """vLLM's record_sleep_state, after a sleep or a full wake-up."""
        with self.lock:
            self.sleep_state = {"awake": int(not sleeping),
                                "weights_offloaded": int(sleeping and level == 1),
                                "discard_all": int(sleeping and level == 2)}

    def render(self) -> str:
        """The Prometheus text exposition."""
        py = platform.python_version_tuple()
        out = ["# HELP python_info Python platform information\n",
               "# TYPE python_info gauge\n",
               "python_info" + _labels(implementation=platform.python_implementation(),
                                       major=py[0], minor=py[1], patchlevel=py[2],
                                       version=platform.python_version()) + " 1.0\n"]
        if not self.enabled:
            return "".join(out)
        with self.lock:
            self._gauges(out)
            self._counters(out)
            self._histogram(out)
        return "".join(out)

    def _family(self, out: list[str], name: str, kind: str, doc: str,
                samples: list[tuple[str, dict, float]]) -> None:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        for sample, extra, value in samples:
            out.append(f"{sample}{_labels(engine='0', model_name=self.model, **extra)} "
                       f"{go_float(value)}\n")

    def _gauges(self, out: list[str]) -> None:
        self._family(out, "vllm:num_requests_running", "gauge",
                     "Number of requests in model execution batches.",
                     [("vllm:num_requests_running", {}, self.running)])
        self._family(out, "vllm:num_requests_waiting", "gauge",
                     "Number of requests waiting to be processed.",
                     [("vllm:num_requests_waiting", {}, self.waiting)])
        self._family(out, "vllm:engine_sleep_state", "gauge",
                     "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means "
                     "engine is awake; weights_offloaded = 1 means sleep level 1; "
                     "discard_all = 1 means sleep level 2.",
                     [("vllm:engine_sleep_state", {"sleep_state": s}, v)
                      for s, v in self.sleep_state.items()])
        self._family(out, "vllm:kv_cache_usage_perc", "gauge",
                     "KV-cache usage. 1 means 100 percent usage.",
                     [("vllm:kv_cache_usage_perc", {}, self.kv)])

    def _counter(self, out: list[str], name: str, doc: str,
                 values: list[tuple[dict, float]]) -> None:
        self._family(out, f"{name}_total", "counter", doc,
                     [(f"{name}_total", extra, v) for extra, v in values])
        self._family(out, f"{name}_created", "gauge", doc,
                     [(f"{name}_created", extra, self.created) for extra, _ in values])

    def _counters(self, out: list[str]) -> None:
        self._counter(out, "vllm:prompt_tokens", "Number of prefill tokens processed.",
                      [({}, self.prompt)])
        self._counter(out, "vllm:generation_tokens", "Number of generation tokens processed.",
                      [({}, self.generation)])
        self._counter(out, "vllm:request_success", "Count of successfully processed requests.",
                      [({"finished_reason": r}, n) for r, n in self.success.items()])

    def _histogram(self, out: list[str]) -> None:
        name, doc = "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step."
        bounds = [*ITERATION_BUCKETS, float("inf")]
        self._family(out, name, "histogram", doc, [
            *((f"{name}_bucket", {"le": go_float(b)}, n)
              for b, n in zip(bounds, [*self.buckets, self.steps], strict=True)),
            (f"{name}_count", {}, self.steps), (f"{name}_sum", {}, self.step_tokens)])
        self._family(out, f"{name}_created", "gauge", doc,
                     [(f"{name}_created", {}, self.created)])
