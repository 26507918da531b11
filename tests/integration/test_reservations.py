"""GPU reservations end to end: real supervisors, real simulated vLLM trees, one shared
table (the test's own folder), and the simulated GPU (81559 MiB, 615 MiB baseline), whose
workers check free memory at startup as vLLM does (FAKE_VLLM_CHECK_FREE)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import sim_gpu, wait_until

pytestmark = pytest.mark.timeout(180)

TOTAL = 81559.0


def _gpu(tmp_path, **knobs):
    return sim_gpu(tmp_path, gpus=1, **({"check_free": 1} | knobs))


def _mib(fraction: float) -> int:
    """What a simulated vLLM at FRACTION takes: a little under its share."""
    return int(fraction * TOTAL) - 800


def _serve(supervise, tmp_path, fraction: float, *extra, name: str, env=None, **knobs):
    probe, genv = _gpu(tmp_path, vram_mib=_mib(fraction), **knobs)
    return supervise(*probe, "--name", name, "--gpu-wait", "60", *extra,
                     vllm_args=("--gpu-memory-utilization", str(fraction)),
                     env=genv | (env or {}))


def _table(d) -> list[dict]:
    out = []
    for p in sorted(d.glob("r-*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _launched_wall(run) -> float:
    return run.report()["launch"]["started_wall"]


def test_two_at_045_share_a_gpu_and_a_third_at_05_starts_when_one_is_released(
        supervise, tmp_path, private_reservations, fake_vllm_env):
    a = _serve(supervise, tmp_path, 0.45, name="a")
    a.wait_ready()
    b = _serve(supervise, tmp_path, 0.45, name="b")
    b.wait_ready()  # shared on purpose: it just works
    rows = _table(private_reservations)
    assert sorted((r["name"], r["state"]) for r in rows) == [("a", "ready"), ("b", "ready")]
    # `status`: per GPU, total, baseline, used now, who reserves what.
    probe, genv = _gpu(tmp_path)
    out = subprocess.run([sys.executable, "-m", "vllm_supervisor", "status", "--json"],
                         env=fake_vllm_env | genv | {"VLLM_SUPERVISE_GPU_PROBE": probe[1]},
                         capture_output=True, text=True, check=True).stdout
    [gpu] = json.loads(out)["gpus"]
    assert gpu["total_mib"] == TOTAL and gpu["baseline_mib"] == 615
    assert gpu["used_mib"] == 615 + 2 * _mib(0.45) and gpu["reserved"] == 0.9
    assert sorted((h["name"], h["fraction"], h["state"]) for h in gpu["reserved_by"]) == [
        ("a", 0.45, "ready"), ("b", 0.45, "ready")]
    c = _serve(supervise, tmp_path, 0.5, name="c")
    c.wait_for("waiting for GPU memory")
    assert "0.90 reserved + 0.50 needed" in c.stderr() and "a (0.45, ready" in c.stderr()
    assert not (tmp_path / "pids-2.json").exists()  # nothing of c launched
    a.signal(signal.SIGTERM)
    assert a.finish() == 0
    c.wait_ready()
    released = a.report()["vram"]["released_wall"]
    for r in (b, c):
        r.signal(signal.SIGTERM)
        assert r.finish() == 0
    c_launch = _launched_wall(c)
    assert released < c_launch < released + 5  # after the verified release, and promptly
    assert _table(private_reservations) == []  # every entry gone with a released verdict


def test_a_stop_with_vram_held_keeps_its_reservation_until_the_memory_is_back(
        supervise, tmp_path, private_reservations):
    a = _serve(supervise, tmp_path, 0.45, "--vram-timeout", "0.5", name="a",
               vram_leak_mib=20000)  # memory no process lists, left after the stop
    a.wait_ready()
    a.signal(signal.SIGTERM)
    assert a.finish() == 6
    assert a.stderr().count("GPU reservation kept (VRAM held)") == 1  # said once
    [row] = _table(private_reservations)
    assert row["name"] == "a" and row["state"] == "held"
    b = _serve(supervise, tmp_path, 0.6, name="b")
    b.wait_for("waiting for GPU memory")
    assert "a (0.45, held, supervisor gone: GPU 0 has" in b.stderr()
    (tmp_path / "gpus" / "alloc-leak-0.json").unlink()  # the memory comes back
    b.wait_ready()
    assert "dropped the reservation of a" in b.stderr()
    b.signal(signal.SIGTERM)
    assert b.finish() == 0


def test_replace_hands_the_gpu_over_and_no_third_start_gets_in(
        supervise, tmp_path, private_reservations):
    a = _serve(supervise, tmp_path, 0.9, name="a", stop_s=1.0)  # a slow teardown
    a.wait_ready()
    b = _serve(supervise, tmp_path, 0.9, "--replace", "a", name="a")
    b.wait_for("GPUs reserved beside its own reservation")
    c = _serve(supervise, tmp_path, 0.5, name="c")  # a third start during the handoff
    assert a.finish() == 0
    b.wait_ready()
    assert "handoff: vLLM launched" in b.stderr()
    assert a.report()["vram"]["status"] == "released"
    c.wait_for("waiting for GPU memory")
    assert "pids-2.json" not in os.listdir(tmp_path)  # c never launched
    c.signal(signal.SIGTERM)
    assert c.finish() == 0 and "nothing was launched" in c.stderr()
    b.signal(signal.SIGTERM)
    assert b.finish() == 0
    assert _table(private_reservations) == []


def test_without_reservations_a_stop_then_start_race_fails_and_replace_does_not(
        supervise, tmp_path, fake_vllm_env):
    """The negative control: the redeploy of the seeds done by hand (stop the old one,
    start the new one at once) fails with vLLM's own free-memory error; --replace works."""
    a = _serve(supervise, tmp_path, 0.9, name="a", stop_s=1.0)
    a.wait_ready()
    stop = subprocess.Popen([sys.executable, "-m", "vllm_supervisor", "stop", "a"],
                            env=fake_vllm_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    b = _serve(supervise, tmp_path, 0.9, "--no-reservations", name="b")
    assert b.finish() == 3
    assert "Free memory on device" in b.stderr()
    assert stop.wait(60) == 0 and a.finish() == 0
    a = _serve(supervise, tmp_path, 0.9, name="a", stop_s=1.0)
    a.wait_ready()
    b = _serve(supervise, tmp_path, 0.9, "--replace", "a", name="b")
    b.wait_ready()
    assert a.finish() == 0
    b.signal(signal.SIGTERM)
    assert b.finish() == 0


def test_gpu_wait_over_is_exit_3_naming_the_holder(supervise, tmp_path):
    a = _serve(supervise, tmp_path, 0.9, name="a")
    a.wait_ready()
    probe, env = _gpu(tmp_path, vram_mib=_mib(0.5))
    t0 = time.monotonic()
    b = supervise(*probe, "--name", "b", "--gpu-wait", "1",
                  vllm_args=("--gpu-memory-utilization", "0.5"), env=env)
    assert b.finish() == 3
    assert time.monotonic() - t0 >= 1.0
    line = [x for x in b.stderr().splitlines() if "error:" in x]
    assert len(line) == 1 and "GPUs not free after --gpu-wait 1 s" in line[0]
    assert "a (0.90, ready" in line[0]
    a.signal(signal.SIGTERM)
    assert a.finish() == 0


def test_a_dead_supervisors_reservation_is_dropped_only_once_its_memory_is_back(
        supervise, tmp_path, private_reservations):
    # The simulated driver frees a dead worker's memory 3 s after each observer first saw
    # it dead, so the new worker's own check (a second observer) is left out here.
    a = _serve(supervise, tmp_path, 0.9, "--grace", "1", name="a", vram_release_delay_s=3)
    a.wait_ready()
    os.kill(a.pid, signal.SIGKILL)  # its death guard finishes the stop, then lets go
    a.proc.wait()
    b = _serve(supervise, tmp_path, 0.5, name="b", check_free=0)
    b.wait_for("waiting for GPU memory")
    b.wait_ready(timeout=60)
    err = b.stderr()
    # Kept while its death guard held the lock and stopped the tree, then while the dead
    # worker's memory was still listed by the (simulated) driver; dropped after that.
    assert "still hold memory on GPU 0" in err, err
    assert "dropped the reservation of a" in err
    waited = float(err.split("GPU admitted after ")[1].split(" s")[0])
    assert waited >= 3.0  # the release delay, at least
    b.signal(signal.SIGTERM)
    assert b.finish() == 0
    wait_until(lambda: len(_table(private_reservations)) == 0, 10, "the table empty")


def test_ten_starts_at_once_never_oversubscribe_a_gpu(supervise, tmp_path,
                                                      private_reservations):
    """Ten supervisors at 0.3 each, started together on one GPU: three fit (0.9), one
    load at a time; the other seven give up after --gpu-wait naming the holders. A watcher
    samples the table all along: the sum of fractions never goes over 1.0."""
    probe, env = _gpu(tmp_path, vram_mib=_mib(0.3))
    runs = [supervise(*probe, "--name", f"n{i}", "--gpu-wait", "10",
                      vllm_args=("--gpu-memory-utilization", "0.3"), env=env)
            for i in range(10)]
    peak = 0.0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(r.proc.poll() is None for r in runs) > 3:
        total = sum(g["fraction"] for row in _table(private_reservations)
                    for g in row["gpus"].values())
        peak = max(peak, total)
        time.sleep(0.01)  # a sampling period, not a wait for anything
    ready = [r for r in runs if r.proc.poll() is None]
    assert len(ready) == 3 and peak <= 1.0 + 1e-9, (len(ready), peak)
    for r in ready:
        r.wait_ready()
    for r in runs:
        if r not in ready:
            assert r.finish() == 3 and "GPUs not free after --gpu-wait 10 s" in r.stderr()
    for r in ready:
        r.signal(signal.SIGTERM)
        assert r.finish() == 0
