"""The simulated engine's scheduler: which requests run in a step, what a step produces,
and the stats the engine pushes to the API server after it. Pure state, no I/O.

Like vLLM's v1 scheduler, every running request advances in every step (continuous
batching, at most ``--max-num-seqs`` running); a request's prefill and its first token
come in one step, then one token per step until ``max_tokens`` (finish reason "length").
A pooling request ends with its prefill (finish reason "stop", no generated token).

long-prefill: every request's prompt is ``chunks`` x CHUNK_TOKENS tokens long, computed
one chunk per step (a step of ``FAKE_VLLM_PREFILL_S / chunks`` s, about CHUNK_S), and one
prefill holds the step's whole token budget, so waiting requests are not admitted until it
is done; running requests keep decoding meanwhile. What /metrics shows during it follows
vLLM (FAKE_VLLM_PREFILL_METRICS=vllm, the default): the gauges move with every step, but a
step that finishes no prefill and makes no token produces no output, and vLLM's API server
counts tokens and steps only from outputs (v1/engine/async_llm.py output_handler: no
IterationStats without outputs; v1/metrics/stats.py counts prompt tokens at the first
token). So ``vllm:prompt_tokens_total`` and ``vllm:iteration_tokens_total_count`` stand
still until the prefill ends, then jump; ``vllm:kv_cache_usage_perc`` grows chunk by
chunk. FAKE_VLLM_PREFILL_METRICS=chunks instead counts every chunk's tokens and every
step, which vLLM does not do.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

CHUNK_TOKENS = 2048  # prompt tokens computed per prefill step (long-prefill)
CHUNK_S = 0.25  # about how long one such step takes
KV_CAPACITY = 1 << 20  # tokens the simulated KV cache holds (vllm:kv_cache_usage_perc)


@dataclass
class Req:
    """One request inside the engine."""

    rid: int
    kind: str  # "generate" or "embed"
    prompt: int  # prompt tokens
    max_tokens: int
    chunks_left: int = 1  # prefill steps still to run (the last one also makes token 1)
    computed: int = 0  # prompt tokens in the KV cache so far
    done: int = 0  # tokens generated


@dataclass
class Finished:
    """A request that left the engine, and why."""

    req: Req
    reason: str  # "length", "stop" or "abort"


class Scheduler:
    """Waiting and running requests, advanced one step at a time."""

    def __init__(self, cfg):
        self.max_seqs = cfg.max_num_seqs
        self.long = cfg.has("long-prefill")
        self.chunks = max(1, round(cfg.prefill_s / CHUNK_S))
        self.chunk_s = cfg.prefill_s / self.chunks
        self.step_s = cfg.step_s
        self.per_chunk = cfg.prefill_metrics == "chunks"
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.paused: str | None = None  # "new": admit nothing new; "all": no steps at all

    def add(self, rid: int, kind: str, prompt: int, max_tokens: int) -> None:
        """Queue a new request."""
        if self.long:
            req = Req(rid, kind, self.chunks * CHUNK_TOKENS, max_tokens, self.chunks)
        else:
            req = Req(rid, kind, prompt, max_tokens)
        self.waiting.append(req)

    def unfinished(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.running)

    def plan(self) -> float | None:
        """Admit what may run now; this step's duration, or None when no step is due."""
        if self.paused == "all":
            return None
        if self.paused is None:
            while self.waiting and len(self.running) < self.max_seqs and not (
                    self.long and any(r.chunks_left for r in self.running)):
                self.running.append(self.waiting.popleft())
        if not self.running:
            return None
        chunking = self.long and any(r.chunks_left for r in self.running)
        return self.chunk_s if chunking else self.step_s

    def finish_step(self, log_stats: bool) -> tuple[list[Finished], dict | None]:
        """Advance every running request by the step just done; what finished, and the
        stats vLLM's scheduler and output processor would report (None: no stats)."""
        finished: list[Finished] = []
        prompt = gen = outputs = chunk_tokens = 0
        for req in list(self.running):
            if req.chunks_left:
                step_tokens = req.prompt - req.computed if req.chunks_left == 1 else \
                    min(CHUNK_TOKENS, req.prompt - req.computed)
                req.computed += step_tokens
                chunk_tokens += step_tokens
                req.chunks_left -= 1
                if req.chunks_left:
                    continue  # a partial prefill: no output this step
                prompt += req.prompt
            outputs += 1
            if req.kind == "embed":
                finished.append(Finished(req, "stop"))
                continue
            req.done += 1
            gen += 1
            if req.done >= req.max_tokens:
                finished.append(Finished(req, "length"))
        for f in finished:
            self.running.remove(f.req)
        if not log_stats:
            return finished, None
        counted = chunk_tokens if self.per_chunk else prompt
        it = None
        if outputs or self.per_chunk:
            it = {"prompt": counted, "gen": gen, "tokens": counted + gen,
                  "finished": [f.reason for f in finished]}
        return finished, {"sched": self._gauges(), "it": it}

    def abort_all(self) -> list[Finished]:
        """Take every request out (vLLM's pause with mode=abort)."""
        gone = [Finished(r, "abort") for r in (*self.running, *self.waiting)]
        self.running.clear()
        self.waiting.clear()
        return gone

    def _gauges(self) -> dict:
        held = sum(r.computed + r.done for r in self.running)
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv": min(1.0, math.ceil(held / 16) * 16 / KV_CAPACITY)}


def abort_stats(reasons: list[str]) -> dict:
    """The stats of a batch of abort outputs: vLLM counts them as one iteration of 0
    tokens (outputs but no scheduler stats)."""
    return {"sched": None, "it": {"prompt": 0, "gen": 0, "tokens": 0, "finished": reasons}}
