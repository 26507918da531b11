"""`vllm-supervise demo`: the simulated vLLM's settings for each scenario."""

from __future__ import annotations

import socket
from pathlib import Path

from vllm_supervisor.gpu import SimulatedGpuProbe

SCENARIOS = {
    "clean": {},
    "stubborn-engine": {"FAKE_VLLM_MISBEHAVE": "engine-ignores-term"},
    "orphaned-engine": {"FAKE_VLLM_EXIT_AFTER_S": "2", "FAKE_VLLM_EXIT_CODE": "137"},
    "late-vram": {"FAKE_VLLM_VRAM_RELEASE_DELAY_S": "0.8"},
}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_setup(tmp: Path, scenario: str) -> tuple[tuple[str, ...], tuple, SimulatedGpuProbe]:
    """(vLLM args, environment, GPU probe) for a demo run inside TMP."""
    gpu_dir = tmp / "gpus"
    gpu_dir.mkdir()
    env = {
        "FAKE_VLLM_STARTUP_S": "2.0",
        "FAKE_VLLM_SIM_GPU_DIR": str(gpu_dir),
        "FAKE_VLLM_VRAM_MIB": "30720",
        "FAKE_VLLM_NUM_GPUS": "2",
        **SCENARIOS[scenario],
    }
    args = ("--port", str(free_port()), "--tensor-parallel-size", "2")
    return args, tuple(env.items()), SimulatedGpuProbe(gpu_dir, gpus=2)
