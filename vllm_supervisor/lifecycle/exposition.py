"""The metrics endpoint's life around the runs: bound before anything is launched (after
a --replace, once the replaced supervisor let its port go), served by its own thread, and
kept up after the last stop for --metrics-linger seconds so that a last scrape sees the
final state. The metrics themselves are lifecycle/metrics.py's."""

from __future__ import annotations

from vllm_supervisor.host.metrics_http import MetricsServer, PortInUse
from vllm_supervisor.host.signals import STOP_SIGNALS
from vllm_supervisor.lifecycle.booking import StoppedBeforeLaunch

PORT_POLL_S = 0.1
# --replace: how long to wait for the replaced supervisor to let the metrics port go (it
# holds it until it exits, which its own --metrics-linger may delay).
REPLACE_PORT_WAIT_S = 60.0


def serve_metrics(cfg, metrics, host, clock, ui, wait_s: float = 0.0) -> MetricsServer | None:
    """The endpoint for CFG (None without --metrics-port), waiting up to WAIT_S while its
    port is in use; exit 3 naming the holder after that, exit 0 on a stop signal."""
    if cfg.metrics_port is None:
        return None
    deadline = clock.monotonic() + wait_s
    told = False
    while True:
        try:
            server = MetricsServer(metrics.registry, cfg.metrics_host, cfg.metrics_port)
            break
        except PortInUse as e:
            if clock.monotonic() >= deadline:
                raise
            if not told:
                ui.event(f"{e.message}: waiting up to {wait_s:g} s for it", "warn")
                told = True
        for sig in host.wait_signals(PORT_POLL_S):
            if sig.signo in STOP_SIGNALS:
                raise StoppedBeforeLaunch(f"{sig.name} from {sig.sender} while waiting for "
                                          "the metrics port: nothing was launched")
    where = f"[{server.host}]" if ":" in server.host else server.host
    ui.event(f"metrics: http://{where}:{server.port}/metrics")
    return server


def linger(server: MetricsServer | None, seconds: float, host, clock, ui) -> None:
    """After the last stop: keep SERVER up for SECONDS (a stop signal ends it sooner)."""
    if server is None or seconds <= 0:
        return
    ui.event(f"metrics: serving the final state for {seconds:g} s more (--metrics-linger)")
    deadline = clock.monotonic() + seconds
    while (left := deadline - clock.monotonic()) > 0:
        if any(sig.signo in STOP_SIGNALS for sig in host.wait_signals(left)):
            break
    server.close()
