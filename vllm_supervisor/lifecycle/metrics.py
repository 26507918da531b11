"""The supervisor's Prometheus metrics (prometheus_client): what happens around vLLM.

One RunMetrics lives as long as the supervisor, across restarts. The loop pushes what it
already knows (state changes, readiness, the tree it walked, the probe's last result, each
run's report); nothing here does I/O on the loop's time. The GPUs and the reservation
table are read when Prometheus scrapes, in the HTTP server's thread, through the same
probe and table the run uses (reads only). docs/metrics.md lists every metric."""

from __future__ import annotations

import math

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily

from vllm_supervisor import __version__
from vllm_supervisor.gpu.probe import MIB
from vllm_supervisor.lifecycle.machine import State

P = "vllm_supervise_"
RESTARTING = "restarting"  # between two runs of --restart: the backoff, the port wait
STATES = [s.value for s in State] + [RESTARTING]
DEATHS = ["exit", "engine-gone", "health", "hung", "log"]
RESTART_REASONS = DEATHS + ["start-failed"]
VERDICTS = ["none", "released", "held", "unattributable", "unavailable", "interrupted",
            "not-waited"]
PROBE_RESULTS = ["none", "progress", "canary-ok", "canary-failed", "canary-busy",
                 "canary-refused", "sleeping", "no-metrics", "no-counters"]
NAN = math.nan
# No `_created` series beside each counter: the supervisor's start is in its own metrics'
# first scrape, and every series more is one more for Prometheus to store.
disable_created_metrics()


class RunMetrics:
    """The registry, and the updates the lifecycle makes (a lifecycle listener too)."""

    def __init__(self, name: str, model: str, url: str = ""):
        self.registry = r = CollectorRegistry()
        Info(P + "instance", "The supervised instance: its name, model, URL and our version",
             registry=r).info({"name": name, "model": model, "url": url,
                               "version": __version__})
        self.state = Enum(P + "state", "Lifecycle state of the supervised instance",
                          ["name"], states=STATES, registry=r).labels(name)
        self.state.state(State.ADMITTING.value)
        self.launches = Counter(P + "launches", "vLLM trees launched (restarts included)",
                                registry=r)
        self.ready_s = Gauge(P + "time_to_ready_seconds", "Seconds from launch to the "
                             "first /health 200, last run that became ready", registry=r)
        self.start_failures = Counter(P + "start_failures", "Runs that ended before "
                                      "/health answered, with no stop requested", registry=r)
        self.deaths = _labelled(Counter(P + "engine_deaths", "Engine deaths while "
                                        "serving, by how they were found", ["reason"],
                                        registry=r), DEATHS)
        self.restarts = _labelled(Counter(P + "restarts", "Restarts (--restart), by the "
                                          "reason the previous run ended", ["reason"],
                                          registry=r), RESTART_REASONS)
        self.stops = Counter(P + "stops", "Stops completed (tree gone, VRAM judged)",
                             registry=r)
        self.escalations = Counter(P + "stop_escalations", "Stops that needed SIGKILL",
                                   registry=r)
        self.stop_s = Gauge(P + "last_stop_duration_seconds", "Last stop: seconds from "
                            "its start to the whole tree gone and reaped", registry=r)
        self.escalated = Gauge(P + "last_stop_escalated", "1 when the last stop needed "
                               "SIGKILL", registry=r)
        self.release_s = Gauge(P + "last_vram_release_seconds", "Last stop: seconds "
                               "from the last SIGKILL (or the stop signal) to the GPU "
                               "memory seen released; NaN unless released", registry=r)
        self.verdict = Enum(P + "last_vram_verdict", "Last stop's GPU memory verdict",
                            states=VERDICTS, registry=r)
        self.stop_wall = Gauge(P + "last_stop_timestamp_seconds", "When the last stop's "
                               "verdict was reached (Unix time)", registry=r)
        self.processes = Gauge(P + "tree_processes", "Live processes of the vLLM tree",
                               registry=r)
        self.rss = Gauge(P + "tree_resident_memory_bytes", "Resident memory of the vLLM "
                         "tree's live processes", registry=r)
        self.probe_latency = Gauge(P + "probe_last_latency_seconds", "The progress "
                                   "probe's last canary latency; NaN when the last look "
                                   "sent none", registry=r)
        self.probe_result = Enum(P + "probe_last_result", "The progress probe's last "
                                 "result", states=PROBE_RESULTS, registry=r)
        self.probe_fails = Gauge(P + "probe_failed_canaries", "Canaries failed in a row "
                                 "with no progress since (hang suspected when > 0)",
                                 registry=r)
        for g in (self.ready_s, self.stop_s, self.release_s, self.probe_latency):
            g.set(NAN)
        self.gpus = GpuCollector()
        r.register(self.gpus)

    # -- the lifecycle ------------------------------------------------------------------
    def new_run(self, probe, ledger, booking=None) -> None:
        """A run begins (admission first): its GPU probe, ledger and reservation."""
        self.state.state(State.ADMITTING.value)
        self.gpus.watch(probe, ledger, booking)
        self.tree([])

    def on_transition(self, old: State, new: State) -> None:
        """A lifecycle listener: the state, and each launch."""
        self.state.state(new.value)
        if new is State.LAUNCHING:
            self.launches.inc()

    def ready(self, seconds: float) -> None:
        """/health answered SECONDS after launch."""
        self.ready_s.set(seconds)

    def tree(self, infos: list) -> None:
        """The tree as the loop last walked it."""
        live = [i for i in infos if i.state != "Z"]
        self.processes.set(len(live))
        self.rss.set(sum(i.rss_bytes for i in live))
        self.gpus.tree_pids = frozenset(i.pid for i in live)

    def probe(self, last, fails: int) -> None:
        """The progress probe's last result (a progress.ProbeResult)."""
        result = last.result.replace(" ", "-")
        self.probe_result.state(result if result in PROBE_RESULTS else "none")
        self.probe_latency.set(NAN if last.latency_s is None else last.latency_s)
        self.probe_fails.set(fails)

    def run_ended(self, report) -> None:
        """A run's StopReport: how it ended, the stop and the VRAM verdict."""
        if report.engine_death_reason in DEATHS:
            self.deaths.labels(report.engine_death_reason).inc()
        elif not report.ready and not report.requested:
            self.start_failures.inc()
        self.processes.set(len(report.survivors))
        self.rss.set(0 if not report.survivors else NAN)
        self.gpus.tree_pids = frozenset(p.pid for p in report.survivors)
        if report.stop_duration_s is None:
            return
        self.stops.inc()
        if report.escalated:
            self.escalations.inc()
        self.stop_s.set(report.stop_duration_s)
        self.escalated.set(1 if report.escalated else 0)
        vram = report.vram
        self.verdict.state(vram.status if vram.status in VERDICTS else "none")
        self.release_s.set(release_seconds(report))
        if vram.verdict_wall is not None:
            self.stop_wall.set(vram.verdict_wall)

    def restarting(self, report) -> None:
        """--restart: a new run follows REPORT's after the backoff."""
        self.state.state(RESTARTING)
        self.restarts.labels(restart_reason(report)).inc()


def restart_reason(report) -> str:
    """Why the run before a restart ended: its engine death, a failed start, or vLLM's own
    exit while serving."""
    if report.engine_death_reason in DEATHS:
        return report.engine_death_reason
    return "start-failed" if not report.ready else "exit"


def release_seconds(report) -> float:
    """Seconds from the last SIGKILL (when the stop escalated) or the stop's start to the
    moment the memory was seen released; NaN unless released."""
    vram = report.vram
    if vram.status != "released" or vram.released_t is None or report.tree_gone_t is None:
        return NAN
    start = report.tree_gone_t - report.stop_duration_s
    kills = [s.t for s in report.signals if s.direction == "sent" and s.signal == "SIGKILL"]
    if report.escalated and kills:
        start = max(kills)
    return round(max(0.0, vram.released_t - start), 4)


def _labelled(metric, values: list[str]):
    """Every known label value present from the start (at 0), as Prometheus advises."""
    for v in values:
        metric.labels(v)
    return metric


class GpuCollector:
    """Per GPU (uuid and index labels), read at scrape time: memory used and total now,
    the run's baseline, what the tree's processes hold, and the reservation table."""

    def __init__(self) -> None:
        self.probe = self.ledger = self.booking = None
        self.tree_pids: frozenset[int] = frozenset()

    def watch(self, probe, ledger, booking) -> None:
        """The run's probe, ledger and booking (each run has its own ledger)."""
        self.probe, self.ledger, self.booking = probe, ledger, booking

    def describe(self):
        """Names are known only per GPU: nothing to check at registration."""
        return []

    def collect(self):
        """The per-GPU families; none where there is no GPU probe or it fails."""
        probe = self.probe
        if probe is None or probe.available() is not None:
            return []
        try:
            readings = probe.read()
        except Exception:  # noqa: BLE001 - a scrape must answer whatever the driver does
            return []
        fams = {k: GaugeMetricFamily(P + "gpu_" + k, doc, labels=["uuid", "index"])
                for k, doc in GPU_METRICS.items()}
        baseline = dict(self.ledger.baseline) if self.ledger is not None else {}
        tree = self.tree_pids
        for r in readings:
            labels = [r.uuid, str(r.index)]
            if r.used_mib is not None:
                fams["memory_used_bytes"].add_metric(labels, r.used_mib * MIB)
            if r.total_mib is not None:
                fams["memory_total_bytes"].add_metric(labels, r.total_mib * MIB)
            if baseline.get(r.uuid) is not None:
                fams["memory_baseline_bytes"].add_metric(labels, baseline[r.uuid] * MIB)
            held = [mib for pid, mib in r.procs if pid in tree]
            if all(mib is not None for mib in held):
                fams["memory_tree_bytes"].add_metric(labels, sum(held) * MIB)
        self._reservations(readings, fams)
        return list(fams.values())

    def _reservations(self, readings, fams) -> None:
        booking = self.booking
        if booking is None:
            return
        try:
            rows = booking.table.gpu_rows(readings, booking.cfg.vram_tolerance_mib)
        except OSError:
            return
        own = booking.own.id if booking.own is not None else None
        for row in rows:
            labels = [row["uuid"], str(row["gpu"])]
            fams["reserved_ratio"].add_metric(labels, row["reserved"])
            fams["reservations"].add_metric(labels, len(row["reserved_by"]))
            fams["claim_ratio"].add_metric(labels, next(
                (h["fraction"] for h in row["reserved_by"] if h["id"] == own), 0.0))


GPU_METRICS = {
    "memory_used_bytes": "GPU memory in use now (every process)",
    "memory_total_bytes": "GPU memory in all",
    "memory_baseline_bytes": "GPU memory in use before this run's launch (what the VRAM "
                             "verdict compares with)",
    "memory_tree_bytes": "GPU memory the vLLM tree's processes hold now",
    "reserved_ratio": "Fraction of the GPU reserved in the host's table (every instance)",
    "reservations": "Entries of the host's reservation table on the GPU",
    "claim_ratio": "This instance's reservation on the GPU (0: none now)",
}
