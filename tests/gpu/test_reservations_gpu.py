"""GPU reservations on a real GPU: simulated vLLMs whose workers allocate real CUDA memory
(FAKE_VLLM_CUDA_MIB) and check the free memory first as vLLM does (FAKE_VLLM_CHECK_FREE:
torch.cuda.mem_get_info), admitted through NVML and the shared table. GPU 0 only."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.gpu.test_gpu import READY_TIMEOUT_S, pytestmark  # noqa: F401 - the gpu marks
from tests.helpers import wait_until


def _total_mib() -> float:
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    return pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**20


def _start(supervise, fraction: float, *sup_args: str, name: str, env=None):
    """A supervised simulated vLLM at FRACTION of GPU 0, its worker holding a little less
    than that in real CUDA memory (the context takes about 0.5 GiB more)."""
    mib = int(fraction * _total_mib()) - 1500
    e = {"CUDA_VISIBLE_DEVICES": "0", "FAKE_VLLM_CUDA_MIB": str(mib),
         "FAKE_VLLM_CHECK_FREE": "1", "FAKE_VLLM_STARTUP_S": "0.2", **(env or {})}
    return supervise("--gpu-probe", "auto", "--name", name, "--gpu-wait", "240", *sup_args,
                     vllm_args=("--gpu-memory-utilization", str(fraction)), env=e)


def _stop(run, code: int = 0) -> dict:
    run.signal(signal.SIGTERM)
    got = run.finish(timeout=180)
    assert got == code, run.stderr()[-3000:]
    return run.report()


def test_two_at_045_share_gpu0_and_a_third_at_05_gets_in_after_one_stops(supervise):
    a = _start(supervise, 0.45, name="a")
    a.wait_ready(timeout=READY_TIMEOUT_S)
    b = _start(supervise, 0.45, name="b")
    b.wait_ready(timeout=READY_TIMEOUT_S)  # both allocations succeeded, side by side
    c = _start(supervise, 0.5, name="c")
    c.wait_for("waiting for GPU memory", timeout=60)
    rep_a = _stop(a)
    assert rep_a["vram"]["status"] == "released"
    c.wait_ready(timeout=READY_TIMEOUT_S)  # admitted, and its real allocation succeeded
    assert "Free memory on device" not in c.stderr()
    rep_c = _stop(c)
    assert rep_c["launch"]["started_wall"] > rep_a["vram"]["released_wall"]
    assert _stop(b)["vram"]["status"] == "released"


def test_replace_on_a_gpu_filled_to_09_where_a_stop_then_start_race_fails(
        supervise, fake_vllm_env):
    # A slow teardown (memory held throughout): longer than the new worker's torch import
    # and CUDA start-up, which took longer than a 3 s teardown on an H100 host.
    slow = {"FAKE_VLLM_STOP_S": "12"}
    a = _start(supervise, 0.9, "--grace", "40", name="a", env=slow)
    a.wait_ready(timeout=READY_TIMEOUT_S)
    # Negative control: stop the old one and start the new one at once, no reservations.
    stop = subprocess.Popen([sys.executable, "-m", "vllm_supervisor", "stop", "a"],
                            env=fake_vllm_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    b = _start(supervise, 0.9, "--no-reservations", name="b")
    assert b.finish(timeout=READY_TIMEOUT_S) == 3
    assert "Free memory on device" in b.stderr() or "out of memory" in b.stderr()
    assert a.finish(timeout=120) == 0, a.stderr()[-3000:]
    assert stop.wait(120) == 0
    # The same redeploy with --replace.
    a = _start(supervise, 0.9, "--grace", "40", name="a", env=slow)
    a.wait_ready(timeout=READY_TIMEOUT_S)
    b = _start(supervise, 0.9, "--replace", "a", name="a")
    b.wait_ready(timeout=READY_TIMEOUT_S)
    assert a.finish(timeout=120) == 0 and a.report()["vram"]["status"] == "released"
    wait_until(lambda: "handoff: vLLM launched" in b.stderr(), 10, "the handoff line")
    assert "Free memory on device" not in b.stderr()
    assert _stop(b)["vram"]["status"] == "released"
