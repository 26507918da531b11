"""Arbitrary text for every option of `serve`, `print-unit`, `stop` and `cleanup`: parsed
(no process is ever started), it is either refused as a usage error or accepted as finite
numbers; no other exception escapes."""

from __future__ import annotations

import math

import click
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vllm_supervisor.cli.ops import cleanup, stop, unit_config
from vllm_supervisor.cli.serve import serve
from vllm_supervisor.errors import SupervisorError

REFUSED = (click.UsageError, click.BadParameter, SupervisorError)
NUMBERISH = st.sampled_from(["0", "1", "-1", "nan", "inf", "-inf", "1e309", "1e-400", "1_0",
                             str(10**30), "9" * 5000, " 5 ", "0x10", "٣", "", "65535",
                             "65536"])
VALUES = st.one_of(st.text(max_size=30), NUMBERISH)


def _value_options(command: click.Command) -> list[str]:
    return [p.opts[0] for p in command.params
            if isinstance(p, click.Option) and not p.is_flag and p.opts[0] != "--help"]


def _assert_finite(params: dict) -> None:
    for key, value in params.items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
        if isinstance(value, int) and not isinstance(value, bool):
            assert abs(value) <= 10**7, (key, value)


def _config_numbers(cfg) -> dict:
    return {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float))}


@pytest.mark.parametrize("option", _value_options(serve))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=VALUES, vllm_port=VALUES, drain=VALUES)
def test_serve_and_print_unit_refuse_or_accept_finite(option, value, vllm_port, drain):
    args = (option, value, "m", "--", "--port", vllm_port, "--shutdown-timeout", drain)
    try:
        cfg, _ = unit_config(args)  # serve.make_context, then build_config
    except REFUSED:
        return
    _assert_finite(_config_numbers(cfg))


def _pairs(command: click.Command):
    return st.lists(st.tuples(st.sampled_from(_value_options(command)), VALUES), max_size=3)


@pytest.mark.parametrize("command", [stop, cleanup])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
@example(data=None)
def test_stop_and_cleanup_options_refuse_or_accept_finite(command, data):
    pairs = [("--state-dir", "\0")] if data is None else data.draw(_pairs(command))
    args = [word for pair in pairs for word in pair]
    try:
        ctx = command.make_context(command.name, args)
    except REFUSED:
        return
    _assert_finite(ctx.params)


def test_serves_paths_refuse_nul_and_empty():
    for option in ("--state-dir", "--report-json", "--log-file"):
        for value in ("\0", "a\0b", "", " "):
            with pytest.raises(click.BadParameter):
                serve.make_context("serve", [option, value, "m"])
