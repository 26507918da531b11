"""vLLM's output is always drained, whatever happens to the supervisor's stdout, stderr,
log file or terminal, and the stop never waits on a reader. Real supervisors, real fds."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    REPO,
    TreeRecorder,
    free_port,
    http_get,
    kill_all,
    still_alive,
    wait_until,
)

FLOOD = {"FAKE_VLLM_LOG_LINES": "200000"}


def _warnings(run, dest: str) -> list[str]:
    return [x for x in run.stderr_lines if f"warning: {dest}:" in x]


@pytest.mark.timeout(120)
def test_stdout_on_dev_full_vllm_floods_to_ready_and_the_stop_is_clean(supervise):
    with open("/dev/full", "wb") as full:
        run = supervise(stdout=full, env=FLOOD)
    run.wait_ready()
    run.wait_for("log flood done")
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    lost = run.report()["output_lost"]["stdout"]
    assert lost["lines"] >= 200_000 and lost["why"] == "ENOSPC: no space left"
    assert len(_warnings(run, "stdout")) == 1
    assert "output      lost" in run.stderr()
    run.assert_all_gone()


@pytest.mark.timeout(120)
def test_stdout_pipe_nobody_reads_does_not_block_vllms_flood_or_the_stop(supervise):
    r, w = os.pipe()  # we hold the read end open and never read it
    try:
        run = supervise("--grace", "10", stdout=w,
                        env={"FAKE_VLLM_LOG_LINES": "1000000"})  # ~15 MB: over 4 MiB
        os.close(w)
        run.wait_ready()
        run.wait_for("log flood done", timeout=60)  # vLLM's own stderr: it was not blocked
        run.signal(signal.SIGTERM)
        assert run.finish() == 0  # 0: vLLM ended within the grace
    finally:
        os.close(r)
    lost = run.report()["output_lost"]["stdout"]
    assert lost["why"].startswith("reader too slow") and lost["lines"] > 500_000
    run.assert_all_gone()


def _spawn(fake_vllm_env, tmp_path, *args, stdout, stderr, stdin=subprocess.DEVNULL,
           env=None) -> tuple[subprocess.Popen, TreeRecorder, int]:
    port = free_port()
    e = dict(fake_vllm_env, **(env or {}))
    argv = [sys.executable, "-m", "vllm_supervisor", "serve", "--gpu-probe", "none",
            "--report-json", str(tmp_path / "report.json"), *args, "fake/model", "--port",
            str(port)]
    proc = subprocess.Popen(argv, env=e, cwd=REPO, stdin=stdin, stdout=stdout, stderr=stderr,
                            start_new_session=True)
    rec = TreeRecorder(proc.pid)
    rec.start()
    return proc, rec, port


def _reap(proc: subprocess.Popen, rec: TreeRecorder) -> list[int]:
    """End what this test started (by PID), and say what was still alive."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    rec.stop()
    seen = dict(rec.seen)
    left = still_alive(seen, timeout=3)
    kill_all({p: seen[p][0] for p in left})
    return left


def _fill(fd: int) -> None:
    """Fill the pipe behind FD (ours, before any child shares it) to the brim."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(fd, b"z" * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)  # the supervisor's stderr blocks, as it would


@pytest.mark.timeout(120)
def test_full_stderr_pipe_nobody_reads_does_not_hold_up_the_stop(fake_vllm_env, tmp_path):
    r, w = os.pipe()
    _fill(w)
    proc, rec, port = _spawn(fake_vllm_env, tmp_path, "--grace", "10",
                             stdout=subprocess.DEVNULL, stderr=w)
    os.close(w)
    try:
        wait_until(lambda: http_get(port)[0] == 200, 30, "vLLM ready")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        report = json.loads((tmp_path / "report.json").read_text())
        # Our events fit in the writer's buffer: queued, never written, abandoned at exit.
        assert report["exit_code"] == 0 and report["reason"].startswith("SIGTERM")
    finally:
        os.close(r)
        assert not _reap(proc, rec)


@pytest.mark.timeout(120)
def test_log_file_on_dev_full_is_one_warning_and_vllm_is_drained(supervise):
    run = supervise("--log-file", "/dev/full", env=FLOOD)
    run.wait_ready()
    run.wait_for("log flood done")
    run.signal(signal.SIGTERM)
    assert run.finish() == 0
    lost = run.report()["output_lost"]["log file"]
    assert lost["lines"] >= 200_000 and lost["why"] == "ENOSPC: no space left"
    assert len(_warnings(run, "log file")) == 1
    run.assert_all_gone()


def _read_until(master: int, text: bytes, timeout: float) -> bytes:
    """What the terminal showed, up to and including TEXT."""
    out = b""
    deadline = time.monotonic() + timeout
    while text not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} not seen on the terminal: {out[-2000:]!r}"
        if select.select([master], [], [], left)[0]:
            out += os.read(master, 65536)
    return out


@pytest.mark.timeout(120)
def test_hangup_ends_in_a_complete_stop_with_its_report(fake_vllm_env, tmp_path):
    master, slave = pty.openpty()
    log = tmp_path / "vllm.log"
    env = dict(TERM="xterm", **FLOOD)
    proc, rec, _ = _spawn(fake_vllm_env, tmp_path, "--name", "hup", "--log-file", str(log),
                          stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    try:
        _read_until(master, b"ready: ", 30)
        os.close(master)  # the terminal is gone: every write to it now fails with EIO
        master = -1
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.wait(30) == 0
        report = json.loads((tmp_path / "report.json").read_text())
        state = tmp_path / "state" / "hup.report.json"
        assert json.loads(state.read_text())["exit_code"] == 0
        assert report["reason"].startswith("SIGHUP")
        assert "EIO" in report["output_lost"]["stderr"]["why"]
        text = log.read_text()
        assert "Traceback" not in text and "stop report" in text
        assert "warning: stderr: EIO: terminal gone" in text
    finally:
        if master >= 0:
            os.close(master)
        assert not _reap(proc, rec)
