"""Exactly one instance per name: two `serve --name same` started at the same moment give
one running supervisor and one that exits 3 in one line; neither leaves anything behind."""

from __future__ import annotations

import signal

import pytest

from tests.helpers import sim_gpu, wait_until

pytestmark = pytest.mark.timeout(120)


def test_two_supervisors_of_one_name_started_together_give_exactly_one(supervise, tmp_path):
    gpu_args, env = sim_gpu(tmp_path)
    # Back to back: both spend far longer starting Python than the gap between them, so
    # they reach the claim together.
    runs = [supervise(*gpu_args, "--name", "same", env=env) for _ in range(2)]
    ended = wait_until(lambda: [r for r in runs if r.proc.poll() is not None], 60,
                       "one of the two supervisors to give up")
    (loser,) = ended
    (winner,) = [r for r in runs if r is not loser]
    assert loser.finish() == 3
    lines = loser.stderr().strip().splitlines()
    assert lines[-1] == ("vllm-supervise: error: instance 'same' is already running; hint: "
                         "pick another --name, or `vllm-supervise stop same`"), lines
    assert not [ln for ln in lines if "error" in ln or "Traceback" in ln][:-1], lines
    assert not loser.recorder.seen, "the refused supervisor started something"
    winner.wait_ready()
    assert winner.proc.poll() is None
    winner.signal(signal.SIGTERM)
    assert winner.finish() == 0
    winner.assert_all_gone(15)
