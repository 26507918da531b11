"""The operating commands: `print-unit`, `status`, `stop`, `cleanup`."""

from __future__ import annotations

import json
import os
import sys

import click

from vllm_supervisor.cli.options import SECONDS, state_dir_option
from vllm_supervisor.cli.serve import build_config, serve, split_model
from vllm_supervisor.errors import ExitCode, UsageError
from vllm_supervisor.instances.statedir import default_name
from vllm_supervisor.lifecycle.config import option_value


def _probe():
    from vllm_supervisor.cli.demo import resolve_probe

    return resolve_probe(os.environ.get("VLLM_SUPERVISE_GPU_PROBE", "auto"), dict(os.environ))


@click.command("print-unit", context_settings={"ignore_unknown_options": True,
                                             "allow_interspersed_args": False})
@click.argument("kind", type=click.Choice(["systemd", "docker", "kubernetes"]))
@click.option("--image", default="vllm-supervised:latest", show_default=True,
              help="Container image (docker, kubernetes).")
@click.option("--exe", default="/usr/local/bin/vllm-supervise", show_default=True,
              help="Path of vllm-supervise in the unit's ExecStart= (systemd).")
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def print_unit(kind: str, image: str, exe: str, serve_args: tuple[str, ...]) -> None:
    """Print a systemd unit, a docker run line or a Kubernetes Deployment for
    `serve SERVE_ARGS` (the same options and model), with stop budgets that cover the
    supervisor's grace, kill wait and VRAM wait."""
    from vllm_supervisor.deploy import units

    cfg, passthrough = unit_config(serve_args)
    name, state_dir = option_value(passthrough, "--name"), option_value(passthrough,
                                                                          "--state-dir")
    if kind == "systemd" and not name:  # the unit and its ExecStopPost= name the same
        name = default_name(cfg.model, cfg.health_port)
        passthrough += ["--name", name]
    if kind != "systemd" and cfg.metrics_port and not option_value(passthrough,
                                                                    "--metrics-host"):
        passthrough += ["--metrics-host", "0.0.0.0"]  # scraped from outside the container
    if cfg.grace_s < cfg.drain_s:
        click.echo(f"vllm-supervise: warning: --grace {cfg.grace_s:g} is shorter than vLLM's "
                   f"--shutdown-timeout {cfg.drain_s:g}: its drain will be cut by SIGKILL",
                   err=True)
    out = {"systemd": lambda: units.systemd_unit(cfg, passthrough, exe, name, state_dir),
           "docker": lambda: units.docker_run(cfg, passthrough, image),
           "kubernetes": lambda: units.kubernetes(cfg, passthrough, image)}[kind]()
    click.echo(out, nl=False)


def unit_config(serve_args: tuple[str, ...]):
    """The Config `serve SERVE_ARGS` would run, validated as `serve` validates it, and the
    supervisor options as given (everything before MODEL)."""
    ctx = serve.make_context("serve", list(serve_args), resilient_parsing=False)
    p = ctx.params
    model, raw_vllm_args = p.pop("model"), p.pop("vllm_args")
    if model.split("=", 1)[0] in ("--image", "--exe"):
        raise UsageError(f"{model.split('=', 1)[0]} is an option of print-unit itself: "
                         "put it before the kind (systemd, docker, kubernetes)")
    model, vllm_args = split_model(model, raw_vllm_args)
    if not p["vllm_bin"]:
        raise UsageError("--vllm-bin is empty")
    cfg = build_config(model, vllm_args, (p["vllm_bin"],), p)
    # MODEL and everything after it end the arguments: what precedes them is ours.
    return cfg, list(serve_args[:len(serve_args) - 1 - len(raw_vllm_args)])


@click.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@click.option("--watch", is_flag=True, help="Refresh every 2 s until Ctrl-C.")
@state_dir_option
def status(name: str | None, as_json: bool, watch: bool, state_dir) -> None:
    """Supervised instances: name, model, URL, state, uptime, processes, RSS, VRAM."""
    import signal as _signal
    import time

    from vllm_supervisor.instances import commands as instances

    probe = _probe()
    while True:
        rows, problems = instances.status_rows(state_dir, name, probe)
        gpus = _gpu_rows(probe)
        if as_json:
            instances.print_json({"instances": rows, "unreadable": problems, "gpus": gpus})
        else:
            if watch and sys.stdout.isatty():
                click.clear()
            click.echo(instances.render_status(rows, problems) + _render_gpus(gpus), nl=False)
        if not watch:
            return
        _signal.signal(_signal.SIGINT, lambda *_: sys.exit(0))
        time.sleep(2)


def _gpu_rows(probe) -> list[dict]:
    """Per GPU: total, baseline, used now, reservations (the table is read, never made)."""
    from vllm_supervisor.gpu.reservations import Table, default_dir, gpu_rows
    from vllm_supervisor.lifecycle.config import DEFAULT_VRAM_TOLERANCE_MIB

    if probe.available() is not None:
        return []
    where, _ = default_dir(dict(os.environ))
    readings = probe.read()
    if not where.is_dir():
        return gpu_rows(readings, [])
    return Table(where).gpu_rows(readings, DEFAULT_VRAM_TOLERANCE_MIB)


def _render_gpus(gpus: list[dict]) -> str:
    def gib(mib):
        return "N/A" if mib is None else f"{mib / 1024:.1f} GiB"
    out = []
    for g in gpus:
        out.append(f"GPU {g['gpu']} {g['uuid']}: total {gib(g['total_mib'])}, baseline "
                   f"{gib(g['baseline_mib'])}, used {gib(g['used_mib'])}, reserved "
                   f"{g['reserved']:.2f}")
        for h in g["reserved_by"]:
            who = f"pid {h['supervisor_pid']}" if h["live"] else \
                f"supervisor gone: {h['kept_because']}"
            out.append(f"    {h['fraction']:.2f} {h['name']} ({h['state']}, {who}, "
                       f"uid {h['uid']})")
    return "".join(line + "\n" for line in out)


@click.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Stop every recorded instance.")
@click.option("--grace", type=SECONDS, default=None, metavar="SECONDS",
              help="Grace before SIGKILL (default: the instance's own).")
@click.option("--missing-ok", is_flag=True,
              help="A name with no record is not an error (the unit's ExecStopPost=: after "
                   "a normal stop nothing is left to do).")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@state_dir_option
def stop(names: tuple[str, ...], all_: bool, grace: float | None, missing_ok: bool,
         as_json: bool, state_dir) -> None:
    """Stop instances by name: through their supervisor, which reports back; or, if the
    supervisor was killed, with the same stop sequence run from the instance record.
    Exit 1 when a stop is not complete, or its GPU memory did not come back."""
    from vllm_supervisor.instances import commands as instances

    if not names and not all_:
        raise UsageError("name an instance, or pass --all")
    results = instances.stop(state_dir, list(names), all_, grace, _probe())
    if missing_ok:
        results = [r for r in results if not r.get("missing")]
    if as_json:
        instances.print_json(results)
    for r in results if not as_json else []:
        if "text" in r:  # the supervisor's own stop report
            click.echo(r["text"], err=True, nl=False)
        else:
            click.echo(json.dumps(r), err=True)
    bad = [r for r in results if r.get("error") or r.get("survivors")
           or r.get("exit_code", 0) not in (0,)
           or str(r.get("vram", "")).startswith(("held", "unattributable"))]
    sys.exit(1 if bad else 0)


@click.command()
@click.option("--yes", is_flag=True, help="Kill without asking.")
@click.option("--all-users", is_flag=True, help="As root: also other users' processes.")
@click.option("--grace", type=SECONDS, default=None, metavar="SECONDS",
              help="Grace before SIGKILL (default: the instance's recorded grace; 10 s for "
                   "trees without a record).")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@state_dir_option
def cleanup(yes: bool, all_users: bool, grace: float | None, as_json: bool,
            state_dir) -> None:
    """Find vLLM trees nobody supervises (dead supervisors' trees, orphaned VLLM::*
    processes, `vllm serve` left running) and, with --yes or a confirmation, stop them."""
    from vllm_supervisor.instances import commands as instances
    from vllm_supervisor.instances import ops

    if all_users and os.geteuid() != 0:
        raise UsageError("--all-users needs root")
    probe = _probe()
    trees = instances.cleanup_candidates(state_dir, all_users)
    shown = [{"tree": t.label, "processes": ops.describe(t, probe)} for t in trees]
    if as_json and not yes:
        instances.print_json({"found": shown, "killed": []})
        return
    for t in shown if not as_json else []:
        click.echo(t["tree"])
        for p in t["processes"]:
            click.echo(f"    pid {p['pid']:<7} {p['title'][:40]:40} user {p['user']} age "
                       f"{p['age_s']} s  VRAM {', '.join(p['vram']) or '-'}  ports "
                       f"{','.join(map(str, p['ports'])) or '-'}")
    if not trees:
        if not as_json:
            click.echo("nothing to clean up")
        else:
            instances.print_json({"found": [], "killed": []})
        return
    if not yes:
        if not sys.stdin.isatty():
            click.echo("nothing killed: pass --yes (no terminal to confirm on)", err=True)
            return
        if not click.confirm(f"stop these {len(trees)} tree(s)?"):
            return
    results = instances.cleanup(state_dir, trees, grace, probe)
    if as_json:
        instances.print_json({"found": shown, "killed": results})
    else:
        for r in results:
            click.echo(f"{r['name']}: {'stopped' if r['complete'] else 'NOT complete'} "
                       f"({len(r['stopped_pids'])} processes, VRAM {r['vram']})")
    sys.exit(0 if all(r["complete"] for r in results) else ExitCode.SURVIVED_SIGKILL)
