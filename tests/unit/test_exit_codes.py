"""The exit-code rules (README "Exit codes"): the most serious outcome wins, 5 > 6 > 3 >
7 > 4, and vLLM's own code is passed on when it ended by itself."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vllm_supervisor.lifecycle.machine import EDGES, IllegalTransition, Lifecycle, State
from vllm_supervisor.lifecycle.report import ExitFacts, decide_exit

CLEAN = ExitFacts(survivors=False, vram_failed=False, start_failed=None, ready=True,
                  requested=True, escalated=False, engine_died=None, self_exit=False,
                  main_status=0, main_desc="exited with 0")


def facts(**kw) -> ExitFacts:
    return dataclasses.replace(CLEAN, **kw)


@pytest.mark.parametrize(("kw", "code"), [
    ({}, 0),
    ({"escalated": True}, 4),
    ({"survivors": True, "vram_failed": True, "escalated": True}, 5),
    ({"vram_failed": True, "escalated": True, "start_failed": "hang"}, 6),
    ({"start_failed": "no progress", "requested": False, "ready": False}, 3),
    ({"requested": False, "ready": False, "main_status": 1 << 8}, 3),
    ({"requested": False, "engine_died": "gone", "escalated": True}, 7),
    ({"requested": True, "engine_died": "gone", "escalated": True}, 7),
    ({"requested": False, "self_exit": True, "main_status": 0, "engine_died": "gone"}, 7),
    ({"requested": False, "self_exit": True, "main_status": 1 << 8, "engine_died": "x"}, 1),
    ({"requested": False, "self_exit": True, "main_status": 0}, 0),
    ({"requested": False, "self_exit": True, "main_status": 9}, 137),
    ({"requested": False, "self_exit": True, "main_status": 3 << 8}, 3),
])
def test_exit_code_priority(kw, code):
    assert decide_exit(facts(**kw))[0] == code


def test_every_meaning_is_one_line_and_names_the_cause():
    code, meaning = decide_exit(facts(start_failed="no progress for 300 s", ready=False,
                                      requested=False))
    assert code == 3 and "no progress for 300 s" in meaning and "\n" not in meaning
    code, meaning = decide_exit(facts(requested=False, engine_died="the engine process "
                                      "(pid 5) is gone"))
    assert code == 7 and "pid 5" in meaning


def test_the_lifecycle_refuses_an_edge_it_does_not_have():
    m = Lifecycle()
    with pytest.raises(IllegalTransition):
        m.transition(State.STARTING)  # admitting -> starting skips the launch
    m.transition(State.LAUNCHING)
    with pytest.raises(IllegalTransition):
        m.transition(State.READY)  # launching -> ready skips starting
    m.transition(State.STARTING)
    with pytest.raises(IllegalTransition):
        m.transition(State.DONE)
    assert m.state is State.STARTING


def test_every_state_can_reach_done_and_done_is_final():
    seen, todo = set(), [State.ADMITTING]
    while todo:
        s = todo.pop()
        seen.add(s)
        todo += [n for n in EDGES[s] if n not in seen]
    assert seen == set(State) and EDGES[State.DONE] == frozenset()


def test_a_full_report_is_json():
    from lifecycle_kit import kit

    k = kit(gpus=1)
    k.host.send_supervisor(2.0)
    report = k.run()
    text = json.dumps(report.to_dict())
    assert json.loads(text)["exit_code"] == 0
