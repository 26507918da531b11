"""Restarts for machines with no outer manager: --restart no|on-failure|always.

A new tree starts only after the previous one is verified gone, its GPU memory released
(or not verifiable: no GPU) and its port free - never into an out-of-memory error."""

from __future__ import annotations

import dataclasses

from vllm_supervisor.errors import ExitCode, SupervisorError
from vllm_supervisor.host.signals import STOP_SIGNALS
from vllm_supervisor.lifecycle.records import StopReport

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
PORT_WAIT_S = 10.0
PORT_POLL_S = 0.2
# Outcomes after which a restart would start into trouble: stop restarting.
NO_RESTART = (ExitCode.SURVIVED_SIGKILL, ExitCode.VRAM_NOT_RELEASED)


def backoff(n: int) -> float:
    """Seconds to wait before restart N (1-based): 1, 2, 4, ... capped at 60."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (n - 1))


def why_not_restart(policy: str, report: StopReport, done: int, most: int) -> str | None:
    """None when the run should restart, else why not."""
    if policy == "no":
        return "restart policy is no"
    if report.requested:
        return "the stop was requested"
    if report.exit_code in NO_RESTART:
        return f"exit {report.exit_code}: {report.exit_meaning}"
    if policy == "on-failure" and report.exit_code == 0:
        return "vLLM ended with 0 and the policy is on-failure"
    if done >= most:
        return f"--max-restarts {most} reached"
    return None


def run_with_restarts(cfg, run_once, ui, host, clock, metrics=None) -> StopReport:
    """Run RUN_ONCE() (one supervised tree, returns its report) under CFG's restart policy.
    HOST waits for signals and checks the port between runs; CLOCK times the backoff;
    METRICS (a RunMetrics) is told of each restart."""
    history: list[dict] = []
    while True:
        report = run_once()
        why = why_not_restart(cfg.restart, report, len(history), cfg.max_restarts)
        if why is not None:
            if cfg.restart != "no":
                ui.event(f"not restarting: {why}")
            return dataclasses.replace(report, restarts=tuple(history))
        n = len(history) + 1
        wait = backoff(n)
        if metrics is not None:
            metrics.restarting(report)
        ui.event(f"restart {n}/{cfg.max_restarts} in {wait:g} s (previous run: exit "
                 f"{report.exit_code}, {report.exit_meaning})", "warn")
        history.append({"attempt": n, "after_exit_code": report.exit_code,
                        "after_reason": report.reason, "vram": report.vram.status,
                        "backoff_s": wait, "at_wall": round(clock.time(), 3)})
        if _interrupted(wait, ui, host, clock) or not _port_free(cfg, ui, host, clock):
            return dataclasses.replace(report, restarts=tuple(history))


def _interrupted(wait: float, ui, host, clock) -> bool:
    """Wait WAIT seconds; True if a stop signal came (signals are still blocked)."""
    deadline = clock.monotonic() + wait
    while (left := deadline - clock.monotonic()) > 0:
        for sig in host.wait_signals(left):
            if sig.signo in STOP_SIGNALS:
                ui.event(f"{sig.name} from {sig.sender} during the restart backoff: stopping")
                return True
    return False


def _port_free(cfg, ui, host, clock, wait_s: float = PORT_WAIT_S) -> bool:
    """The port is free, or becomes free within WAIT_S (a dying server's socket)."""
    deadline = clock.monotonic() + wait_s
    while True:
        try:
            host.check_port(cfg.health_host, cfg.health_port)
            return True
        except SupervisorError as e:
            if clock.monotonic() >= deadline:
                ui.event(f"not restarting: {e.message}", "bad")
                return False
            for sig in host.wait_signals(PORT_POLL_S):
                if sig.signo in STOP_SIGNALS:
                    ui.event(f"{sig.name} from {sig.sender} while waiting for the port: "
                             "stopping")
                    return False
