"""`vllm-supervise demo`: the simulated vLLM's settings for each scenario, the demo's own
timed stop, and the probe spec that selects the simulated GPU. The only importer of sim."""

from __future__ import annotations

import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from vllm_supervisor.gpu.nvml import make_probe
from vllm_supervisor.gpu.probe import GpuProbe
from vllm_supervisor.host.signals import send_self_later
from vllm_supervisor.lifecycle.machine import State
from vllm_supervisor.sim.gpu import SimulatedGpuProbe

SCENARIOS = {
    "clean": {},
    "stubborn-engine": {"FAKE_VLLM_MISBEHAVE": "engine-ignores-term"},
    "orphaned-engine": {"FAKE_VLLM_EXIT_AFTER_S": "2", "FAKE_VLLM_EXIT_CODE": "137"},
    "late-vram": {"FAKE_VLLM_VRAM_RELEASE_DELAY_S": "0.8"},
}
SIM_CMD = (sys.executable, "-m", "vllm_supervisor.sim")


@dataclass(frozen=True)
class DemoSetup:
    """What one demo run needs: vLLM args, environment, command, probe, listeners."""

    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cmd: tuple[str, ...]
    probe: GpuProbe
    listeners: tuple


class StopAfterReady:
    """The demo's timed stop: SIGTERM to the supervisor itself SERVE_FOR seconds after
    ready, through the same signal path an operator's stop takes."""

    def __init__(self, serve_for: float):
        self.serve_for = serve_for

    def on_transition(self, old: State, new: State) -> None:
        """Arm the timer when the run becomes ready."""
        if new is State.READY:
            send_self_later(self.serve_for, signal.SIGTERM)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_setup(tmp: Path, scenario: str, serve_for: float) -> DemoSetup:
    """Everything a demo run of SCENARIO needs, with its simulated GPUs inside TMP."""
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
    # The orphaned-engine scenario ends by itself: vLLM's API server dies.
    listeners = () if scenario == "orphaned-engine" else (StopAfterReady(serve_for),)
    return DemoSetup(args, tuple(env.items()), SIM_CMD, SimulatedGpuProbe(gpu_dir, gpus=2),
                     listeners)


def resolve_probe(spec, env: dict[str, str]) -> GpuProbe:
    """A probe object as is; 'sim:DIR[:GPUS]' (the simulated engine's GPUs, for tests and
    the demo), or what gpu.nvml.make_probe makes of 'auto' and 'none'."""
    if not isinstance(spec, str):
        return spec
    if spec.startswith("sim:"):
        _, directory, *n = spec.split(":")
        return SimulatedGpuProbe(Path(directory), gpus=int(n[0]) if n else 2)
    return make_probe(spec, env)
