"""`serve` and `demo`: options -> frozen Config -> one supervised run (with restarts) ->
the report on stderr (and as JSON) -> the exit code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from vllm_supervisor.cli.options import (
    SECONDS,
    instance_name,
    signal_number,
    stop_options,
)
from vllm_supervisor.errors import UsageError
from vllm_supervisor.instances.statedir import default_name
from vllm_supervisor.lifecycle.config import Config, default_grace, health_target

GUARD_REAP_S = 1.0  # the guard exits within milliseconds of "done"; never wait longer


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@click.option("--vllm-bin", envvar="VLLM_SUPERVISE_VLLM_BIN", default="vllm",
              show_default=True, metavar="PATH",
              help="The vllm executable (env VLLM_SUPERVISE_VLLM_BIN).")
@stop_options
@click.option("--name", callback=instance_name, help="Instance name (default: model and port, e.g. Qwen3-0.6B-8000).")
@click.option("--reclaim", is_flag=True,
              help="If a dead supervisor of this name left its tree running, stop it first.")
@click.option("--replace", "replace", callback=instance_name, default=None, metavar="NAME",
              help="Stop instance NAME (the full verified stop) and start on its GPUs, "
                   "taking over its reservation; the new instance is NAME unless --name.")
@click.option("--gpu-probe", default="auto", envvar="VLLM_SUPERVISE_GPU_PROBE", hidden=True)
@click.option("--no-subreaper", is_flag=True, hidden=True)
@click.option("--no-guard", is_flag=True, hidden=True)
@click.option("--parent-death-signal", default="TERM", hidden=True)
@click.argument("model")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(model: str, vllm_args: tuple[str, ...], vllm_bin: str, **opts) -> None:
    """Run `vllm serve MODEL VLLM_ARGS...` under supervision.

    Supervisor options go before MODEL; everything after MODEL (or after `--`) is passed
    to vLLM untouched."""
    from vllm_supervisor.host.proctree import resolve_binary

    model, vllm_args = split_model(model, vllm_args)
    cfg = build_config(model, vllm_args, (resolve_binary(vllm_bin),), opts)
    opts["name"] = opts["name"] or opts["replace"] or default_name(model, cfg.health_port)
    run(cfg, opts)


@click.command()
@click.option("--scenario", type=click.Choice(["clean", "stubborn-engine", "orphaned-engine",
                                               "late-vram"]), default="clean",
              show_default=True, help="What the simulated vLLM does.")
@click.option("--serve-for", type=SECONDS, default=3.0, show_default=True, metavar="SECONDS",
              help="Serve this long after ready, then send the supervisor SIGTERM.")
@stop_options
def demo(scenario: str, serve_for: float, **opts) -> None:
    """The whole lifecycle over a built-in simulated vLLM (no vLLM, no GPU needed):
    start, ready, stop, report, with simulated VRAM on two simulated GPUs."""
    import tempfile

    from vllm_supervisor.cli.demo import demo_setup

    with tempfile.TemporaryDirectory(prefix="vllm-supervise-demo-") as tmp:
        setup = demo_setup(Path(tmp), scenario, serve_for)
        if opts["grace"] is None and scenario == "stubborn-engine":
            opts["grace"] = 3.0
        opts["gpu_probe"] = setup.probe
        # The demo's simulated GPUs are its own: so is its reservation table.
        opts["reservations_dir"] = opts["reservations_dir"] or Path(tmp) / "reservations"
        opts["name"] = "demo"  # one record and one report, whatever port the demo got
        cfg = build_config("demo/simulated-llm", setup.args, setup.cmd, opts, env=setup.env)
        run(cfg, opts, listeners=setup.listeners)


def split_model(model: str, vllm_args: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """MODEL and vLLM's own arguments (a leading `--` dropped); a usage error for an option
    where the model should be."""
    if vllm_args[:1] == ("--",):
        vllm_args = vllm_args[1:]
    if model.startswith("-"):
        raise UsageError(f"expected MODEL, got option {model!r}")
    if any("\0" in a for a in (model, *vllm_args)):
        raise UsageError("a NUL byte cannot be passed to vLLM (MODEL or its arguments)")
    return model, tuple(vllm_args)


def build_config(model: str, vllm_args, cmd, opts, **extra) -> Config:
    """The frozen settings of one run, from the parsed options (vLLM's own --port and
    --shutdown-timeout checked too)."""
    from vllm_supervisor.gpu.claim import claim_of

    scheme, host, port = health_target(vllm_args)
    grace = default_grace(vllm_args)  # refuses a --shutdown-timeout vLLM would refuse
    claim_of(tuple(vllm_args), opts["gpu_claim"])  # refuses sizes vLLM would refuse
    if opts["metrics_port"] is not None and opts["metrics_port"] == port:
        raise UsageError(f"--metrics-port {port} is vLLM's own --port: give another one")
    if not opts["metrics_host"].strip():
        raise UsageError("--metrics-host is empty")
    pdeath = opts.get("parent_death_signal", "TERM")
    return Config(
        model=model,
        vllm_args=tuple(vllm_args),
        vllm_cmd=tuple(cmd),
        grace_s=opts["grace"] if opts["grace"] is not None else grace,
        kill_wait_s=opts["kill_wait"],
        stop_signal=opts["stop_signal"],
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
        reservations=not opts["no_reservations"],
        gpu_wait_s=opts["gpu_wait"], gpu_claim=opts["gpu_claim"],
        startup_timeout_s=opts["startup_timeout"],
        stall_timeout_s=opts["stall_timeout"],
        health_interval_s=0.0 if opts["probe"] == "off" else opts["health_interval"],
        probe="off" if opts["health_interval"] == 0 else opts["probe"],
        probe_interval_s=opts["probe_interval"], probe_timeout_s=opts["probe_timeout"],
        probe_failures=opts["probe_failures"],
        health_failures=opts["health_failures"],
        restart=opts["restart"],
        max_restarts=opts["max_restarts"],
        metrics_port=opts["metrics_port"], metrics_host=opts["metrics_host"].strip(),
        metrics_linger_s=opts["metrics_linger"],
        parent_death_signal=None if pdeath.lower() == "none" else signal_number(pdeath),
        **extra,
    )


def run(cfg: Config, opts, listeners=()) -> None:
    """Supervise CFG (restarting per its policy), print the report, exit with its code."""
    from vllm_supervisor.cli.demo import resolve_probe
    from vllm_supervisor.cli.ui import Ui
    from vllm_supervisor.clock import SystemClock
    from vllm_supervisor.host.linux import LinuxHost
    from vllm_supervisor.instances import commands as instances
    from vllm_supervisor.lifecycle.exposition import REPLACE_PORT_WAIT_S, linger, serve_metrics
    from vllm_supervisor.lifecycle.metrics import RunMetrics
    from vllm_supervisor.lifecycle.restart import run_with_restarts
    from vllm_supervisor.lifecycle.supervisor import Supervisor

    probe = resolve_probe(opts["gpu_probe"], dict(os.environ) | dict(cfg.env or ()))
    log_file = open_log(cfg.log_file)
    ui = Ui(log_file, quiet=opts["quiet"])
    host, clock = LinuxHost(), SystemClock()
    host.block_signals()  # before the metrics thread: the loop takes the stop signals
    metrics = RunMetrics(opts.get("name") or cfg.model, cfg.model, cfg.url)
    runs: list[Supervisor] = []
    booking = server = None
    try:
        if not opts.get("replace"):  # up before the GPU admission, to be watched
            server = serve_metrics(cfg, metrics, host, clock, ui)
        booking = make_booking(cfg, opts, probe, ui)
        name_wait = 0.0
        if opts.get("replace"):
            from vllm_supervisor.lifecycle.handoff import replace

            replace(opts.get("state_dir"), opts["replace"], booking, probe, ui)
            name_wait = cfg.kill_wait_s  # the old supervisor's exit lets the name go
        registry = instances.claim(opts.get("state_dir"), opts.get("name"), cfg,
                                   opts.get("reclaim", False), probe, ui, wait_s=name_wait)
        if opts.get("replace"):  # the replaced supervisor held the port until its exit
            server = serve_metrics(cfg, metrics, host, clock, ui, REPLACE_PORT_WAIT_S)

        def once():
            runs.append(Supervisor(cfg, LinuxHost(), probe, ui, SystemClock(),
                                   registry=registry, log_file=log_file, listeners=listeners,
                                   booking=booking, metrics=metrics))
            return runs[-1].run()

        report = run_with_restarts(cfg, once, ui, host, clock, metrics)
        if booking is not None:
            booking.stopped(report.vram, final=True)
        _finish_run(cfg, report, ui, registry, log_file)
        runs[-1].reap_guard(GUARD_REAP_S)
    finally:
        if booking is not None:
            booking.finish()  # nothing launched, or released: the entry goes; held: kept
        # Everything on stdout/stderr went through the Ui's writer threads: give a slow
        # reader DRAIN_S, then go on (the report is in the files above); never wait longer.
        ui.drain()
    linger(server, cfg.metrics_linger_s, host, clock, ui)
    # The report, the record and the log file are written and closed. Tearing the
    # interpreter down (every module and object freed one by one: 30-60 ms here) would
    # only delay our exit, which systemd, Kubernetes or a script waits on: once Python's
    # exit handling has run (finally blocks, the demo's temporary folder), skip it.
    import atexit

    atexit.register(_exit_without_teardown, report.exit_code)
    sys.exit(report.exit_code)


def make_booking(cfg: Config, opts, probe, ui):
    """The run's GPU reservation (lifecycle/booking.py), or None with --no-reservations."""
    from vllm_supervisor.clock import SystemClock
    from vllm_supervisor.deploy.sdnotify import Notifier
    from vllm_supervisor.gpu.claim import claim_of
    from vllm_supervisor.gpu.reservations import default_dir, open_table
    from vllm_supervisor.host.linux import LinuxHost
    from vllm_supervisor.lifecycle.booking import Booking

    if not cfg.reservations:
        return None
    where, note = (opts["reservations_dir"], None) if opts.get("reservations_dir") \
        else default_dir(dict(os.environ))
    table = open_table(where)
    if note:
        ui.event(f"GPU reservations: {note}", "warn")
    return Booking(table, claim_of(cfg.vllm_args, cfg.gpu_claim), cfg, probe, ui, LinuxHost(),
                   SystemClock(), name=opts.get("name") or cfg.model, notify=Notifier())


def _finish_run(cfg: Config, report, ui, registry, log_file) -> None:
    """The report into the state dir, --report-json, stderr and the log file; none of
    them can block or raise on a dead terminal, a stalled reader or a full disk."""
    from vllm_supervisor.cli.render import print_report
    from vllm_supervisor.instances import commands as instances
    from vllm_supervisor.lifecycle.report import render_text, write_json

    text = render_text(report)
    instances.release(registry, report, text)
    if cfg.report_json:
        try:
            write_json(report, cfg.report_json)
        except OSError as e:
            ui.event(f"could not write {cfg.report_json}: {e.strerror}", "bad")
    print_report(ui, text, report.exit_code)
    if log_file:
        log_file.event(text)
        log_file.close()


def _exit_without_teardown(code: int) -> None:
    """End the process with CODE at once, after flushing Python's own stdout and stderr."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing more can reach it
    os._exit(code)


def open_log(path: Path | None):
    """The --log-file, opened for appending; a usage error when it cannot be."""
    from vllm_supervisor.host.logs import LogFile

    if path is None:
        return None
    try:
        return LogFile(path)
    except OSError as e:
        raise UsageError(f"cannot open --log-file {str(path)!r}: {e.strerror}") from None
