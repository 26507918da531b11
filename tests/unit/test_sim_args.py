"""The simulated vLLM's command line (its behaviour as processes: tests/sim/)."""

from __future__ import annotations

import pytest

from vllm_supervisor.sim.server import UsageError, parse_args


@pytest.mark.parametrize(("argv", "expected"), [
    ("serve m --port 9 -tp 2", ("m", "0.0.0.0", 9, 2, 0.0)),
    ("serve --dtype=auto m --port=9 --tensor-parallel-size=4", ("m", "0.0.0.0", 9, 4, 0.0)),
    ("serve --host 127.0.0.1 --enforce-eager --model x --shutdown-timeout 5",
     ("x", "127.0.0.1", 8000, 1, 5.0)),
])
def test_parse_args(argv, expected):
    cfg = parse_args(argv.split())
    assert (cfg.model, cfg.host, cfg.port, cfg.tp, cfg.shutdown_timeout) == expected


@pytest.mark.parametrize("argv", ["", "run m", "serve", "serve m --port", "serve m -tp zero"])
def test_parse_args_rejects(argv):
    with pytest.raises(UsageError):
        parse_args(argv.split())
