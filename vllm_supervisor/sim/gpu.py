"""The simulated GPU probe: reads the alloc-*.json files the simulated workers write."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vllm_supervisor.gpu.probe import GpuReading
from vllm_supervisor.host.proctree import read_proc


class SimulatedGpuProbe:
    """The simulated engine's VRAM: alloc-*.json files its workers write, freed when the
    writing process is gone (as the driver frees memory at process exit), optionally late."""

    name = "simulated"

    def __init__(self, directory: Path, gpus: int = 2, total_mib: float = 81559, base_mib=615):
        self.dir = Path(directory)
        self.gpus = gpus
        self.total_mib = total_mib
        self.base_mib = base_mib
        self._dead_since: dict[str, float] = {}

    def available(self) -> str | None:
        """Usable while its directory exists."""
        return None if self.dir.is_dir() else f"simulated GPU directory {self.dir} is missing"

    def read(self) -> list[GpuReading]:
        """Current simulated readings."""
        used = [float(self.base_mib)] * self.gpus
        procs: list[list[tuple[int, float | None]]] = [[] for _ in range(self.gpus)]
        for path in sorted(self.dir.glob("alloc-*.json")):
            try:
                a = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            gpu = int(a["gpu"]) % self.gpus
            if not self._holds(path.name, a):
                continue
            used[gpu] += a["mib"]
            if a.get("pid") is not None:
                procs[gpu].append((int(a["pid"]), float(a["mib"])))
        return [
            GpuReading(i, f"GPU-simulated-{i:04d}", used[i], self.total_mib, tuple(procs[i]))
            for i in range(self.gpus)
        ]

    def _holds(self, key: str, alloc: dict) -> bool:
        pid = alloc.get("pid")
        if pid is None:
            return True  # memory with no owner process, like a stale CUDA IPC reference
        info = read_proc(int(pid))
        alive = info is not None and info.start_ticks == alloc["start_ticks"]
        if alive and info.state != "Z":
            return True
        since = self._dead_since.setdefault(key, time.monotonic())
        return time.monotonic() - since < float(alloc.get("release_delay_s", 0))
