"""What print-unit writes parses back to exactly the argv it stands for: ExecStart= split
with systemd's rules, the Kubernetes command as JSON/YAML strings, the docker line with shlex."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_supervisor.cli.ops import unit_config
from vllm_supervisor.deploy import units
from vllm_supervisor.errors import UsageError

C_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "s": " "}


def systemd_split(line: str) -> list[str]:
    """ExecStart='s words as systemd reads them: words split on whitespace, double quotes
    with C escapes, then `%%` -> `%` and `$$` -> `$` (any other specifier or variable
    would be expanded by systemd: fail)."""
    words, i = [], 0
    while i < len(line):
        if line[i] in " \t":
            i += 1
            continue
        word, quoted = "", line[i] == '"'
        i += quoted
        while i < len(line) and (quoted or line[i] not in " \t"):
            c = line[i]
            if quoted and c == '"':
                i += 1
                break
            if c == "\\":
                word += C_ESCAPES[line[i + 1]]
                i += 2
                continue
            word += c
            i += 1
        words.append(word)
    return [_unspecify(w) for w in words]


def _unspecify(word: str) -> str:
    for mark in "%$":
        assert not re.search(re.escape(mark) + r"(?!" + re.escape(mark) + ")",
                             word.replace(mark * 2, "")), f"{mark} would expand in {word!r}"
    return word.replace("%%", "%").replace("$$", "$")


def exec_start(unit: str) -> str:
    return next(line for line in unit.split("\n") if line.startswith("ExecStart="))[10:]


NASTY = ["a b", 'say "hi"', "it's", "100%", "%n", "$HOME", "${X}", "back\\slash", "end\\",
         ";", "", "ü€😀", "-- --x", "a\u2028b", "\t"[:0] + "tab-free", "$$", "%%"]


def unit_for(*vllm_args: str, kind: str = "systemd", model: str = "org/m", exe: str = "/x/vs"):
    cfg, passthrough = unit_config(("--name", "n", model, "--", *vllm_args))
    if kind == "systemd":
        return cfg, passthrough, units.systemd_unit(cfg, passthrough, exe, "n")
    if kind == "docker":
        return cfg, passthrough, units.docker_run(cfg, passthrough, "img:1")
    return cfg, passthrough, units.kubernetes(cfg, passthrough, "img:1")


def test_execstart_splits_back_to_the_exact_argv():
    cfg, passthrough, unit = unit_for(*NASTY, model="org/100%$m")
    assert systemd_split(exec_start(unit)) == ["/x/vs", "serve", *passthrough, cfg.model, "--",
                                               *NASTY]
    assert "Description=vLLM serving org/100%%$m " in unit


def test_kubernetes_command_elements_are_json_strings():
    cfg, passthrough, manifest = unit_for(*NASTY, kind="kubernetes")
    line = next(s for s in manifest.splitlines() if s.strip().startswith("command:"))
    assert json.loads(line.split(":", 1)[1]) == ["vllm-supervise", "serve", *passthrough,
                                                 cfg.model, "--", *NASTY]
    assert "\u2028" not in manifest
    try:
        import yaml
    except ImportError:
        return
    spec = yaml.safe_load(manifest)["spec"]["template"]["spec"]["containers"][0]
    assert spec["command"][-len(NASTY):] == NASTY


def test_docker_line_splits_back_with_shlex():
    cfg, passthrough, line = unit_for(*NASTY, kind="docker")
    argv = ["--entrypoint", "vllm-supervise", "img:1", "serve", *passthrough, cfg.model, "--",
            *NASTY]
    assert shlex.split(line)[-len(argv):] == argv


@pytest.mark.parametrize("kind", ["systemd", "docker", "kubernetes"])
@pytest.mark.parametrize("bad", ["a\nb", "x\r", "\x00", "\x1b[31m", "\x7f", "\x85"])
def test_control_characters_are_refused(kind, bad):
    with pytest.raises(UsageError, match="control character|NUL"):
        unit_for("--x", bad, kind=kind)


@pytest.mark.parametrize("exe", ["vllm-supervise", "-/x", "@/x", "/x\nExecStop=/bin/rm"])
def test_exe_must_be_an_absolute_plain_path(exe):
    with pytest.raises(UsageError):
        unit_for("--x", exe=exe)


def test_startup_timeout_0_has_no_start_limit_anywhere():
    cfg, passthrough = unit_config(("--startup-timeout", "0", "m"))
    assert "TimeoutStartSec=infinity\n" in units.systemd_unit(cfg, passthrough, "/x", "n")
    manifest = units.kubernetes(cfg, passthrough, "img")
    assert "startupProbe" not in manifest and "failureThreshold" not in manifest


printable = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=20)


@settings(max_examples=60, deadline=None)
@given(st.lists(printable, max_size=5), printable.filter(lambda m: m[:1] not in ("", "-")))
def test_any_printable_argv_round_trips(args, model):
    try:
        cfg, passthrough = unit_config(("--name", "n", model, "--", *args))
    except UsageError:
        return  # a NUL, or a --port/--shutdown-timeout vLLM would refuse too
    argv = ["serve", *passthrough, model, "--", *args]
    assert systemd_split(exec_start(units.systemd_unit(cfg, passthrough, "/x", "n")))[1:] == argv
    manifest = units.kubernetes(cfg, passthrough, "img")
    line = next(s for s in manifest.splitlines() if s.strip().startswith("command:"))
    assert json.loads(line.split(":", 1)[1])[1:] == argv
    assert shlex.split(units.docker_run(cfg, passthrough, "img"))[-len(argv):] == argv


def test_the_wait_for_the_gpus_is_part_of_every_start_budget():
    cfg, passthrough = unit_config(("--gpu-wait", "100", "--startup-timeout", "600", "m"))
    assert "TimeoutStartSec=715\n" in units.systemd_unit(cfg, passthrough, "/x", "n")
    assert "failureThreshold: 71\n" in units.kubernetes(cfg, passthrough, "img")
    cfg, passthrough = unit_config(("--gpu-wait", "100", "--no-reservations",
                                    "--startup-timeout", "600", "m"))
    assert "TimeoutStartSec=615\n" in units.systemd_unit(cfg, passthrough, "/x", "n")


def _print_unit(*args: str) -> str:
    from click.testing import CliRunner

    from vllm_supervisor.cli.app import cli

    res = CliRunner().invoke(cli, ["print-unit", *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_kubernetes_with_metrics_binds_every_address_and_asks_to_be_scraped():
    out = _print_unit("kubernetes", "--metrics-port", "9464", "--metrics-linger", "20", "m",
                      "--", "--port", "8000")
    assert '"--metrics-port", "9464", "--metrics-linger", "20", "--metrics-host", "0.0.0.0"' in out
    assert ('      annotations:\n        prometheus.io/scrape: "true"\n'
            '        prometheus.io/port: "9464"\n        prometheus.io/path: "/metrics"\n') in out
    assert "ports: [{containerPort: 8000}, {containerPort: 9464, name: metrics}]" in out
    assert "terminationGracePeriodSeconds: 95\n" in out  # 20 + 10 + 30 + linger 20 + 15
    assert "metrics linger 20 s" in out


def test_kubernetes_keeps_an_explicit_metrics_host_and_asks_nothing_without_a_port():
    out = _print_unit("kubernetes", "--metrics-port", "9464", "--metrics-host", "10.0.0.5", "m")
    assert '"--metrics-host", "10.0.0.5"' in out and "0.0.0.0" not in out
    plain = _print_unit("kubernetes", "m")
    assert "prometheus.io" not in plain and "name: metrics" not in plain


def test_docker_publishes_the_metrics_port_and_systemd_budgets_the_linger():
    out = _print_unit("docker", "--metrics-port", "9464", "m")
    assert " -p 9464:9464 " in out and "--metrics-host 0.0.0.0" in out
    unit = _print_unit("systemd", "--metrics-port", "9464", "--metrics-linger", "5", "m")
    assert "TimeoutStopSec=80\n" in unit and "--metrics-host" not in unit
