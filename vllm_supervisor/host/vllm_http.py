"""vLLM's HTTP server beyond /health: its /metrics (Prometheus text, read with
prometheus_client's parser), the served model's name (/v1/models), and a canary: the
smallest request the served model accepts (one completion token, or one embedding)."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# vLLM's counters of work done: tokens in, tokens out, engine steps. Any of them moving
# means the engine is alive.
PROGRESS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "vllm:iteration_tokens_total_count")


@dataclass(frozen=True)
class Endpoint:
    """Where vLLM answers, and the API key its /v1 routes want (None: no key)."""

    scheme: str
    host: str
    port: int
    api_key: str | None = None


@dataclass(frozen=True)
class Answer:
    """One HTTP exchange: the status (None when nothing answered) and how long it took."""

    status: int | None
    body: bytes
    error: str  # "" or why nothing answered ("timed out after 15 s", "connection refused")
    latency_s: float


def request(ep: Endpoint, method: str, path: str, obj=None, timeout: float = 5.0) -> Answer:
    """METHOD PATH with OBJ as a JSON body; never raises for network trouble."""
    host = ep.host if ":" not in ep.host else ep.host.strip("[]")
    if ep.scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, ep.port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, ep.port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if obj is not None else {}
    if ep.api_key and path.startswith("/v1/"):
        headers["Authorization"] = f"Bearer {ep.api_key}"
    t0 = time.monotonic()
    try:
        conn.request(method, path, body=json.dumps(obj) if obj is not None else None,
                     headers=headers)
        resp = conn.getresponse()
        return Answer(resp.status, resp.read(4 << 20), "", time.monotonic() - t0)
    except TimeoutError:
        return Answer(None, b"", f"no answer within {timeout:g} s", time.monotonic() - t0)
    except (OSError, http.client.HTTPException) as e:
        why = "connection refused" if isinstance(e, ConnectionRefusedError) else \
            (str(e) or type(e).__name__)
        return Answer(None, b"", why, time.monotonic() - t0)
    finally:
        conn.close()


@dataclass(frozen=True)
class MetricsSample:
    """What vLLM's /metrics says, summed over engines. None: vLLM does not export it
    (with --disable-log-stats its counters are missing)."""

    progress: float | None  # the PROGRESS counters added up
    running: int | None
    waiting: int | None
    finished: float | None  # vllm:request_success_total
    sleeping: bool | None   # vllm:engine_sleep_state{sleep_state="awake"} == 0
    kv_usage: float | None = None  # vllm:kv_cache_usage_perc, summed over engines

    @property
    def signature(self) -> tuple | None:
        """What changes whenever the engine reports a step: the work counters, and the
        gauges it updates on every step even when no token comes out (a chunked prefill
        fills the KV cache chunk by chunk; real vLLM counts its prompt tokens only at the
        first output token). None without counters."""
        if self.progress is None:
            return None
        return (self.progress, self.kv_usage, self.running, self.waiting)


def parse_metrics(text: str) -> MetricsSample:
    """A MetricsSample from Prometheus text; unparsable text gives an empty sample."""
    sums: dict[str, float] = {}
    awake: list[float] = []
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "vllm:engine_sleep_state":
                    if s.labels.get("sleep_state") == "awake":
                        awake.append(s.value)
                elif s.name.startswith("vllm:"):
                    sums[s.name] = sums.get(s.name, 0.0) + s.value
    except (ValueError, TypeError, IndexError):
        return MetricsSample(None, None, None, None, None)
    have = [n for n in PROGRESS if n in sums]

    def count(name: str) -> int | None:
        return int(sums[name]) if name in sums else None

    return MetricsSample(
        progress=sum(sums[n] for n in have) if have else None,
        running=count("vllm:num_requests_running"), waiting=count("vllm:num_requests_waiting"),
        finished=sums.get("vllm:request_success_total"),
        sleeping=(not any(awake)) if awake else None,
        kv_usage=sums.get("vllm:kv_cache_usage_perc"))


def fetch_metrics(ep: Endpoint, timeout: float) -> MetricsSample | None:
    """GET /metrics, parsed; None when vLLM does not answer it with 200."""
    ans = request(ep, "GET", "/metrics", timeout=timeout)
    if ans.status != 200:
        return None
    return parse_metrics(ans.body.decode("utf-8", "replace"))


def served_model(ep: Endpoint, timeout: float) -> str | None:
    """The first model /v1/models lists (vLLM's served name), or None."""
    ans = request(ep, "GET", "/v1/models", timeout=timeout)
    try:
        return str(json.loads(ans.body)["data"][0]["id"]) if ans.status == 200 else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def canary(ep: Endpoint, kind: str, model: str, timeout: float) -> Answer:
    """The smallest real request: one completion token, or one embedding for a pooling
    model."""
    if kind == "pooling":
        return request(ep, "POST", "/v1/embeddings", {"model": model, "input": "ping"},
                       timeout)
    return request(ep, "POST", "/v1/completions",
                   {"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0},
                   timeout)
