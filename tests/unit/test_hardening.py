"""The pure logic behind the hardening: environment hygiene, the startup stall watch, the
restart backoff (their effect on real processes: tests/integration/test_hardening.py)."""

from __future__ import annotations

from vllm_supervisor.host.hygiene import scrub
from vllm_supervisor.lifecycle.restart import backoff
from vllm_supervisor.lifecycle.watchdog import CLK_TCK, StallWatch

DIST = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555",
        "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "job7", "PET_NNODES": "2"}


def test_scrub_removes_the_torchrun_and_elastic_variables_only():
    env, removed = scrub({**DIST, "PATH": "/bin", "NCCL_DEBUG": "INFO", "RANKING": "x"})
    assert removed == sorted(DIST)
    assert env == {"PATH": "/bin", "NCCL_DEBUG": "INFO", "RANKING": "x"}


def test_stall_watch_counts_log_memory_and_cpu_as_progress():
    w = StallWatch(10, now=0.0)
    assert not w.feed(0, 0, 0, 0, 0)
    assert not w.feed(9, 100, 0, 0, 0) and w.last_kind == "log output"
    assert not w.feed(18, 100, 5 << 20, 0, 0) and w.last_kind == "memory growth"
    assert not w.feed(27, 100, 5 << 20, 0, int(CLK_TCK * 9 * 0.5)) and w.last_kind == "CPU use"
    assert not w.feed(30, 100, 5 << 20, 0, int(CLK_TCK * 9 * 0.5) + 1)  # idle ticks only
    assert w.feed(37.5, 100, 5 << 20, 0, int(CLK_TCK * 9 * 0.5) + 2)


def test_backoff_doubles_and_is_capped():
    assert [backoff(n) for n in (1, 2, 3, 7, 12)] == [1, 2, 4, 60, 60]
