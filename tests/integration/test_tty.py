"""On a terminal: a live status line while starting; NO_COLOR turns colour off."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO


def _run_on_pty(env: dict, timeout: float = 60) -> tuple[int, bytes]:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vllm_supervisor", "demo", "--serve-for",
                             "0.3"], cwd=REPO, env=env, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    code = proc.wait(30)
    os.close(master)
    return code, out


@pytest.mark.timeout(120)
def test_live_status_and_colour_on_a_terminal(tmp_path):
    env = dict(os.environ, TERM="xterm", PYTHONPATH=str(REPO),
               VLLM_SUPERVISE_STATE_DIR=str(tmp_path / "state"))
    env.pop("NO_COLOR", None)
    code, out = _run_on_pty(env)
    assert code == 0, out[-2000:]
    assert b"\r\x1b[2K" in out and b"starting demo/simulated-llm" in out
    assert b"\x1b[1;32m" in out  # the green "ready" line


@pytest.mark.timeout(120)
def test_no_color_on_a_terminal_keeps_the_status_but_drops_colour(tmp_path):
    env = dict(os.environ, TERM="xterm", NO_COLOR="1", PYTHONPATH=str(REPO),
               VLLM_SUPERVISE_STATE_DIR=str(tmp_path / "state"))
    code, out = _run_on_pty(env)
    assert code == 0, out[-2000:]
    assert b"starting demo/simulated-llm" in out
    for sgr in (b"\x1b[1;3", b"\x1b[2m", b"\x1b[32m", b"\x1b[1m"):
        assert sgr not in out
