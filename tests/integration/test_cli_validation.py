"""Bad input through the real command line: one line and exit 2 before anything is
launched; a vLLM binary that cannot run is 126 and says why; print-unit refuses what serve
refuses, and what it prints passes systemd-analyze verify."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import cli


def _one_line(res, code: int = 2) -> str:
    assert res.returncode == code, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vllm-supervise: error:"), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    return lines[0]


@pytest.mark.parametrize("args", [
    ("serve", "--grace", "nan", "m"),
    ("serve", "--startup-timeout", "inf", "m"),
    ("serve", "--max-restarts", str(10**30), "m"),
    ("serve", "--health-failures", "1e3", "m"),
    ("serve", "--stop-signal", "KILL", "m"),
    ("serve", "m", "--", "--shutdown-timeout", "inf"),
    ("serve", "m", "--port", str(10**30)),
    ("serve", "--name", "../x", "m"),
    ("demo", "--serve-for", "1e309"),
    ("demo", "--kill-wait", "0"),
    ("stop", "--grace", "inf", "x"),
    ("cleanup", "--grace", "nan"),
    ("print-unit", "systemd", "--bogus-option", "m"),
    ("print-unit", "systemd", "--image", "x", "m"),
    ("print-unit", "systemd", "--stop-signal", "STOP", "m"),
    ("print-unit", "systemd", "m", "--", "--shutdown-timeout", "inf"),
    ("print-unit", "systemd", "m", "--", "--x", "a\nb"),
    ("print-unit", "--exe", "relative", "systemd", "m"),
    ("print-unit", "kubernetes", "--vllm-bin", "", "m"),
])
def test_bad_numbers_signals_and_unit_input_are_one_line_exit_2(args, fake_vllm_env):
    _one_line(cli(*args, env=fake_vllm_env))


def test_report_json_into_a_missing_folder_is_refused_before_launch(tmp_path, fake_vllm_env):
    marker = tmp_path / "launched"
    vllm = tmp_path / "vllm-marker"
    vllm.write_text(f"#!/bin/sh\ntouch {marker}\n")
    vllm.chmod(0o755)
    line = _one_line(cli("serve", "--vllm-bin", str(vllm), "--report-json",
                         str(tmp_path / "nope" / "r.json"), "m", env=fake_vllm_env))
    assert "does not exist" in line and not marker.exists()


@pytest.mark.parametrize("content,why", [
    ("#!/nope\n", "its #! line names /nope, which does not exist"),
    ("just text\n", "neither an ELF binary nor a script"),
])
def test_a_vllm_binary_that_cannot_run_is_126_and_says_why(tmp_path, fake_vllm_env,
                                                            content, why):
    vllm = tmp_path / "vllm-bad"
    vllm.write_text(content)
    vllm.chmod(0o755)
    assert why in _one_line(cli("serve", "--vllm-bin", str(vllm), "m", env=fake_vllm_env), 126)
    assert "empty" in _one_line(cli("serve", "--vllm-bin", "", "m", env=fake_vllm_env), 126)


def test_a_unit_with_quotes_specifiers_and_dollars_passes_systemd_analyze(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    exe = tmp_path / "vllm-supervise"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    res = cli("print-unit", "--exe", str(exe), "systemd", "--name", "q", "org/100%-m", "--",
              "--port", "8000", "--chat-template", 'say "hi" to $USER at 100% ;', ";", "")
    assert res.returncode == 0, res.stderr
    unit = tmp_path / "vllm-test.service"
    unit.write_text(res.stdout)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
