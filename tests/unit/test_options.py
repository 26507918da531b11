"""Every number an option takes is finite and bounded, 0 means one stated thing, the stop
signal can start a shutdown, and the small checks made before anything is launched."""

from __future__ import annotations

import os
import stat

import click
import pytest

from tests.unit.fakehost import Spec
from tests.unit.lifecycle_kit import kit
from vllm_supervisor.cli.ops import unit_config
from vllm_supervisor.cli.serve import build_config, serve, split_model
from vllm_supervisor.deploy.sdnotify import MIN_WATCHDOG_S, Notifier
from vllm_supervisor.errors import ExitCode, LaunchError, SupervisorError
from vllm_supervisor.host.proctree import resolve_binary
from vllm_supervisor.instances.statedir import default_name as default_instance_name
from vllm_supervisor.lifecycle.machine import State


def parse(*args: str):
    """The Config `serve ARGS` builds, without launching anything."""
    ctx = serve.make_context("serve", list(args))
    p = ctx.params
    model, vllm_args = split_model(p.pop("model"), p.pop("vllm_args"))
    return build_config(model, vllm_args, ("vllm",), p)


DURATIONS = ["--grace", "--kill-wait", "--vram-timeout", "--vram-poll", "--vram-tolerance",
             "--startup-timeout", "--stall-timeout", "--health-interval"]


@pytest.mark.parametrize("option", DURATIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309", "1e30", "-1", "soon", ""])
def test_a_duration_that_is_not_a_finite_bounded_number_is_refused(option, value):
    with pytest.raises(click.BadParameter):
        parse(option, value, "m")


@pytest.mark.parametrize("option", ["--max-restarts", "--health-failures"])
@pytest.mark.parametrize("value", [str(10**30), "1e3", "inf", "nan", "-1", "9" * 5000])
def test_a_count_that_is_huge_or_not_an_integer_is_refused(option, value):
    with pytest.raises(click.BadParameter):
        parse(option, value, "m")


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "abc", "1e400", str(10**30)])
def test_vllms_shutdown_timeout_never_makes_the_grace_infinite(value):
    with pytest.raises(SupervisorError, match="--shutdown-timeout"):
        parse("m", "--", "--shutdown-timeout", value)
    with pytest.raises(SupervisorError, match="--shutdown-timeout"):
        parse("--grace", "5", "m", "--shutdown-timeout=" + value)
    assert parse("m", "--shutdown-timeout", "60").grace_s == 80.0


@pytest.mark.parametrize("port", ["0", "65536", str(10**30), "inf", "8e3", ""])
def test_vllms_port_must_be_a_port(port):
    with pytest.raises(SupervisorError, match="--port"):
        parse("m", "--port", port)


@pytest.mark.parametrize("sig", ["KILL", "STOP", "CHLD", "CONT", "TSTP", "TTIN", "TTOU",
                                 "WINCH", "URG", "PIPE", "SEGV", "NOPE", "15"])
def test_a_stop_signal_that_cannot_start_a_shutdown_is_refused_with_the_list(sig):
    with pytest.raises(click.BadParameter, match="TERM, INT, HUP, QUIT, USR1, USR2"):
        parse("--stop-signal", sig, "m")


@pytest.mark.parametrize("sig,number", [("TERM", 15), ("sigint", 2), ("SIGHUP", 1),
                                        ("quit", 3), ("USR1", 10), ("usr2", 12)])
def test_the_shutdown_signals_are_accepted_in_any_spelling(sig, number):
    assert parse("--stop-signal", sig, "m").stop_signal == number


def test_report_json_into_a_missing_folder_is_refused_before_the_run(tmp_path):
    with pytest.raises(click.BadParameter, match="does not exist"):
        parse("--report-json", str(tmp_path / "missing" / "r.json"), "m")
    assert parse("--report-json", str(tmp_path / "r.json"), "m").report_json


@pytest.mark.parametrize("name", ["-x", "a/b", "", "x.lock", "é"])
def test_a_bad_instance_name_is_refused_at_parse_time(name):
    with pytest.raises(click.BadParameter):
        parse("--name", name, "m")


@pytest.mark.parametrize("model,name", [
    ("Qwen/Qwen3-0.6B", "Qwen3-0.6B-8000"), ("org/Modèle-7B", "Modele-7B-8000"),
    ("org/模型", "vllm-8000"), ("/models/ünïcode/", "unicode-8000"), ("-.x._", "x-8000"),
])
def test_the_default_name_is_ascii_and_valid(model, name):
    from vllm_supervisor.instances.statedir import check_name

    assert default_instance_name(model, 8000) == name == check_name(name)


def test_print_unit_config_is_serves_and_keeps_the_options_before_the_model():
    cfg, passthrough = unit_config(("--name", "q", "--grace", "3", "q", "--", "--port", "9"))
    assert passthrough == ["--name", "q", "--grace", "3"] and cfg.model == "q"
    assert cfg.health_port == 9 and cfg.grace_s == 3.0
    for bad in [("--image", "x", "m"), ("--bogus-option", "m"), ("--vllm-bin", "", "m")]:
        with pytest.raises(SupervisorError):
            unit_config(bad)


def test_startup_and_stall_timeout_0_mean_no_limit():
    k = kit(Spec(ready_after=None), startup_timeout_s=0.0, stall_timeout_s=0.0)
    k.host.send_supervisor(2000.0)  # past the defaults: stall 300 s, startup 1800 s
    r = k.run()
    assert r.requested and r.exit_code == 0 and not r.ready
    assert not any("startup hang" in msg for msg, _ in k.ui.events)
    assert k.edges.at(State.STOPPING) == pytest.approx(1000.0 + 2000.0, abs=0.5)  # clock at 1000


def test_startup_timeout_still_applies_when_the_stall_watch_is_off():
    k = kit(Spec(ready_after=None), startup_timeout_s=50.0, stall_timeout_s=0.0)
    r = k.run()
    assert r.exit_code == 3 and "--startup-timeout 50" in r.exit_meaning


@pytest.mark.parametrize("usec,expected", [("1", MIN_WATCHDOG_S), ("50000", MIN_WATCHDOG_S),
                                           ("4000000", 4.0), ("²", None), ("-5", None)])
def test_a_tiny_watchdog_interval_is_floored(usec, expected):
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": usec})
    assert n.watchdog_s == expected


def _exe(path, data: bytes):
    path.write_bytes(data)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize("data,why", [
    (b"#!/nope\n", "its #! line names /nope, which does not exist"),
    (b"#!\n", "names no interpreter"),
    (b"echo hi\n", "neither an ELF binary nor a script"),
    (b"", "neither an ELF binary nor a script"),
])
def test_a_binary_that_cannot_run_is_exit_126_and_says_why(tmp_path, data, why):
    with pytest.raises(LaunchError, match=why) as e:
        resolve_binary(_exe(tmp_path / "vllm", data))
    assert e.value.exit_code == ExitCode.NOT_EXECUTABLE


def test_an_empty_binary_path_is_126_and_good_binaries_pass(tmp_path):
    with pytest.raises(LaunchError) as e:
        resolve_binary("")
    assert e.value.exit_code == ExitCode.NOT_EXECUTABLE
    script = _exe(tmp_path / "vllm", b"#!/bin/sh -e\nexit 0\n")
    assert resolve_binary(script) == script
    elf = _exe(tmp_path / "elf", b"\x7fELF" + b"\0" * 60)
    assert resolve_binary(elf) == elf
    assert os.path.isabs(resolve_binary("sh"))
