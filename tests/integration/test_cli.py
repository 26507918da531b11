"""The command line: bad input, missing binaries, the exit-code table, the demo."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.helpers import cli


@pytest.mark.parametrize("args", [
    ("serve", "--bogus-option", "m"),
    ("serve", "--grace", "-3", "m"),
    ("serve", "--grace", "soon", "m"),
    ("serve",),
    ("serve", "--stop-signal", "SIGNOPE", "m"),
    ("serve", "m", "--port", "eighty"),
    ("frobnicate",),
])
def test_bad_input_is_one_line_and_exit_2(args, fake_vllm_env):
    res = cli(*args, env=fake_vllm_env)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vllm-supervise: error:"), res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_missing_vllm_binary_exit_127_with_hint(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    res = cli("serve", "m", env=env)
    assert res.returncode == 127
    assert len(res.stderr.strip().splitlines()) == 1
    assert "hint:" in res.stderr and "--vllm-bin" in res.stderr


def test_vllm_binary_not_executable_exit_126(tmp_path, fake_vllm_env):
    f = tmp_path / "vllm-noexec"
    f.write_text("#!/bin/sh\n")
    res = cli("serve", "--vllm-bin", str(f), "m", env=fake_vllm_env)
    assert res.returncode == 126 and "not executable" in res.stderr


def test_vllm_bin_from_environment_variable(tmp_path, fake_vllm_env):
    env = dict(fake_vllm_env, VLLM_SUPERVISE_VLLM_BIN=str(tmp_path / "nowhere" / "vllm"))
    res = cli("serve", "m", env=env)
    assert res.returncode == 127 and "nowhere" in res.stderr


def test_help_and_module_entry_point():
    res = cli("serve", "--help")
    assert res.returncode == 0 and "--grace" in res.stdout
    assert cli("--version").stdout.strip().endswith("0.1.0")


def test_demo_runs_the_whole_lifecycle(tmp_path):
    report = tmp_path / "demo.json"
    env = dict(os.environ, VLLM_SUPERVISE_STATE_DIR=str(tmp_path / "state"))
    res = cli("demo", "--serve-for", "0.5", "--report-json", str(report), timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    rep = json.loads(report.read_text())
    assert rep["ready"] and rep["requested"] and rep["vram"]["status"] == "released"
    titles = " ".join(p["title"] for p in rep["processes"])
    assert "VLLM::EngineCore" in titles and "VLLM::Worker_TP" in titles
    assert "stop report" in res.stderr and "\x1b[" not in res.stderr  # no TTY: no ANSI


def test_shm_files_the_tree_never_used_are_reported_not_removed(supervise, tmp_path):
    """A psm_* file made during the run by someone else: named in the report, left alone."""
    run = supervise()
    run.wait_ready()
    stranger = Path(f"/dev/shm/psm_not_the_trees_{os.getpid()}")
    stranger.write_text("x")
    try:
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
        rep = run.report()
        assert str(stranger) in rep["leftovers_unattributed"]
        assert str(stranger) not in rep["leftovers_removed"] and stranger.exists()
    finally:
        stranger.unlink(missing_ok=True)
