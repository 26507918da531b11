"""Command line: click -> Config; output and exit codes. No os.kill, psutil or pynvml here."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from vllm_supervisor import __version__
from vllm_supervisor.config import (
    DEFAULT_HEALTH_FAILURES,
    DEFAULT_HEALTH_INTERVAL_S,
    DEFAULT_KILL_WAIT_S,
    DEFAULT_STALL_TIMEOUT_S,
    DEFAULT_STARTUP_TIMEOUT_S,
    DEFAULT_VRAM_POLL_S,
    DEFAULT_VRAM_TIMEOUT_S,
    DEFAULT_VRAM_TOLERANCE_MIB,
    Config,
    default_grace,
    health_target,
)
from vllm_supervisor.errors import ExitCode, SupervisorError, UsageError

SECONDS = click.FloatRange(min=0)
# click >= 8.2 raises this (a UsageError) for a bare `vllm-supervise`: show the help.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
_debug = False


def _signal_number(value: str) -> int:
    name = value.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise UsageError(f"unknown signal {value!r} (try TERM, INT, QUIT)") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vllm-supervise")
@click.option("--debug", is_flag=True, help="Show tracebacks for internal errors.")
def cli(debug: bool) -> None:
    """Supervise `vllm serve`: start it in its own session, report readiness, and stop the
    whole process tree (SIGTERM, grace, SIGKILL of the group and any escapee), then verify
    the GPU memory came back before reporting the stop as done."""
    global _debug
    _debug = debug


_state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where instance records live (env VLLM_SUPERVISE_STATE_DIR; default "
         "$XDG_RUNTIME_DIR/vllm-supervise, /run/vllm-supervise for root).")


def _common_stop_options(f):
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
        click.option("--vram-poll", type=click.FloatRange(min=0.001),
                     default=DEFAULT_VRAM_POLL_S, show_default=True, metavar="SECONDS"),
        click.option("--vram-tolerance", type=SECONDS, default=DEFAULT_VRAM_TOLERANCE_MIB,
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
        _state_dir_option,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@cli.command(context_settings={"ignore_unknown_options": True,
                               "allow_interspersed_args": False})
@click.option("--vllm-bin", envvar="VLLM_SUPERVISE_VLLM_BIN", default="vllm",
              show_default=True, metavar="PATH",
              help="The vllm executable (env VLLM_SUPERVISE_VLLM_BIN).")
@_common_stop_options
@click.option("--name", help="Instance name (default: model and port, e.g. Qwen3-0.6B-8000).")
@click.option("--reclaim", is_flag=True,
              help="If a dead supervisor of this name left its tree running, stop it first.")
@click.option("--gpu-probe", default="auto", hidden=True)
@click.option("--no-subreaper", is_flag=True, hidden=True)
@click.option("--no-guard", is_flag=True, hidden=True)
@click.option("--parent-death-signal", default="TERM", hidden=True)
@click.argument("model")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(model: str, vllm_args: tuple[str, ...], vllm_bin: str, **opts) -> None:
    """Run `vllm serve MODEL VLLM_ARGS...` under supervision.

    Supervisor options go before MODEL; everything after MODEL (or after `--`) is passed
    to vLLM untouched."""
    from vllm_supervisor.proctree import resolve_binary

    if vllm_args[:1] == ("--",):
        vllm_args = vllm_args[1:]
    if model.startswith("-"):
        raise UsageError(f"expected MODEL, got option {model!r}")
    cfg = _config(model, vllm_args, (resolve_binary(vllm_bin),), opts)
    _run(cfg, opts)


@cli.command()
@click.option("--scenario", type=click.Choice(["clean", "stubborn-engine", "orphaned-engine",
                                               "late-vram"]), default="clean",
              show_default=True, help="What the simulated vLLM does.")
@click.option("--serve-for", type=SECONDS, default=3.0, show_default=True, metavar="SECONDS",
              help="Serve this long after ready, then send the supervisor SIGTERM.")
@_common_stop_options
def demo(scenario: str, serve_for: float, **opts) -> None:
    """The whole lifecycle over a built-in simulated vLLM (no vLLM, no GPU needed):
    start, ready, stop, report, with simulated VRAM on two simulated GPUs."""
    import tempfile

    from vllm_supervisor.demo import demo_setup

    with tempfile.TemporaryDirectory(prefix="vllm-supervise-demo-") as tmp:
        args, env, probe = demo_setup(Path(tmp), scenario)
        cmd = (sys.executable, "-m", "vllm_supervisor.simulated")
        if opts["grace"] is None:
            opts["grace"] = 3.0 if scenario == "stubborn-engine" else None
        opts["gpu_probe"] = probe
        opts["name"] = "demo"  # one record and one report, whatever port the demo got
        cfg = _config("demo/simulated-llm", args, cmd, opts, env=env,
                      stop_after_ready_s=None if scenario == "orphaned-engine" else serve_for)
        _run(cfg, opts)


def _config(model: str, vllm_args, cmd, opts, **extra) -> Config:
    scheme, host, port = health_target(vllm_args)
    pdeath = opts.get("parent_death_signal", "TERM")
    return Config(
        model=model,
        vllm_args=tuple(vllm_args),
        vllm_cmd=tuple(cmd),
        grace_s=opts["grace"] if opts["grace"] is not None else default_grace(vllm_args),
        kill_wait_s=opts["kill_wait"],
        stop_signal=_signal_number(opts["stop_signal"]),
        signal_group=opts["signal_group"],
        health_scheme=scheme, health_host=host, health_port=port,
        log_file=opts["log_file"], report_json=opts["report_json"],
        vram_timeout_s=opts["vram_timeout"], vram_poll_s=opts["vram_poll"],
        vram_tolerance_mib=opts["vram_tolerance"],
        subreaper=not opts.get("no_subreaper", False),
        guard=not opts.get("no_guard", False),
        private_tmp=not opts["no_private_tmp"],
        keep_dist_env=opts["keep_dist_env"],
        require_free_gpu=opts["require_free_gpu"],
        startup_timeout_s=opts["startup_timeout"],
        stall_timeout_s=opts["stall_timeout"],
        health_interval_s=opts["health_interval"],
        health_failures=opts["health_failures"],
        restart=opts["restart"],
        max_restarts=opts["max_restarts"],
        parent_death_signal=None if pdeath.lower() == "none" else _signal_number(pdeath),
        **extra,
    )


def _run(cfg: Config, opts) -> None:
    from vllm_supervisor import instances
    from vllm_supervisor.gpu import make_probe
    from vllm_supervisor.report import render_text, write_json
    from vllm_supervisor.restart import run_with_restarts
    from vllm_supervisor.supervisor import Supervisor
    from vllm_supervisor.ui import Ui

    probe = opts["gpu_probe"]
    if isinstance(probe, str):
        probe = make_probe(probe, dict(os.environ) | dict(cfg.env or ()))
    log_file = _open_log(cfg.log_file)
    ui = Ui(log_file, quiet=opts["quiet"])
    registry = instances.claim(opts.get("state_dir"), opts.get("name"), cfg,
                               opts.get("reclaim", False), probe, ui)
    report = run_with_restarts(
        cfg, lambda: Supervisor(cfg, ui, probe, log_file=log_file, registry=registry).run(),
        ui)
    instances.release(registry, report)
    text = render_text(report)
    _print_report(ui, text, report.exit_code)
    if log_file:
        log_file.event(text)
        log_file.close()
    if cfg.report_json:
        try:
            write_json(report, cfg.report_json)
        except OSError as e:
            ui.event(f"could not write {cfg.report_json}: {e.strerror}", "bad")
    sys.exit(report.exit_code)


def _open_log(path: Path | None):
    from vllm_supervisor.logs import LogFile

    if path is None:
        return None
    try:
        return LogFile(path)
    except OSError as e:
        raise UsageError(f"cannot open --log-file {str(path)!r}: {e.strerror}") from None


def _print_report(ui, text: str, code: int) -> None:
    if not ui.color:
        ui.block(text)
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(stderr=True, highlight=False)
    for line in text.splitlines():
        style = ""
        if line.startswith("exit code"):
            style = "bold green" if code == 0 else "bold red"
        elif line.startswith("VRAM"):
            style = "green" if " released" in line else "yellow"
        elif line.startswith("──"):
            style = "bold"
        elif "SURVIVED" in line:
            style = "bold red"
        console.print(Text(line, style=style), soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit 2 for usage, tracebacks only with --debug."""
    try:
        rv = cli.main(args=argv, prog_name="vllm-supervise", standalone_mode=False)
    except _NO_ARGS_IS_HELP as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(ExitCode.USAGE)
    except click.UsageError as e:
        _fail(f"{e.format_message()} (see `vllm-supervise {_cmd(e)}--help`)", ExitCode.USAGE)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except SupervisorError as e:
        _fail(e.one_line(), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:
        if _debug or os.environ.get("VLLM_SUPERVISE_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e}; hint: rerun with --debug", 1)
    sys.exit(rv if isinstance(rv, int) else 0)


def _cmd(e: click.UsageError) -> str:
    return f"{e.ctx.info_name} " if e.ctx and e.ctx.parent else ""


def _fail(message: str, code: int) -> None:
    click.echo(f"vllm-supervise: error: {message}", err=True)
    sys.exit(code)


# The operating commands register themselves on `cli` (kept in their own module).
from vllm_supervisor import cli_ops  # noqa: F401
