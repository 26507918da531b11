"""The metrics endpoint of a real supervisor over the simulated vLLM: up before launch,
the state and figures as a scrape reads them, the port refused when taken, the linger
after the stop, and no port kept by a death guard that outlives its supervisor."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess

import psutil
import pytest

from tests.helpers import cli, exposition, free_port, http_get, sim_gpu, states_on, wait_until

pytestmark = pytest.mark.slow


def scrape(port: int) -> tuple[str, dict]:
    """The exposition as text, and (name, sorted labels) -> value; ('', {}) if no answer."""
    status, body = http_get(port, "/metrics")
    if status != 200:
        return "", {}
    text = body.decode()
    return text, exposition(text)


def state(samples: dict) -> str | None:
    """The one state shown as 1, or None when not exactly one is."""
    on = states_on(samples)
    return on[0] if len(on) == 1 else None


def _ready_with_memory(scraped: tuple[str, dict]) -> tuple[str, dict] | None:
    """SCRAPED once it shows READY and the tree's GPU memory (walked every 2 s), else None."""
    _, samples = scraped
    held = any(k[0] == "vllm_supervise_gpu_memory_tree_bytes" and v > 0
               for k, v in samples.items())
    return scraped if state(samples) == "ready" and held else None


def promtool_check(text: str) -> None:
    """`promtool check metrics` accepts TEXT (skipped where promtool is not installed)."""
    if shutil.which("promtool") is None:
        return
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_endpoint_shows_the_run_from_ready_to_the_final_state_and_lingers(
        supervise, tmp_path):
    gpu_opt, gpu_env = sim_gpu(tmp_path, gpus=2, vram_mib=2000)
    mport = free_port()
    run = supervise(*gpu_opt, "--metrics-port", str(mport), "--metrics-linger", "60",
                    env=gpu_env, vllm_args=("--tensor-parallel-size", "2"))
    run.wait_ready()
    text, ready = wait_until(lambda: _ready_with_memory(scrape(mport)), 10,
                             "a scrape showing ready with the tree's GPU memory")
    promtool_check(text)
    gpu0 = (("index", "0"), ("uuid", "GPU-simulated-0000"))
    assert ready[("vllm_supervise_gpu_memory_tree_bytes", gpu0)] == 2000 * 2**20
    assert ready[("vllm_supervise_gpu_claim_ratio", gpu0)] == pytest.approx(0.9)
    assert ready[("vllm_supervise_gpu_reserved_ratio", gpu0)] == pytest.approx(0.9)
    assert ready[("vllm_supervise_tree_processes", ())] >= 4
    assert ready[("vllm_supervise_time_to_ready_seconds", ())] > 0
    run.signal(signal.SIGTERM)
    run.wait_for("metrics: serving the final state for 60 s more")
    text, done = scrape(mport)
    promtool_check(text)
    report = run.report()
    assert state(done) == "done"
    assert done[("vllm_supervise_stops_total", ())] == 1
    assert done[("vllm_supervise_last_stop_duration_seconds", ())] == report["stop_duration_s"]
    assert done[("vllm_supervise_last_vram_verdict", (("vllm_supervise_last_vram_verdict",
                                                        "released"),))] == 1
    assert done[("vllm_supervise_tree_processes", ())] == 0
    assert done[("vllm_supervise_gpu_reservations", gpu0)] == 0  # our entry is gone
    run.signal(signal.SIGTERM)  # a stop signal ends the linger at once
    assert run.finish(timeout=10) == 0
    assert http_get(mport, "/metrics")[0] is None  # the port is free again


def test_a_metrics_port_in_use_is_refused_before_anything_is_launched(supervise, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        mport = held.getsockname()[1]
        run = supervise("--metrics-port", str(mport))
        code = run.finish(timeout=30)
    err = run.stderr()
    assert code == 3, err
    assert f"metrics port {mport} is already in use by pid " in err
    assert "Traceback" not in err
    assert not run.pidfile.exists()  # no vLLM was started
    assert not run.recorder.seen


@pytest.mark.parametrize("args, says", [
    (("--metrics-port", "{port}"), "is vLLM's own --port"),
    (("--metrics-port", "0"), "--metrics-port"),
    (("--metrics-port", "9464", "--metrics-host", ""), "--metrics-host is empty"),
    (("--metrics-port", "{free}", "--metrics-host", "no-such-host.invalid"), "--metrics-host"),
    (("--metrics-linger", "-1"), "--metrics-linger"),
])
def test_bad_metrics_options_are_one_line_errors(fake_vllm_env, args, says):
    port, free = free_port(), free_port()
    argv = [a.format(port=port, free=free) for a in args]
    res = cli("serve", "--gpu-probe", "none", *argv, "m", "--port", str(port),
              env=fake_vllm_env, timeout=60)
    assert res.returncode == 2, res.stderr
    assert says in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_killed_supervisors_death_guard_does_not_keep_the_metrics_port(supervise):
    """The guard is forked from the supervisor and outlives it by the grace: it must not
    hold the listening socket it was forked with, or the next supervisor (systemd's
    restart) could not bind the port while the guard finishes the stop."""
    mport = free_port()
    run = supervise("--metrics-port", str(mport), "--grace", "3",
                    env={"FAKE_VLLM_MISBEHAVE": "engine-ignores-term"})
    run.wait_ready()
    guard = wait_until(lambda: next((p for p, (_, title) in run.recorder.seen.items()
                                     if "death guard" in title), None), 10, "the guard")
    run.signal(signal.SIGKILL)
    run.proc.wait(10)  # not run.finish(): the guard holds our stderr pipe until it ends
    assert _running(guard)  # it waits the grace (3 s) before it acts
    with socket.socket() as s:
        s.bind(("127.0.0.1", mport))  # no SO_REUSEADDR: nothing may listen on it
        s.listen()
    assert _running(guard), "the guard's grace was over before the port was tried"
    run.assert_all_gone(timeout=30)  # then the guard stops the tree and ends
    run.finish(timeout=10)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_replace_takes_the_metrics_port_over_once_the_old_supervisor_lets_it_go(supervise):
    """`serve --replace a` with a's own metrics port: a still serves its final state
    (--metrics-linger) after its stop; the new supervisor waits for the port, then serves."""
    mport = free_port()
    a = supervise("--name", "a", "--metrics-port", str(mport), "--metrics-linger", "2")
    a.wait_ready()
    b = supervise("--name", "a", "--replace", "a", "--metrics-port", str(mport))
    b.wait_ready()
    assert a.finish(timeout=30) == 0
    assert f"metrics port {mport} is already in use by pid {a.pid}" in b.stderr()
    _, samples = scrape(mport)
    assert state(samples) == "ready"
    assert samples[("vllm_supervise_launches_total", ())] == 1  # b's own registry
    b.signal(signal.SIGTERM)
    assert b.finish(timeout=30) == 0
