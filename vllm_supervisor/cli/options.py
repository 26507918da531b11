"""The options `serve`, `demo` and `print-unit` share, and the types that check them."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import click

from vllm_supervisor.errors import UsageError
from vllm_supervisor.lifecycle.config import (
    DEFAULT_GPU_WAIT_S,
    DEFAULT_HEALTH_FAILURES,
    DEFAULT_HEALTH_INTERVAL_S,
    DEFAULT_KILL_WAIT_S,
    DEFAULT_PROBE_FAILURES,
    DEFAULT_PROBE_INTERVAL_S,
    DEFAULT_PROBE_TIMEOUT_S,
    DEFAULT_STALL_TIMEOUT_S,
    DEFAULT_STARTUP_TIMEOUT_S,
    DEFAULT_VRAM_POLL_S,
    DEFAULT_VRAM_TIMEOUT_S,
    DEFAULT_VRAM_TOLERANCE_MIB,
    MAX_SECONDS,
)

MAX_COUNT = 1_000_000  # --max-restarts, --health-failures: beyond this a count means nothing
MAX_MIB = float(1 << 30)  # a petabyte of GPU memory
# Signals vLLM (uvicorn and its engine) turns into an orderly shutdown. KILL, STOP and the
# job-control, child and fault signals would never start one.
STOP_SIGNALS = ("TERM", "INT", "HUP", "QUIT", "USR1", "USR2")


class FiniteNumber(click.ParamType):
    """A float that is finite and within [MIN, MAX]: `nan`, `inf` and `1e309` are refused."""

    name = "number"

    def __init__(self, minimum: float = 0.0, what: str = "seconds",
                 maximum: float = MAX_SECONDS):
        self.minimum = minimum
        self.maximum = maximum
        self.what = what

    def convert(self, value, param, ctx):
        """The value as a float, or click's one-line usage error."""
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{value!r} is not a number of {self.what}", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of {self.what}", param, ctx)
        if number < self.minimum:
            self.fail(f"{value!r} is below {self.minimum:g} {self.what}", param, ctx)
        if number > self.maximum:
            self.fail(f"{value!r} is above {self.maximum:g} {self.what}", param, ctx)
        return number


SECONDS = FiniteNumber()


def count(minimum: int) -> click.IntRange:
    """An integer option from MINIMUM to MAX_COUNT."""
    return click.IntRange(min=minimum, max=MAX_COUNT)


def signal_number(value: str) -> int:
    """SIGTERM's number for 'TERM', 'SIGTERM' or 'term'; a usage error otherwise."""
    name = value.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise UsageError(f"unknown signal {value!r} (try TERM, INT, QUIT)") from None


class StopSignal(click.ParamType):
    """A signal that can start vLLM's own shutdown (STOP_SIGNALS), as its number."""

    name = "signal"

    def convert(self, value, param, ctx):
        """The signal's number, or a usage error that lists the allowed ones."""
        if isinstance(value, int):
            return value
        name = str(value).upper().removeprefix("SIG")
        if name not in STOP_SIGNALS:
            self.fail(f"{value!r} cannot start vLLM's shutdown; use one of "
                      f"{', '.join(STOP_SIGNALS)}", param, ctx)
        return int(signal.Signals["SIG" + name])


class PlainPath(click.Path):
    """click.Path, refusing '' (click would make it '.') and a NUL byte (no file name holds
    one; click.Path's stat() would raise ValueError)."""

    def convert(self, value, param, ctx):
        """The path, or click's one-line usage error."""
        if isinstance(value, str) and not value.strip():
            self.fail("must not be empty (that would be the current folder)", param, ctx)
        if "\0" in str(value):
            self.fail("a path cannot contain a NUL byte", param, ctx)
        return super().convert(value, param, ctx)


def existing_folder(ctx, param, value: Path | None) -> Path | None:
    """A file path whose folder exists: checked before anything is launched."""
    if value is not None and not value.absolute().parent.is_dir():
        raise click.BadParameter(f"folder {str(value.absolute().parent)!r} does not exist",
                                 ctx, param)
    return value


def instance_name(ctx, param, value: str | None) -> str | None:
    """An explicit --name, checked as the state directory will check it."""
    from vllm_supervisor.instances.statedir import check_name

    if value is not None:
        try:
            check_name(value)
        except UsageError as e:
            raise click.BadParameter(e.message.removeprefix(f"bad --name {value!r}: "),
                                     ctx, param) from None
    return value


state_dir_option = click.option(
    "--state-dir", type=PlainPath(file_okay=False, path_type=Path), default=None,
    help="Where instance records live (env VLLM_SUPERVISE_STATE_DIR; default "
         "$XDG_RUNTIME_DIR/vllm-supervise, /run/vllm-supervise for root).")


def stop_options(f):
    """The supervision options of `serve` and `demo`."""
    opts = [
        click.option("--grace", type=SECONDS, default=None, metavar="SECONDS",
                     help="Wait this long after the stop signal before SIGKILL. Default 20 s, "
                          "or vLLM's --shutdown-timeout + 20 s when that is given."),
        click.option("--kill-wait", type=FiniteNumber(0.1), default=DEFAULT_KILL_WAIT_S,
                     show_default=True, metavar="SECONDS",
                     help="After SIGKILL, how long to wait before naming survivors."),
        click.option("--stop-signal", type=StopSignal(), default="TERM", show_default=True,
                     metavar="SIGNAL",
                     help="Signal sent to the vLLM main process to start its own shutdown: "
                          + ", ".join(STOP_SIGNALS) + "."),
        click.option("--signal-group", is_flag=True,
                     help="Send the stop signal to the whole process group instead."),
        click.option("--report-json", type=PlainPath(dir_okay=False, path_type=Path),
                     callback=existing_folder,
                     help="Also write the stop report as JSON to this file."),
        click.option("--log-file", type=PlainPath(dir_okay=False, path_type=Path),
                     callback=existing_folder,
                     help="Also append vLLM's output (and the supervisor's events) here."),
        click.option("--vram-timeout", type=SECONDS, default=DEFAULT_VRAM_TIMEOUT_S,
                     show_default=True, metavar="SECONDS",
                     help="How long to wait for GPU memory to return; 0 skips the wait."),
        click.option("--vram-poll", type=FiniteNumber(0.001),
                     default=DEFAULT_VRAM_POLL_S, show_default=True, metavar="SECONDS"),
        click.option("--vram-tolerance", type=FiniteNumber(what="MiB", maximum=MAX_MIB),
                     default=DEFAULT_VRAM_TOLERANCE_MIB,
                     show_default=True, metavar="MIB",
                     help="A GPU counts as released within this many MiB of its baseline."),
        click.option("--keep-dist-env", is_flag=True,
                     help="Keep inherited torch.distributed variables (RANK, MASTER_ADDR, "
                          "...); by default they are removed and named."),
        click.option("--require-free-gpu", is_flag=True,
                     help="Refuse to start when GPU memory is already held on its GPUs."),
        click.option("--gpu-wait", type=SECONDS, default=DEFAULT_GPU_WAIT_S,
                     show_default=True, metavar="SECONDS",
                     help="Wait this long for the GPUs (others' reservations, loads, free "
                          "memory) before giving up with exit 3."),
        click.option("--gpu-claim", type=FiniteNumber(0.001, "of a GPU", 1.0), default=None,
                     metavar="FRACTION",
                     help="Reserve this fraction of each GPU instead of vLLM's "
                          "--gpu-memory-utilization (default 0.9)."),
        click.option("--no-reservations", is_flag=True,
                     help="Do not use the host-wide GPU reservation table."),
        click.option("--reservations-dir", type=PlainPath(file_okay=False, path_type=Path),
                     envvar="VLLM_SUPERVISE_RESERVATIONS_DIR", default=None, metavar="DIR",
                     help="The reservation table shared by every supervisor on the host "
                          "(env VLLM_SUPERVISE_RESERVATIONS_DIR; default "
                          "/run/vllm-supervise-gpu)."),
        click.option("--startup-timeout", type=SECONDS, default=DEFAULT_STARTUP_TIMEOUT_S,
                     show_default=True, metavar="SECONDS",
                     help="Give up (exit 3) when vLLM is not ready after this long; 0: no limit."),
        click.option("--stall-timeout", type=SECONDS, default=DEFAULT_STALL_TIMEOUT_S,
                     show_default=True, metavar="SECONDS",
                     help="Give up (exit 3) after this long with no log output, no memory "
                          "growth and no CPU use while starting; 0: off."),
        click.option("--health-interval", type=SECONDS, default=DEFAULT_HEALTH_INTERVAL_S,
                     show_default=True, metavar="SECONDS",
                     help="Poll /health this often while serving; 0 switches it off."),
        click.option("--health-failures", type=count(1),
                     default=DEFAULT_HEALTH_FAILURES, show_default=True, metavar="N",
                     help="This many failed /health polls in a row count as engine death."),
        click.option("--probe", type=click.Choice(["completion", "health", "off"]),
                     default="completion", show_default=True,
                     help="While serving: /health and the progress probe (vLLM's /metrics "
                          "counters, else a 1-token canary request) that finds an engine "
                          "hung behind a healthy /health; /health only; or nothing."),
        click.option("--probe-interval", type=FiniteNumber(0.1), default=DEFAULT_PROBE_INTERVAL_S,
                     show_default=True, metavar="SECONDS",
                     help="Look at vLLM's progress this long after the previous look."),
        click.option("--probe-timeout", type=FiniteNumber(0.1), default=DEFAULT_PROBE_TIMEOUT_S,
                     show_default=True, metavar="SECONDS",
                     help="A canary request not answered within this long has failed."),
        click.option("--probe-failures", type=count(1), default=DEFAULT_PROBE_FAILURES,
                     show_default=True, metavar="N",
                     help="This many failed canaries in a row, with vLLM's counters still, "
                          "mean the engine hung (exit 7)."),
        click.option("--restart", type=click.Choice(["no", "on-failure", "always"]),
                     default="no", show_default=True,
                     help="Restart vLLM when it ends by itself (after VRAM and port are free)."),
        click.option("--max-restarts", type=count(0), default=5,
                     show_default=True, metavar="N",
                     help="At most this many restarts; 0: none."),
        click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
                     metavar="PORT",
                     help="Serve Prometheus metrics on this port, from before launch until "
                          "the supervisor exits (docs/metrics.md)."),
        click.option("--metrics-host", default="127.0.0.1", show_default=True,
                     metavar="ADDRESS", help="The address the metrics endpoint binds."),
        click.option("--metrics-linger", type=SECONDS, default=0.0, show_default=True,
                     metavar="SECONDS",
                     help="Keep the metrics endpoint up this long after the stop, for a "
                          "last scrape (a stop signal ends it sooner)."),
        click.option("--no-private-tmp", is_flag=True,
                     help="Do not give vLLM a private TMPDIR (removed after the stop)."),
        click.option("--quiet", "-q", is_flag=True, help="No supervisor lines but the report."),
        state_dir_option,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f
