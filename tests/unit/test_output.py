"""Our stdout/stderr writer threads and the log file: a stalled reader, a reader gone or a
full disk cost dropped (and counted) output, never a blocked caller or a dead thread.
Real pipes and real fds; no sleeps."""

from __future__ import annotations

import fcntl
import os

import pytest

from vllm_supervisor.cli.ui import Ui
from vllm_supervisor.host.logs import LOG_DEST, LogFile, StreamPump
from vllm_supervisor.host.output import FULL, FdWriter, Losses, Output


@pytest.fixture
def pipe():
    """A pipe (read end, write end) of 64 KiB, closed at the end."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 65536)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def read_all(fd: int) -> bytes:
    out = []
    while chunk := os.read(fd, 1 << 20):
        out.append(chunk)
    return b"".join(out)


@pytest.mark.timeout(20)
def test_a_reader_that_never_reads_costs_dropped_chunks_not_a_blocked_caller(pipe):
    _r, w = pipe
    losses = Losses()
    writer = FdWriter({"stdout": w}, losses, limit=256 * 1024)
    writer.start()
    chunk = b"x" * 1023 + b"\n"
    accepted = sum(writer.put("stdout", chunk) for _ in range(4096))  # 4 MiB into 64+256 KiB
    assert 0 < accepted < 4096
    assert not writer.drain(0.05)  # the reader is stalled: the wait is bounded
    lost = losses.snapshot()["stdout"]
    assert lost.why == FULL
    assert lost.bytes == (4096 - accepted) * len(chunk) and lost.lines == 4096 - accepted
    assert losses.take_warnings() == [("stdout", FULL)] and losses.take_warnings() == []


@pytest.mark.timeout(20)
def test_reader_gone_is_one_warning_and_every_later_byte_counted(pipe):
    r, w = pipe
    os.close(r)
    losses = Losses()
    writer = FdWriter({"stderr": w}, losses)
    writer.start()
    for i in range(100):
        writer.put("stderr", b"line %d\n" % i)
    assert writer.drain(10)
    lost = losses.snapshot()["stderr"]
    assert lost.lines == 100 and lost.why == "EPIPE: reader gone"
    assert losses.take_warnings() == [("stderr", "EPIPE: reader gone")]
    writer.put("stderr", b"after\n")  # failed: counted at once, no new warning
    assert losses.snapshot()["stderr"].lines == 101 and not losses.take_warnings()


@pytest.mark.timeout(20)
def test_stdout_and_stderr_on_one_pipe_keep_their_order(pipe):
    r, w = pipe
    w2 = os.dup(w)
    out = Output(Losses(), fds={"stdout": w, "stderr": w2})
    expected = []
    for i in range(2000):
        stream = "stdout" if i % 3 else "stderr"
        data = b"%s %d\n" % (stream.encode(), i)
        expected.append(data)
        assert out.put(stream, data)
        if i % 50 == 0:
            assert out.drain(10)  # keep within the pipe: this test reads only at the end
            expected_bytes = b"".join(expected)
            assert os.read(r, len(expected_bytes) + 1) == expected_bytes
            expected.clear()
    assert out.drain(10)
    os.close(w2)
    os.close(w)
    assert read_all(r) == b"".join(expected)


@pytest.mark.timeout(20)
def test_log_file_on_a_full_disk_counts_lines_and_never_raises(tmp_path):
    lf = LogFile("/dev/full")
    lf.feed("stdout", b"a\n" * 100_000)  # over the 64 KiB buffer: a write, ENOSPC
    lf.feed("stderr", b"b\nc")
    lf.event("an event")
    lf.close()
    lf.close()
    lost = lf.losses.snapshot()[LOG_DEST]
    assert lost.why == "ENOSPC: no space left"
    assert lost.lines == 100_000 + 1 + 1 + 1  # the unended "c" got its newline at close
    assert lf.losses.take_warnings() == [(LOG_DEST, "ENOSPC: no space left")]


@pytest.mark.timeout(20)
def test_a_sink_that_raises_does_not_kill_the_pump(pipe):
    r, w = pipe

    def broken(stream, data):
        raise RuntimeError("boom")
    seen = []
    pump = StreamPump("stdout", r, broken, [lambda s, d: seen.append(d)])
    pump.start()
    data = b"y" * 300_000  # more than the pipe holds: the writer blocks if nobody drains
    view = memoryview(data)
    while view:
        view = view[os.write(w, view):]
    os.close(w)
    pump.join(10)
    assert not pump.is_alive() and pump.bytes == len(data)
    assert pump.failure == "RuntimeError: boom"


@pytest.mark.timeout(20)
def test_ui_warns_once_about_a_dead_stdout_on_stderr_and_in_the_log_file(tmp_path, pipe):
    r_out, w_out = pipe
    os.close(r_out)  # stdout's reader is gone
    r_err, w_err = os.pipe()
    try:
        log = LogFile(tmp_path / "log")
        ui = Ui(log, live=False, output=Output(Losses(), fds={"stdout": w_out,
                                                             "stderr": w_err}))
        for i in range(50):
            ui.passthrough("stdout", b"vllm line %d\n" % i)
        assert ui.out.drain(10)
        ui.event("stopping")  # a later call gives the warning the writer found
        assert ui.drain(10)
        log.close()
        os.close(w_err)
        err = read_all(r_err).decode()
        assert err.count("warning: stdout: EPIPE: reader gone") == 1
        assert (tmp_path / "log").read_text().count("warning: stdout: EPIPE") == 1
        assert ui.output_lost()["stdout"].lines == 50
    finally:
        os.close(r_err)
