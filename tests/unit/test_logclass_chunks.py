"""The log classifier fed chunks as a pipe delivers them: markers split across chunks, a last
line without newline, CRLF, very long lines, two streams at once. Its pre-filter must count
exactly what the markers' regex over every line counts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vllm_supervisor.lifecycle import logclass
from vllm_supervisor.lifecycle.logclass import LINE_SCAN, MARKERS, TOKENS, LogClassifier

HERE = Path(__file__).resolve().parent
DATA = next(d for d in (HERE / "data", HERE.parent / "data") if d.is_dir())
REAL_LOGS = sorted(DATA.glob("vllm-*.log"))

DEAD = b"ERROR 11-21 06:40:08 [core_client.py:564] Engine core proc EngineCore_DP0 died " \
       b"unexpectedly, shutting down client.\n"
SAMPLES = {  # one line per marker, as real vLLM and its libraries print them
    "engine core died unexpectedly": DEAD,
    "EngineDeadError": b"vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered "
                       b"an issue.\n",
    "output handler failed": b"ERROR [async_llm.py:480] AsyncLLM output_handler failed.\n",
    "worker saw its parent exit": b"INFO [multiproc_executor.py:520] Parent process exited, "
                                  b"terminating worker queues\n",
    "destroy_process_group() not called": b"[rank0]:[W] WARNING: destroy_process_group() was "
                                          b"not called before program exit\n",
    "nanobind leak report": b"nanobind: leaked 3 instances!\n",
    "resource_tracker leak warning": b"resource_tracker: There appear to be 1 leaked "
                                     b"semaphore objects to clean up at shutdown\n",
    "force-killed its own children": b"WARNING force killing remaining process 1234\n",
}


def regex_per_line(data: bytes) -> dict[str, int]:
    """The reference: the markers' regex over every line, no pre-filter, no chunks."""
    counts: dict[str, int] = {}
    for line in data.split(b"\n"):
        for m in logclass._RX.finditer(line):
            name = MARKERS[int(m.lastgroup[1:])][0]
            counts[name] = counts.get(name, 0) + 1
    return counts


def fed(chunks, stream: str = "stdout", stop_requested: bool = False) -> LogClassifier:
    clf = LogClassifier()
    clf.stop_requested = stop_requested
    for chunk in chunks:
        clf.feed(stream, chunk)
    clf.flush()
    return clf


def random_chunks(data: bytes, seed: int, largest: int) -> list[bytes]:
    rng, out, i = random.Random(seed), [], 0
    while i < len(data):
        n = rng.randint(1, largest)
        out.append(data[i:i + n])
        i += n
    return out


def test_every_marker_holds_a_prefilter_literal_and_is_counted():
    assert set(SAMPLES) == {m[0] for m in MARKERS}
    for name, line in SAMPLES.items():
        match = logclass._RX.search(line)
        assert match and MARKERS[int(match.lastgroup[1:])][0] == name
        assert any(t in match.group() for t in TOKENS), name
        assert fed([line]).unrequested == {name: 1}


@pytest.mark.parametrize("path", REAL_LOGS, ids=lambda p: p.name)
@pytest.mark.parametrize("largest", [1, 7, 300, 70_000])
def test_captured_real_logs_count_exactly_what_the_regex_over_every_line_counts(path, largest):
    data = path.read_bytes()
    expected = regex_per_line(data)
    assert expected, "the captured log must hold markers for this test to mean anything"
    for seed in range(3):
        clf = fed(random_chunks(data, seed, largest), stop_requested=True)
        assert clf.during_stop == expected and clf.unrequested == {}


def test_a_marker_split_across_two_chunks_at_any_byte_counts_once():
    text = b"INFO a line before\n" + DEAD + b"INFO a line after\n"
    for cut in range(1, len(text)):
        clf = fed([text[:cut], text[cut:]])
        assert clf.unrequested == {"engine core died unexpectedly": 1}, cut


def test_a_marker_spread_over_one_byte_chunks_counts_once():
    clf = fed([bytes([b]) for b in SAMPLES["EngineDeadError"]])
    assert clf.unrequested == {"EngineDeadError": 1}


def test_a_last_line_without_newline_counts_at_flush_only():
    clf = LogClassifier()
    clf.feed("stderr", b"INFO fine\nvllm.v1.engine.exceptions.EngineDeadError: gone")
    assert clf.unrequested == {}
    clf.flush()
    assert clf.unrequested == {"EngineDeadError": 1}
    clf.flush()  # a second flush finds nothing left
    assert clf.unrequested == {"EngineDeadError": 1}


def test_crlf_lines_give_the_same_counts_as_lf_lines():
    lf = b"".join(SAMPLES.values()) * 3
    crlf = lf.replace(b"\n", b"\r\n")
    for largest in (1, 5, 4096):
        assert fed(random_chunks(crlf, 1, largest)).unrequested == regex_per_line(lf)


def test_a_10_mb_line_keeps_memory_bounded_and_the_next_lines_still_count():
    clf = LogClassifier()
    clf.feed("stdout", b"EngineDeadError at the start of a long line ")
    for _ in range(160):  # 10 MiB in 64 KiB chunks, no newline
        clf.feed("stdout", b"x" * 65536)
        assert len(clf._lines["stdout"].head) <= LINE_SCAN
    clf.feed("stdout", b" force killing remaining process far past the start\n")
    clf.feed("stdout", SAMPLES["nanobind leak report"])
    clf.flush()
    # The start of the long line is classified, its far end is not (the documented bound).
    assert clf.unrequested == {"EngineDeadError": 1, "nanobind leak report": 1}


def test_a_long_line_in_one_chunk_is_classified_over_its_first_bytes_only():
    near = b"y" * (LINE_SCAN - 200) + SAMPLES["nanobind leak report"]
    far = b"y" * (LINE_SCAN + 10) + SAMPLES["nanobind leak report"]
    assert fed([b"a\n" + near + b"b\n"]).unrequested == {"nanobind leak report": 1}
    assert fed([b"a\n" + far + b"b\n"]).unrequested == {}


def test_partial_lines_of_two_streams_never_join():
    clf = LogClassifier()
    clf.feed("stdout", b"vllm.v1.engine.exceptions.Engine")
    clf.feed("stderr", b"DeadError from another stream\n")
    clf.feed("stdout", b"Something else\n")
    clf.flush()
    assert clf.unrequested == {}


def test_counts_go_by_whether_the_stop_was_requested_when_the_line_ended():
    clf = LogClassifier()
    clf.feed("stdout", SAMPLES["EngineDeadError"] + b"force killing sub")
    clf.stop_requested = True
    clf.feed("stdout", b" process 12\n")
    assert clf.unrequested == {"EngineDeadError": 1}
    assert clf.during_stop == {"force-killed its own children": 1}
