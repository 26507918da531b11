"""The progress probe while serving, and the drain at a requested stop, as the run sees
them: when the probe thread starts, what a hang verdict says (with the process evidence
that supports it), what STATUS shows, and how many requests a stop found in flight and
saw finish. The judgement is lifecycle/progress.py's; the I/O is the host's."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vllm_supervisor.host.vllm_http import Endpoint
from vllm_supervisor.lifecycle.config import Config, option_value
from vllm_supervisor.lifecycle.progress import ProbeSettings, ProgressJudge, model_kind

DRAIN_LOOK_S = 1.0  # the /metrics look before the stop signal waits at most this long
# vLLM's engine core says how its shutdown went (v1/engine/core.py, 0.32).
_SHUTDOWN = re.compile(rb"\[shutdown\] EngineCore: (?:(?P<done>request processing complete)|"
                       rb"aborting in-flight requests count=(?P<aborted>\d+)|"
                       rb"draining in-flight requests count=(?P<draining>\d+))")


class ShutdownLog:
    """A tap on vLLM's output: how many requests its engine held when the drain began
    ("draining in-flight requests count=N"), whether it finished them all ("request
    processing complete"), or aborted N (no --shutdown-timeout). The engine's own count
    wins over the /metrics look, which can lag behind it under load."""

    def __init__(self) -> None:
        self.complete = False
        self.aborted: int | None = None
        self.draining: int | None = None  # vLLM's own count when its drain began

    def feed(self, stream: str, data: bytes) -> None:
        """One chunk of output: one bytes.find unless it holds a shutdown line."""
        if data.find(b"[shutdown] EngineCore") < 0:
            return
        for m in _SHUTDOWN.finditer(data):
            if m.group("done"):
                self.complete = True
            elif m.group("aborted"):
                self.aborted = int(m.group("aborted"))
            else:
                self.draining = int(m.group("draining"))


def settings(cfg: Config, env: dict[str, str]) -> ProbeSettings:
    """The probe's settings from CFG and vLLM's environment (its API key)."""
    key = option_value(cfg.vllm_args, "--api-key") or env.get("VLLM_API_KEY") or None
    return ProbeSettings(cfg.probe, cfg.probe_interval_s, cfg.probe_timeout_s,
                         cfg.probe_failures, model_kind(cfg.vllm_args), key)


@dataclass
class DrainResult:
    """What a requested stop found in flight and saw finish (None: not known)."""

    in_flight: int | None = None
    finished: int | None = None
    left: int | None = None  # still running or waiting at the last answer
    vllm_answered_to_end: bool = True
    cut_by_sigkill: int | None = None
    aborted: int | None = None  # vLLM aborted them itself (no --shutdown-timeout)
    in_flight_metrics: int | None = None  # what /metrics said just before the stop signal

    def text(self) -> str:
        """One line for the report."""
        if self.in_flight is None:
            return "unknown (vLLM's /metrics did not answer before the stop signal)"
        out = f"{self.in_flight} requests in flight at the stop"
        if self.finished is None:
            return out + "; how many finished is unknown"
        out += f"; {self.finished} finished before vLLM exited"
        if self.aborted:
            out += f"; vLLM aborted {self.aborted} (it drains only with --shutdown-timeout)"
        if self.cut_by_sigkill:
            out += f"; SIGKILL cut off up to {self.cut_by_sigkill}"
        elif self.left:
            out += f"; {self.left} unknown (vLLM stopped answering /metrics)"
        return out


class ServingProbes:
    """The progress watch (started at READY) and the drain watch (at a requested stop)."""

    def __init__(self, ctx, env: dict[str, str], shutdown_log: ShutdownLog | None = None):
        self.ctx = ctx
        self.shutdown_log = shutdown_log or ShutdownLog()
        self.settings = settings(ctx.cfg, env)
        cfg = ctx.cfg
        self.endpoint = Endpoint(cfg.health_scheme, cfg.health_host, cfg.health_port,
                                 self.settings.api_key)
        self.judge: ProgressJudge | None = None
        self.watch = None
        self.drain_watch = None
        self.drain: DrainResult | None = None
        self._suspect: str | None = None
        self._published = None
        self.cpu_at_suspect: dict[int, int] = {}  # CPU ticks at the first failed canary
        self.suspect_at = ctx.clock.monotonic()

    def start(self) -> None:
        """At READY: start the progress watch (unless --probe says otherwise)."""
        s, ctx = self.settings, self.ctx
        if s.mode != "completion":
            return
        self.judge = ProgressJudge(s, ctx.clock.monotonic())
        self.watch = ctx.host.start_progress(self.endpoint, self.judge, s.kind, s.interval_s,
                                             s.timeout_s, ctx.clock, ctx.cfg.model)

    def check(self, infos: list) -> str | None:
        """The hang verdict with its process evidence, or None; keeps STATUS current."""
        judge = self.judge
        if judge is None:
            return None
        suspect = judge.suspect
        if suspect != self._suspect:
            self._suspect = suspect
            ctx = self.ctx
            if suspect:
                self.cpu_at_suspect = {i.pid: i.cpu_ticks for i in infos if i.state != "Z"}
                self.suspect_at = ctx.clock.monotonic()
                ctx.ui.event(suspect, "warn")
                ctx.notify.send(f"STATUS=serving {ctx.cfg.model}: {suspect}")
            else:
                ctx.notify.send(f"STATUS=serving {ctx.cfg.model} at {ctx.cfg.url}")
        self._publish(judge.last)
        if judge.hung is None:
            return None
        evidence = process_evidence(infos, self.cpu_at_suspect)
        return f"hung: {judge.hung}" + (f" ({evidence})" if evidence else "")

    def _publish(self, last) -> None:
        """The last result into the instance record (for `status`) and the metrics, when
        it changed."""
        if last is None or last is self._published:
            return
        self._published = last
        self.ctx.publisher.update(probe=last.text())
        self.ctx.metrics.probe(last, self.judge.fails)

    def stop_watch(self, join_s: float = 0.0) -> None:
        """Stop the progress watch (the stop begins); at the end of the run, wait up to
        JOIN_S for its thread, as for the health thread, before a restart forks again."""
        if self.watch is not None:
            self.watch.stop()
            if join_s:
                self.watch.join(join_s)

    def begin_drain(self) -> int | None:
        """Just before the stop signal of a requested stop: how many requests vLLM has
        running and waiting (None when /metrics does not say), and a watch of the drain."""
        first = self.ctx.host.fetch_metrics(self.endpoint, DRAIN_LOOK_S)
        self.drain = DrainResult()
        if first is None or first.running is None:
            return None
        self.drain.in_flight = first.running + (first.waiting or 0)
        self.drain.in_flight_metrics = self.drain.in_flight
        self.drain_watch = self.ctx.host.start_drain(self.endpoint, first)
        return self.drain.in_flight

    def end_drain(self, escalated: bool) -> None:
        """The tree is gone (or SIGKILL is sent): what the drain watch saw."""
        w, d = self.drain_watch, self.drain
        if w is None or d is None:
            return
        w.stop()
        first, last = w.first, w.last
        if first.finished is not None and last.finished is not None:
            d.finished = int(last.finished - first.finished)
        d.left = (last.running or 0) + (last.waiting or 0)
        d.vllm_answered_to_end = w.answered_to_end
        log = self.shutdown_log
        if log.draining is not None:  # the engine's own count when the signal reached it
            d.in_flight = log.draining
        if log.aborted is not None:  # no --shutdown-timeout: vLLM aborted what it held
            d.aborted, d.left = log.aborted, 0
            d.finished = max(0, d.in_flight - log.aborted)
        elif log.complete and not escalated:  # it stops draining only with no work left
            d.finished, d.left = d.in_flight, 0
        if escalated and d.left:
            d.cut_by_sigkill = d.left
        self.drain_watch = None

    def last_result(self) -> dict | None:
        """The probe's last result for the instance record and the report."""
        last = self.judge.last if self.judge else None
        if last is None:
            return None
        return {"result": last.result, "detail": last.detail,
                "latency_ms": None if last.latency_s is None else round(last.latency_s * 1e3),
                "age_s": round(self.ctx.clock.monotonic() - last.at, 1), "text": last.text()}


def process_evidence(infos: list, cpu_before: dict[int, int]) -> str:
    """What the processes say, as support for a verdict (never a verdict alone): engine
    processes stopped (T) or in uninterruptible sleep (D), or using no CPU since the first
    failed canary."""
    out = []
    for i in infos:
        if not i.title.startswith("VLLM::") or i.state == "Z":
            continue
        if i.state in ("T", "t"):
            out.append(f"{i.title} pid {i.pid} is stopped (T)")
        elif i.state == "D":
            out.append(f"{i.title} pid {i.pid} is in uninterruptible sleep (D)")
        elif i.pid in cpu_before and i.cpu_ticks == cpu_before[i.pid]:
            out.append(f"{i.title} pid {i.pid} used no CPU since the first failed canary")
    return "; ".join(out)
