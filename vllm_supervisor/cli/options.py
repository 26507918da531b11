"""The options `serve`, `demo` and `print-unit` share, and the types that check them."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import click

from vllm_supervisor.errors import UsageError
from vllm_supervisor.lifecycle.config import (
    DEFAULT_HEALTH_FAILURES,
    DEFAULT_HEALTH_INTERVAL_S,
    DEFAULT_KILL_WAIT_S,
    DEFAULT_STALL_TIMEOUT_S,
    DEFAULT_STARTUP_TIMEOUT_S,
    DEFAULT_VRAM_POLL_S,
    DEFAULT_VRAM_TIMEOUT_S,
    DEFAULT_VRAM_TOLERANCE_MIB,
)



class FiniteNumber(click.ParamType):
    """A float that is finite and at least MIN: `nan`, `inf` and `1e309` are refused."""

    name = "number"

    def __init__(self, minimum: float = 0.0, what: str = "seconds"):
        self.minimum = minimum
        self.what = what

    def convert(self, value, param, ctx):
        """The value as a float, or click's one-line usage error."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of {self.what}", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of {self.what}", param, ctx)
        if number < self.minimum:
            self.fail(f"{value!r} is below {self.minimum:g} {self.what}", param, ctx)
        return number


SECONDS = FiniteNumber()


def signal_number(value: str) -> int:
    """SIGTERM's number for 'TERM', 'SIGTERM' or 'term'; a usage error otherwise."""
    name = value.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise UsageError(f"unknown signal {value!r} (try TERM, INT, QUIT)") from None


state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where instance records live (env VLLM_SUPERVISE_STATE_DIR; default "
         "$XDG_RUNTIME_DIR/vllm-supervise, /run/vllm-supervise for root).")


def stop_options(f):
    """The supervision options of `serve` and `demo`."""
    opts = [
        click.option("--grace", type=SECONDS, default=None, metavar="SECONDS",
                     help="Wait this long after the stop signal before SIGKILL. Default 20 s, "
                          "or vLLM's --shutdown-timeout + 20 s when that is given."),
        click.option("--kill-wait", type=SECONDS, default=DEFAULT_KILL_WAIT_S,
                     show_default=True, metavar="SECONDS",
                     help="After SIGKILL, how long to wait before naming survivors."),
        click.option("--stop-signal", default="TERM", show_default=True, metavar="SIGNAL",
                     help="Signal sent to the vLLM main process to start its own shutdown."),
        click.option("--signal-group", is_flag=True,
                     help="Send the stop signal to the whole process group instead."),
        click.option("--report-json", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also write the stop report as JSON to this file."),
        click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also append vLLM's output (and the supervisor's events) here."),
        click.option("--vram-timeout", type=SECONDS, default=DEFAULT_VRAM_TIMEOUT_S,
                     show_default=True, metavar="SECONDS",
                     help="How long to wait for GPU memory to return; 0 skips the wait."),
        click.option("--vram-poll", type=FiniteNumber(0.001),
                     default=DEFAULT_VRAM_POLL_S, show_default=True, metavar="SECONDS"),
        click.option("--vram-tolerance", type=FiniteNumber(what="MiB"),
                     default=DEFAULT_VRAM_TOLERANCE_MIB,
                     show_default=True, metavar="MIB",
                     help="A GPU counts as released within this many MiB of its baseline."),
        click.option("--keep-dist-env", is_flag=True,
                     help="Keep inherited torch.distributed variables (RANK, MASTER_ADDR, "
                          "...); by default they are removed and named."),
        click.option("--require-free-gpu", is_flag=True,
                     help="Refuse to start when GPU memory is already held on its GPUs."),
        click.option("--startup-timeout", type=SECONDS, default=DEFAULT_STARTUP_TIMEOUT_S,
                     show_default=True, metavar="SECONDS",
                     help="Give up (exit 3) when vLLM is not ready after this long."),
        click.option("--stall-timeout", type=SECONDS, default=DEFAULT_STALL_TIMEOUT_S,
                     show_default=True, metavar="SECONDS",
                     help="Give up (exit 3) after this long with no log output, no memory "
                          "growth and no CPU use while starting."),
        click.option("--health-interval", type=SECONDS, default=DEFAULT_HEALTH_INTERVAL_S,
                     show_default=True, metavar="SECONDS",
                     help="Poll /health this often while serving; 0 switches it off."),
        click.option("--health-failures", type=click.IntRange(min=1),
                     default=DEFAULT_HEALTH_FAILURES, show_default=True, metavar="N",
                     help="This many failed /health polls in a row count as engine death."),
        click.option("--restart", type=click.Choice(["no", "on-failure", "always"]),
                     default="no", show_default=True,
                     help="Restart vLLM when it ends by itself (after VRAM and port are free)."),
        click.option("--max-restarts", type=click.IntRange(min=0), default=5,
                     show_default=True, metavar="N"),
        click.option("--no-private-tmp", is_flag=True,
                     help="Do not give vLLM a private TMPDIR (removed after the stop)."),
        click.option("--quiet", "-q", is_flag=True, help="No supervisor lines but the report."),
        state_dir_option,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f
