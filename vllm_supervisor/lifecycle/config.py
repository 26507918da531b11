"""Frozen settings, and what the supervisor reads out of vLLM's own arguments."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path

from vllm_supervisor.errors import UsageError

DEFAULT_GRACE_S = 20.0
# Added on top of vLLM's own --shutdown-timeout so its drain is never cut short.
DRAIN_MARGIN_S = 20.0
DEFAULT_KILL_WAIT_S = 10.0
DEFAULT_VRAM_TIMEOUT_S = 30.0
DEFAULT_VRAM_POLL_S = 0.015
DEFAULT_VRAM_TOLERANCE_MIB = 256.0
DEFAULT_STARTUP_TIMEOUT_S = 1800.0  # large models load for many minutes
DEFAULT_STALL_TIMEOUT_S = 300.0
DEFAULT_HEALTH_INTERVAL_S = 5.0
DEFAULT_HEALTH_FAILURES = 3
# The progress probe: worst case from a freeze to the verdict is
# (failures + 1) x interval + failures x timeout = 3 x 5 + 2 x 15 = 45 s.
DEFAULT_PROBE_INTERVAL_S = 5.0
DEFAULT_PROBE_TIMEOUT_S = 15.0
DEFAULT_PROBE_FAILURES = 2
# How long a start waits for its GPUs (reservations and free memory): a co-tenant's
# verified stop takes at most grace + kill wait + VRAM wait = 60 s by default, and a
# co-tenant's model load a few minutes; a conflict that never resolves (two instances
# that each want 0.9 of one GPU) still ends in exit 3 within 5 minutes.
DEFAULT_GPU_WAIT_S = 300.0
VLLM_DEFAULT_PORT = 8000
# The longest duration any option (ours, or vLLM's --shutdown-timeout) may ask for: a year.
# Longer waits mean nothing, overflow the kernel's timers and systemd's usec fields.
MAX_SECONDS = 365 * 86400.0


@dataclass(frozen=True)
class Config:
    """Everything one supervised run needs; built by the CLI, never mutated."""

    model: str
    vllm_args: tuple[str, ...]
    vllm_cmd: tuple[str, ...]  # the binary (and any interpreter prefix) before "serve"
    grace_s: float
    kill_wait_s: float = DEFAULT_KILL_WAIT_S
    stop_signal: int = signal.SIGTERM
    signal_group: bool = False
    health_scheme: str = "http"
    health_host: str = "127.0.0.1"
    health_port: int = VLLM_DEFAULT_PORT
    ready_poll_s: float = 0.2
    log_file: Path | None = None
    report_json: Path | None = None
    vram_timeout_s: float = DEFAULT_VRAM_TIMEOUT_S
    vram_poll_s: float = DEFAULT_VRAM_POLL_S
    vram_tolerance_mib: float = DEFAULT_VRAM_TOLERANCE_MIB
    subreaper: bool = True
    parent_death_signal: int | None = signal.SIGTERM
    guard: bool = True
    private_tmp: bool = True
    keep_dist_env: bool = False
    require_free_gpu: bool = False
    reservations: bool = True
    gpu_wait_s: float = DEFAULT_GPU_WAIT_S
    gpu_claim: float | None = None  # None: from vLLM's own arguments (gpu/claim.py)
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S
    health_failures: int = DEFAULT_HEALTH_FAILURES
    probe: str = "completion"  # completion | health | off
    probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
    probe_failures: int = DEFAULT_PROBE_FAILURES
    restart: str = "no"  # no | on-failure | always
    max_restarts: int = 5
    idle_poll_s: float = 2.0
    metrics_port: int | None = None  # None: no metrics endpoint
    metrics_host: str = "127.0.0.1"
    metrics_linger_s: float = 0.0  # the endpoint stays up this long after the last stop
    env: tuple[tuple[str, str], ...] | None = None

    @property
    def drain_s(self) -> float:
        """vLLM's own drain: its --shutdown-timeout (0 when not given: it aborts requests)."""
        drain = option_value(self.vllm_args, "--shutdown-timeout")
        return float(drain) if drain is not None else 0.0

    @property
    def argv(self) -> tuple[str, ...]:
        """The full command line that is launched."""
        return (*self.vllm_cmd, "serve", self.model, *self.vllm_args)

    @property
    def url(self) -> str:
        """The base URL where vLLM will answer."""
        host = f"[{self.health_host}]" if ":" in self.health_host else self.health_host
        return f"{self.health_scheme}://{host}:{self.health_port}"


def option_value(args: tuple[str, ...], name: str) -> str | None:
    """The last value of --NAME in vLLM-style ARGS (both `--x v` and `--x=v`)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def health_target(args: tuple[str, ...]) -> tuple[str, str, int]:
    """(scheme, host, port) to probe, from vLLM's --host/--port/--ssl-keyfile."""
    port_s = option_value(args, "--port")
    try:
        port = int(port_s) if port_s is not None else VLLM_DEFAULT_PORT
    except ValueError:
        raise UsageError(f"vLLM's --port must be a number, got {port_s!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"vLLM's --port must be 1-65535, got {port}")
    host = option_value(args, "--host") or "127.0.0.1"
    # A wildcard bind answers on loopback.
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    scheme = "https" if option_value(args, "--ssl-keyfile") else "http"
    return scheme, host, port


def default_grace(args: tuple[str, ...]) -> float:
    """The grace period: DEFAULT_GRACE_S, or vLLM's --shutdown-timeout plus a margin."""
    drain = option_value(args, "--shutdown-timeout")
    if drain is None:
        return DEFAULT_GRACE_S
    try:
        drain_s = float(drain)
    except ValueError:
        drain_s = math.nan
    # vLLM itself refuses what is not a number; an infinite drain would make the grace
    # infinite and the stop endless, so it is refused here too, before anything starts.
    if not 0 <= drain_s <= MAX_SECONDS:
        raise UsageError(f"vLLM's --shutdown-timeout must be 0-{MAX_SECONDS:.0f} seconds, "
                         f"got {drain!r}")
    return max(DEFAULT_GRACE_S, drain_s + DRAIN_MARGIN_S)
