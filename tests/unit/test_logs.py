"""The log file and the stream pump: whole lines per stream in the file, bounded memory for
very long lines, and every byte passed through unchanged."""

from __future__ import annotations

import os
import random

import pytest

from vllm_supervisor.host import logs
from vllm_supervisor.host.logs import LogFile, StreamPump


@pytest.fixture
def small_hold(monkeypatch):
    """A 1 KiB bound instead of 1 MiB, so the long-line paths run on small data."""
    monkeypatch.setattr(logs, "LINE_HOLD", 1024)
    return 1024


def file_lines(path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def test_streams_never_interleave_inside_a_line(tmp_path):
    lf = LogFile(tmp_path / "log")
    lf.feed("stdout", b"out 1\nout 2 beg")
    lf.feed("stderr", b"err 1\nerr 2 beg")
    lf.feed("stdout", b"in\n")
    lf.feed("stderr", b"in\n")
    lf.close()
    assert file_lines(tmp_path / "log") == [b"out 1", b"err 1", b"out 2 begin", b"err 2 begin"]


def test_random_chunks_of_two_streams_keep_every_line_whole(tmp_path):
    rng = random.Random(0)
    streams = {s: b"".join(b"%s line %d\n" % (s.encode(), i) for i in range(2000))
               for s in ("stdout", "stderr")}
    pos = dict.fromkeys(streams, 0)
    lf = LogFile(tmp_path / "log")
    while any(pos[s] < len(d) for s, d in streams.items()):
        s = rng.choice([s for s in streams if pos[s] < len(streams[s])])
        n = rng.randint(1, 200)
        lf.feed(s, streams[s][pos[s]:pos[s] + n])
        pos[s] += n
    lf.close()
    lines = file_lines(tmp_path / "log")
    for s, data in streams.items():
        assert [x for x in lines if x.startswith(s.encode())] == data.split(b"\n")[:-1]
    assert len(lines) == 4000


def test_a_last_line_without_newline_is_ended_at_close(tmp_path):
    lf = LogFile(tmp_path / "log")
    lf.feed("stdout", b"whole\nno newline")
    lf.feed("stderr", b"also none")
    lf.close()
    assert sorted(file_lines(tmp_path / "log")) == [b"also none", b"no newline", b"whole"]


def test_crlf_passes_through_unchanged(tmp_path):
    lf = LogFile(tmp_path / "log")
    for piece in (b"a\r", b"\nb\r\n", b"c\r\n\r", b"\n"):
        lf.feed("stdout", piece)
    lf.close()
    assert (tmp_path / "log").read_bytes() == b"a\r\nb\r\nc\r\n\r\n"


def test_events_are_whole_timestamped_lines(tmp_path):
    lf = LogFile(tmp_path / "log")
    lf.feed("stdout", b"half a li")
    lf.event("stopping vLLM")
    lf.feed("stdout", b"ne\n")
    lf.close()
    event, line = file_lines(tmp_path / "log")
    assert event.endswith(b" vllm-supervise: stopping vLLM") and line == b"half a line"


def test_a_10_mb_line_is_written_through_whole_while_the_other_stream_waits(tmp_path):
    lf = LogFile(tmp_path / "log")
    lf.feed("stderr", b"before\n")
    piece = b"x" * 65536
    for i in range(160):  # 10 MiB, no newline
        lf.feed("stdout", piece)
        if i == 100:
            lf.feed("stderr", b"during 1\nduring 2\n")
            lf.event("an event during the long line")
        assert lf._held_n.get("stdout", 0) <= logs.LINE_HOLD + len(piece)
    lf.feed("stdout", b"end\nnext\n")
    lf.close()
    lines = file_lines(tmp_path / "log")
    assert lines[0] == b"before"
    assert lines[1] == piece * 160 + b"end"
    assert lines[2:4] == [b"during 1", b"during 2"]
    assert lines[4].endswith(b"an event during the long line") and lines[5] == b"next"


def test_a_long_line_left_unended_at_close_gets_its_newline(tmp_path, small_hold):
    lf = LogFile(tmp_path / "log")
    lf.feed("stdout", b"y" * 3000)
    lf.feed("stderr", b"waiting\n")
    lf.close()
    assert file_lines(tmp_path / "log") == [b"y" * 3000, b"waiting"]


def test_when_both_streams_pass_the_bound_nothing_is_lost_or_reordered(tmp_path, small_hold):
    lf = LogFile(tmp_path / "log")
    lf.feed("stdout", b"a" * 2000)  # over the bound: stdout now writes its line through
    for _ in range(3):
        lf.feed("stderr", b"b" * 600 + b"\n")  # waits, then passes the bound too
        assert lf._held_n["stderr"] <= 2 * small_hold
    lf.feed("stdout", b"a" * 10 + b"\n")
    lf.close()
    data = (tmp_path / "log").read_bytes()
    assert data.count(b"a") == 2010 and data.count(b"b") == 1800
    assert data.replace(b"\n", b"").replace(b"b", b"") == b"a" * 2010  # stdout in order
    assert data.count(b"b" * 600 + b"\n") == 3  # stderr's lines stay whole


def test_a_released_stream_may_begin_a_long_line_of_its_own(tmp_path, small_hold):
    lf = LogFile(tmp_path / "log")
    lf.feed("stdout", b"a" * 2000)
    lf.feed("stderr", b"short\n" + b"b" * 900)  # waits behind stdout's line
    lf.feed("stdout", b"\n")  # stdout's line ends: stderr's held bytes go out
    lf.feed("stderr", b"b" * 900)  # stderr's own line passes the bound now
    lf.feed("stdout", b"later\n")  # waits behind it
    lf.feed("stderr", b"\n")
    lf.close()
    assert file_lines(tmp_path / "log") == [b"a" * 2000, b"short", b"b" * 1800, b"later"]


def test_the_pump_passes_every_byte_to_the_sink_and_the_taps(tmp_path):
    r, w = os.pipe()
    got: dict[str, list[bytes]] = {"sink": [], "tap": []}
    pump = StreamPump("stdout", r, lambda s, b: got["sink"].append(b),
                      [lambda s, b: got["tap"].append(b)])
    pump.start()
    data = b"".join(b"line %d\r\n" % i for i in range(50_000)) + b"last, no newline"
    view = memoryview(data)
    while view:
        view = view[os.write(w, view[:100_000]):]
    os.close(w)
    pump.join(10)
    assert not pump.is_alive()
    assert b"".join(got["sink"]) == data and b"".join(got["tap"]) == data
    assert pump.bytes == len(data)
    assert pump.last_lines(2) == ["line 49999", "last, no newline"]
    assert sum(len(c) for c in pump.tail) <= logs.TAIL_CHUNKS * logs.TAIL_BYTES
