"""The metrics endpoint on a real GPU: a supervised simulated vLLM whose worker holds real
CUDA memory (FAKE_VLLM_CUDA_MIB) on GPU 0; the per-GPU series carry NVML's UUID and index
and the tree's own memory, and after the stop the verdict and the release time."""

from __future__ import annotations

import signal

from tests.gpu.test_gpu import READY_TIMEOUT_S, pytestmark  # noqa: F401 - the gpu marks
from tests.helpers import free_port, wait_until
from tests.integration.test_metrics import promtool_check, scrape, state

MIB = 2**20


def test_gpu_series_show_the_trees_cuda_memory_by_uuid_and_then_its_release(supervise, gpus):
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    uuid = pynvml.nvmlDeviceGetUUID(h)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    mport = free_port()
    run = supervise("--gpu-probe", "auto", "--metrics-port", str(mport),
                    "--metrics-linger", "30",
                    env={"CUDA_VISIBLE_DEVICES": "0", "FAKE_VLLM_CUDA_MIB": "4096",
                         "FAKE_VLLM_STARTUP_S": "0.2"})
    run.wait_ready(timeout=READY_TIMEOUT_S)
    gpu = (("index", "0"), ("uuid", uuid))

    def held():
        text, s = scrape(mport)
        tree = s.get(("vllm_supervise_gpu_memory_tree_bytes", gpu), 0)
        return (text, s) if state(s) == "ready" and tree >= 4096 * MIB else None
    text, ready = wait_until(held, 30, "the tree's CUDA memory in the metrics")
    promtool_check(text)
    assert ready[("vllm_supervise_gpu_memory_used_bytes", gpu)] >= (
        ready[("vllm_supervise_gpu_memory_baseline_bytes", gpu)]
        + ready[("vllm_supervise_gpu_memory_tree_bytes", gpu)] - 256 * MIB)
    assert ready[("vllm_supervise_gpu_memory_total_bytes", gpu)] > 40 * 1024 * MIB
    assert ready[("vllm_supervise_gpu_claim_ratio", gpu)] == 0.9
    print(f"ready: tree {ready[('vllm_supervise_gpu_memory_tree_bytes', gpu)] / MIB:.0f} MiB, "
          f"used {ready[('vllm_supervise_gpu_memory_used_bytes', gpu)] / MIB:.0f} MiB, "
          f"baseline {ready[('vllm_supervise_gpu_memory_baseline_bytes', gpu)] / MIB:.0f} MiB")
    run.signal(signal.SIGTERM)
    run.wait_for("metrics: serving the final state")
    _, done = scrape(mport)
    report = run.report()
    assert report["vram"]["status"] == "released"
    assert done[("vllm_supervise_last_vram_verdict", (("vllm_supervise_last_vram_verdict",
                                                        "released"),))] == 1
    release = done[("vllm_supervise_last_vram_release_seconds", ())]
    assert 0 <= release < report["stop_duration_s"] + report["vram"]["waited_s"] + 1
    assert done[("vllm_supervise_gpu_memory_tree_bytes", gpu)] == 0
    print(f"stop {done[('vllm_supervise_last_stop_duration_seconds', ())]:.3f} s, "
          f"VRAM released {release:.4f} s after the stop began")
    run.signal(signal.SIGTERM)
    assert run.finish(timeout=30) == 0
